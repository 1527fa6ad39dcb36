"""The old import path of the client SDK, kept working.

The SDK is its own distribution now (``sdk/``, wheel ``cell-sdk``, import name
``cell_sdk``) so an agent's machine installs it without the appliance. Code
that imports ``appliance.sdk`` or one of its modules (``appliance.sdk.sandbox``
...) gets the very same objects from ``cell_sdk``.
"""
from __future__ import annotations

import importlib
import sys

from cell_sdk import *  # noqa: F401,F403 - the public names, re-exported
from cell_sdk import __all__ as __all__

for _name in ("_http", "_parse", "client", "exceptions", "filesystem", "models", "sandbox"):
    _module = importlib.import_module(f"cell_sdk.{_name}")
    sys.modules[f"{__name__}.{_name}"] = _module
    globals()[_name] = _module
del _name, _module
