"""Test-only: adds a template through the registry alone, in every process
of a live server (the web process and its spawned workers run this file at
start-up because the test puts this folder on PYTHONPATH).

The "shout" template reuses the pinned Python runtime with a session class of
its own that upper-cases stdout, so a test can tell its runs from python3's.
"""
from __future__ import annotations

from appliance.runtime import templates

SHOUT = templates.Template(
    "shout", aliases=("loud",), languages=("shout",), description="Python whose stdout is upper-cased (test template)",
    runtime=templates.REGISTRY[0].runtime, pin=templates.REGISTRY[0].pin,
    session="tests.fake_template.session:ShoutSession",
)
templates.REGISTRY = (*templates.REGISTRY, SHOUT)
