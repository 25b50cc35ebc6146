"""Every command in README's ```sh blocks works as written after set-up (`make train`):
its program exists (a Makefile target for make; after `source .venv/bin/activate`, the
virtualenv's programs), and each Python entry point it names answers --help."""
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
LAUNCHERS = {"mpiexec": ("-n", "-np"), "mpirun": ("-n", "-np")}


def readme_commands(text: str) -> list[str]:
    """The shell commands of the ```sh blocks, in order: continuation lines joined, comments cut."""
    commands = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def _fresh_path() -> str:
    """PATH of a new shell: without the virtualenv this test may run from."""
    return os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if Path(p).resolve() != VENV_BIN.resolve())


def _strip_prefixes(words: list[str]) -> list[str]:
    """Drop `time` and VAR=value assignments in front of the program."""
    while words and (words[0] == "time" or re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0])):
        words = words[1:]
    return words


def _resolve(program: str, path: str) -> str | None:
    if "/" in program:
        p = ROOT / program
        return str(p) if p.exists() and os.access(p, os.X_OK) else None
    from shutil import which
    return which(program, path=path)


def _makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {t for line in re.findall(r"^([A-Za-z][\w .-]*):(?!=)", text, flags=re.M) for t in line.split()}


def check_command(words: list[str], path: str) -> list[str] | None:
    """Raise AssertionError if the command cannot run; the --help probe to run, if any."""
    words = _strip_prefixes(words)
    program = words[0]
    if program == "make":
        targets = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
        assert set(targets) <= _makefile_targets(), f"make {targets}: not a Makefile target"
        return None
    found = _resolve(program, path)
    assert found, f"{program}: command not found (PATH={path})"
    if Path(program).name in LAUNCHERS:
        rest = words[1:]
        while rest and rest[0] in LAUNCHERS[Path(program).name]:
            rest = rest[2:]
        return check_command(rest, path)
    if Path(program).name.startswith("python"):
        entry = words[1:3] if words[1] == "-m" else words[1:2]
        assert entry[0] == "-m" or (ROOT / entry[0]).is_file(), f"{entry[0]}: no such file"
        return [found, *entry, "--help"]
    return None


def test_readme_commands_exist_after_setup():
    assert VENV_BIN.is_dir(), "run make train (or make test) first: the README's commands assume .venv"
    path, probes = _fresh_path(), []
    commands = readme_commands((ROOT / "README.md").read_text())
    assert commands, "README has no ```sh block"
    for words in commands:
        if words[0] in ("source", ".") and words[1].endswith(".venv/bin/activate"):
            assert (ROOT / words[1]).is_file()
            path = os.pathsep.join([str(VENV_BIN), path])
            continue
        probe = check_command(words, path)
        if probe and probe not in probes:
            probes.append(probe)
    for probe in probes:
        res = subprocess.run(probe, cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, PATH=path))
        assert res.returncode == 0 and "usage" in res.stdout.lower(), f"{shlex.join(probe)}:\n{res.stderr[-2000:]}"


@pytest.mark.parametrize("command, error", [
    ("mpirun -np 2 python -m engine.train", "mpirun: command not found"),    # .venv not activated
    ("python bench/no_such_file.py", "no such file"),
    ("make no-such-target", "not a Makefile target"),
])
def test_the_checker_catches_what_a_fresh_shell_would_not_run(command, error, tmp_path):
    path = str(tmp_path) if command.startswith("mpirun") else str(VENV_BIN)
    with pytest.raises(AssertionError, match=error):
        check_command(shlex.split(command), path)


def test_bench_kernels_without_the_nvidia_wheels_names_what_to_install(monkeypatch):
    """A core-only install has no `nvidia` package: NVRTC is reported missing with the remedy,
    not a ModuleNotFoundError."""
    import ctypes.util
    import importlib.util

    import kernel_check
    real = importlib.util.find_spec

    def find_spec(name, *a):
        if name.split(".")[0] == "nvidia":
            raise ModuleNotFoundError(f"No module named {name.split('.')[0]!r}")
        return real(name, *a)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    with pytest.raises(kernel_check.NvrtcError, match=r"libnvrtc not found .*: install the test extra"):
        kernel_check._find_nvrtc()

