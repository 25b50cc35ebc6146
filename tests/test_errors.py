"""One error family (engine.errors): every error the engine raises for the user is an
EngineError, which engine.train's main turns into one line (tests/test_job.py runs those
jobs); errors every rank meets alike are marked collective by the one helper that makes
them so."""
import importlib
import inspect
import pkgutil

import pytest

import engine
from engine.errors import EngineError
from engine.guard import on_every_rank

# Raised by the compiled bindings (Cython) and caught where they are called; SaveAbandoned is a
# BaseException on purpose (engine/guard.py: no `except Exception` may swallow it).
NOT_ENGINE_ERRORS = {"engine.guard.SaveAbandoned"}


def engine_exceptions():
    found = {}
    for info in pkgutil.walk_packages(engine.__path__, "engine."):
        if info.name in ("engine.nccl", "engine.cudnn", "engine.hostmath") or info.name.endswith(".__main__"):
            continue                    # compiled bindings (their own error types, caught by callers); scripts
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    return found


def test_every_engine_exception_is_an_engine_error():
    found = engine_exceptions()
    assert {"engine.backend.DeviceError", "engine.rundir.Refused", "engine.data.DataError",
            "engine.metrics.NonFiniteLoss", "engine.reducer.StartupError"} <= set(found)
    strays = sorted(n for n, cls in found.items() if not issubclass(cls, EngineError) and n not in NOT_ENGINE_ERRORS)
    assert not strays, strays


def test_class_defaults_and_one_raise_overrides():
    from engine.data import DataError
    from engine.rundir import Refused
    assert Refused("r").usage and Refused("r").collective
    assert DataError("d").usage and not DataError("d").collective and isinstance(DataError("d"), ValueError)
    assert DataError("d", collective=True).collective and not DataError("d", usage=False).usage


class _World:
    size = 3

    def __init__(self, failures):
        self.failures = failures

    def allgather(self, mine):
        return self.failures


def test_on_every_rank_raises_one_collective_error_naming_the_ranks():
    from engine.data import DataError

    def failing():
        raise DataError("no such folder")
    world = _World([None, (DataError, "no such folder"), (DataError, "no such folder")])
    with pytest.raises(DataError) as info:
        on_every_rank(world, failing, DataError)
    assert info.value.collective and info.value.usage
    assert str(info.value) == "no such folder (rank 1, 2 of 3)"
    assert on_every_rank(_World([None, None, None]), lambda: 7, DataError) == 7
