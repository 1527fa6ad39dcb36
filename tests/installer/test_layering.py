"""The installer runs before any bundle code is trusted, so it must import only
the stdlib (T-SUPPLY-2), and ``installer`` must be this repo's package, not the
PyPI project of the same name."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULES = sorted(p.stem for p in (REPO / "installer").glob("*.py") if p.stem != "__init__")


def test_installer_is_this_repos_package() -> None:
    import installer

    assert Path(installer.__file__).resolve().parent == REPO / "installer"


@pytest.mark.parametrize("module", MODULES)
def test_t_supply_2_installer_imports_only_stdlib(module: str) -> None:
    code = (
        "import sys, json\n"
        f"import installer.{module}\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] not in sys.stdlib_module_names"
        " and m.split('.')[0] not in ('installer', '__main__') and not m.startswith('_'))\n"
        "print(json.dumps(bad))\n"
    )
    # -I: no site-packages, no user env; the installer must work on a bare system Python.
    proc = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(REPO)!r})\n" + code],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
