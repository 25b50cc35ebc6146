"""Every `python -m engine.X` a user may run answers --help with its usage (exit 0) and
without doing its work; the loader's worker entry point, not a command, says so."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parent.parent / "engine"
INTERNAL = {"engine.loader"}       # started by engine.train as a worker process


def runnable_modules():
    mods = [f"engine.{p.stem}" for p in sorted(ENGINE.glob("*.py"))
            if re.search(r'^if __name__ == "__main__":', p.read_text(), re.M)]
    mods += [f"engine.{p.parent.name}" for p in sorted(ENGINE.glob("*/__main__.py"))]
    return mods


def test_the_runnable_modules_are_found():
    assert {"engine.train", "engine.trace", "engine.backend", "engine.simulate", "engine.loader"} <= set(runnable_modules())


@pytest.mark.parametrize("module", [m for m in runnable_modules() if m not in INTERNAL])
def test_help(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.lstrip().startswith("usage:"), out.stdout
    assert "gpu-check:" not in out.stdout + out.stderr      # engine.backend's probe did not run


def test_the_worker_entry_point_refuses_to_be_a_command():
    out = subprocess.run([sys.executable, "-m", "engine.loader", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "engine.loader is not a command" in out.stderr and "Traceback" not in out.stderr
