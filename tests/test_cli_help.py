"""Every `python -m engine.X` a user may run answers --help with its usage (exit 0) and
without doing its work; the loader's worker entry point, not a command, says so."""
import os
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


def test_importing_the_engine_changes_no_environment_and_the_job_sets_openblas_sleep():
    """OPENBLAS_THREAD_TIMEOUT=4 (docs/performance.md) is the job's own setting, made before
    NumPy loads; a program that imports the engine keeps its environment."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    code = ("import os, runpy, sys; before = dict(os.environ); import engine, engine.train, engine.simulate; "
            "print(os.environ == before); sys.argv = ['engine.train', '--help']\n"
            "try:\n    runpy.run_module('engine.train', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "True" and lines[-1] == "4", out.stdout
