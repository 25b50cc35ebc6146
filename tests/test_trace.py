"""Timeline: valid Chrome trace JSON after every event, correct overlap figures, merging."""
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from engine.trace import Timeline, format_figures, merge, overlap_figures, step_figures


def _brute_force(spans, resolution):
    """Overlap figures by marking integer time cells: an independent reference."""
    horizon = max(e for _, _, e in spans)
    compute = np.zeros(horizon, bool)
    comm = np.zeros(horizon, bool)
    for cat, s, e in spans:
        (compute if cat in ("forward", "backward", "update") else comm if cat == "comm" else
         np.zeros(horizon, bool))[s:e] = True
    return compute.sum() * resolution, comm.sum() * resolution, (comm & ~compute).sum() * resolution


@pytest.mark.parametrize("trial", range(20))
def test_overlap_figures_match_a_brute_force_count(trial):
    rng = np.random.default_rng()
    spans = []
    for _ in range(rng.integers(1, 30)):
        s = int(rng.integers(0, 1000))
        spans.append((str(rng.choice(["forward", "backward", "update", "comm", "comm", "data"])),
                      s, s + int(rng.integers(1, 200))))
    if not any(c == "comm" for c, _, _ in spans):
        spans.append(("comm", 5, 50))
    f = overlap_figures(spans)
    compute, comm, exposed = _brute_force(spans, 1)
    assert (f["compute_s"], f["comm_s"], f["exposed_s"]) == (compute, comm, exposed)
    assert f["hidden_fraction"] == pytest.approx((comm - exposed) / comm)


def test_fully_hidden_and_fully_exposed():
    assert overlap_figures([("backward", 0, 10), ("comm", 2, 8)])["hidden_fraction"] == 1.0
    assert overlap_figures([("backward", 0, 10), ("comm", 10, 14)])["hidden_fraction"] == 0.0
    f = overlap_figures([("backward", 0, 10), ("comm", 8, 12), ("update", 11, 13)])
    assert f["exposed_s"] == 1 and f["hidden_fraction"] == pytest.approx(3 / 4)


def test_trace_is_valid_json_after_every_event(tmp_path):
    path = tmp_path / "t.json"
    tl = Timeline(str(path), rank=3)
    assert isinstance(json.loads(path.read_text()), list)
    tl.begin_step(7)
    t0 = 100.0
    for i in range(5):
        tl.record(f"backward conv{i}", "backward", t0 + i, t0 + i + 1, {"layer": i})
        events = json.loads(path.read_text())
        assert events[-1]["name"] == f"backward conv{i}" and events[-1]["args"] == {"layer": i}
    tl.record("allreduce b0", "comm", t0 + 2.5, t0 + 6.0)
    with tl.span("update", "update"):
        pass
    token = tl.begin("data wait", "data")
    tl.end(token)
    figures = tl.end_step()
    events = json.loads(path.read_text())
    tl.close()
    assert {e["pid"] for e in events} == {3}
    x = [e for e in events if e["ph"] == "X"]
    assert [e["cat"] for e in x] == ["backward"] * 5 + ["comm", "update", "data", "step"]
    comm = x[5]
    assert comm["dur"] == pytest.approx(3.5e6) and comm["tid"] != x[0]["tid"]
    assert figures["step"] == 7 and figures["comm_s"] == pytest.approx(3.5)
    assert figures["exposed_s"] == pytest.approx(1.0) and figures["hidden_fraction"] == pytest.approx(2.5 / 3.5)
    assert "hidden 71%" in format_figures(figures)


def test_figures_can_be_recomputed_from_the_file(tmp_path):
    path = tmp_path / "t.json"
    tl = Timeline(str(path))
    for step in range(3):
        tl.begin_step(step)
        with tl.span("backward", "backward"):
            sum(range(20000))
        start = time.perf_counter()
        sum(range(int(np.random.default_rng().integers(1000, 50000))))
        tl.record("allreduce", "comm", start, time.perf_counter())
        live = tl.end_step()
    tl.close()
    again = step_figures(json.loads(path.read_text()))
    assert len(again) == 3
    # wall-clock microseconds near 1.7e15 keep ~0.25 us of precision in a double
    assert live["comm_s"] > 0
    assert again[-1]["comm_s"] == pytest.approx(live["comm_s"], abs=2e-6)
    assert again[-1]["exposed_s"] == pytest.approx(live["exposed_s"], abs=2e-6)


def test_merge_aligns_ranks_on_clock_sync_and_the_cli_runs(tmp_path):
    class FakeComm:
        def barrier(self):
            pass

    paths = []
    for rank in range(2):
        tl = Timeline(str(tmp_path / f"r{rank}.json"), rank=rank)
        tl._anchor += rank * 5.0          # rank 1's clock runs 5 s ahead
        tl.sync(FakeComm())
        tl.record("forward", "forward", 10.0, 11.0)
        tl.close()
        paths.append(str(tmp_path / f"r{rank}.json"))
    out = str(tmp_path / "merged.json")
    n = merge(paths, out)
    events = json.loads(open(out).read())
    assert n == len(events)
    fwd = [e for e in events if e.get("name") == "forward"]
    assert {e["pid"] for e in fwd} == {0, 1}
    assert abs(fwd[0]["ts"] - fwd[1]["ts"]) < 1e5     # within 0.1 s after alignment, not 5 s
    res = subprocess.run([sys.executable, "-m", "engine.trace", "merge", str(tmp_path / "m2.json"), *paths],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "merged 2 traces" in res.stdout
    res = subprocess.run([sys.executable, "-m", "engine.trace", "bogus"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "usage" in res.stderr


def test_instrumented_model_records_each_layer_once_per_phase(tmp_path):
    from engine.backend import get_backend
    from engine.loss import softmax_cross_entropy
    from engine.model import build_model
    from engine.trace import instrument

    model = build_model("resnet18", 3, get_backend("cpu"))
    path = tmp_path / "layers.json"
    tl = Timeline(str(path))
    n = instrument(model, tl)
    assert instrument(model, tl) == 0                       # no double wrapping
    x = np.random.default_rng().standard_normal((2, 32, 32, 3)).astype(np.float32)
    tl.begin_step(0)
    _, dlogits = softmax_cross_entropy(model.forward(x, train=True), np.array([0, 2]))
    model.backward(dlogits)
    tl.end_step()
    events = [e for e in json.loads(path.read_text()) if e.get("ph") == "X"]
    fwd = [e["name"][len("forward "):] for e in events if e["cat"] == "forward"]
    bwd = [e["name"][len("backward "):] for e in events if e["cat"] == "backward"]
    param_layers = {name.rsplit(".", 1)[0] for name in model.layout.by_name}
    assert len(fwd) == len(set(fwd)) == n and sorted(fwd) == sorted(bwd)
    assert param_layers <= set(fwd) and {"maxpool", "avgpool"} <= set(fwd)
    assert fwd[0] == "conv1" and fwd[-1] == "fc" and bwd[0] == "fc" and bwd[-1] == "conv1"


# ---- compute spans on a GPU: device events, resolved at end_step --------------------------

class _FakeStream:
    """Device time in seconds, advanced by the test as if kernels ran."""
    def __init__(self):
        self.t = 0.0


class _FakeEvent:
    """A timing event of the stand-in stream; counts host synchronisations."""
    synced = []

    def record(self, stream):
        self.t = stream.t

    def synchronize(self):
        _FakeEvent.synced.append(self)


def test_each_step_renews_the_device_clock_reference_after_converting_what_came_before():
    """begin_step converts the spans recorded since the last step (an evaluation) with the
    old reference, then renews it (NcclCommunicator.rebase_clock), so no span is measured
    from a reference recorded after it."""
    from engine.trace import DeviceClock
    stream, log = _FakeStream(), []

    def host_time(ev):
        log.append(("convert", ev.t))
        return ev.t

    tl = Timeline(None, clock=DeviceClock(_FakeEvent, lambda: stream, host_time, lambda: log.append("rebase")))
    for step in range(3):
        tl.begin_step(step)
        with tl.span("forward", "forward"):
            stream.t += 0.01
        tl.end_step()
        with tl.span("forward eval", "forward"):     # between steps
            stream.t += 0.001
    kinds = [x if x == "rebase" else "convert" for x in log]
    assert kinds == ["rebase"] + 2 * (["convert"] * 4 + ["rebase"]) + ["convert"] * 2, kinds
    for i in (5, 10):                   # the two conversions before a rebase: the evaluation's span
        assert [t for _, t in log[i - 2:i]] == pytest.approx([0.011 * (i // 5) - 0.001, 0.011 * (i // 5)])


def test_device_clock_times_compute_spans_by_events_on_the_comm_clock(tmp_path):
    from engine.trace import DeviceClock
    stream = _FakeStream()
    _FakeEvent.synced = []
    path = tmp_path / "gpu.json"
    tl = Timeline(str(path), clock=DeviceClock(_FakeEvent, lambda: stream, lambda ev: base + ev.t))
    tl.begin_step(4)
    base = time.perf_counter()            # the device clock's zero on the host clock
    with tl.span("forward", "forward"):
        stream.t += 0.010                 # 10 ms of forward kernels, enqueued in no host time
    token = tl.begin("backward", "backward")
    stream.t += 0.020
    tl.end(token)
    tl.record("allreduce b0", "comm", base + 0.015, base + 0.040)   # as NcclWork resolves it
    with tl.span("data wait", "data"):    # host work stays on the host clock
        time.sleep(0.002)
    names = [e.get("name") for e in json.loads(path.read_text())]
    assert "forward" not in names and "data wait" in names, "device spans wait for end_step"
    assert _FakeEvent.synced == []
    figures = tl.end_step()
    assert len(_FakeEvent.synced) == 1 and _FakeEvent.synced[0].t == pytest.approx(0.030)
    stream.t += 10.0                               # well after the step
    with tl.span("forward eval", "forward"):      # after the last step: written by close()
        stream.t += 0.001
    tl.close()
    assert "forward eval" in [e.get("name") for e in json.loads(path.read_text())]
    assert figures["compute_s"] == pytest.approx(0.030)
    assert figures["comm_s"] == pytest.approx(0.025)
    assert figures["exposed_s"] == pytest.approx(0.010)
    events = {e["name"]: e for e in json.loads(path.read_text()) if e.get("ph") == "X"}
    # microseconds near 1.7e15 keep ~0.25 us in a double
    assert events["forward"]["dur"] == pytest.approx(10_000, abs=0.5)
    assert events["backward"]["ts"] - events["forward"]["ts"] == pytest.approx(10_000, abs=0.5)
    assert events["allreduce b0"]["ts"] - events["forward"]["ts"] == pytest.approx(15_000, abs=0.5)
    assert events["data wait"]["dur"] >= 2_000
    again = step_figures(json.loads(path.read_text()))[0]       # the step span covers them all
    assert again["exposed_s"] == pytest.approx(figures["exposed_s"], abs=2e-6)
    assert again["compute_s"] == pytest.approx(figures["compute_s"], abs=2e-6)


class _TickingStream:
    """Every event recorded on it lands 1 ms after the previous one."""
    def __init__(self):
        self.n = 0

    @property
    def t(self):
        self.n += 1
        return self.n * 1e-3


def test_instrumented_layers_are_timed_on_the_device_clock_too(tmp_path):
    from engine.backend import get_backend
    from engine.model import build_model
    from engine.trace import DeviceClock, instrument
    model = build_model("resnet18", 3, get_backend("cpu"))
    stream = _TickingStream()
    _FakeEvent.synced = []
    path = tmp_path / "layers.json"
    tl = Timeline(str(path), clock=DeviceClock(_FakeEvent, lambda: stream, lambda ev: base + ev.t))
    n = instrument(model, tl)
    tl.begin_step(0)
    base = time.perf_counter()
    model.forward(np.random.default_rng().standard_normal((2, 32, 32, 3)).astype(np.float32), train=True)
    assert not [e for e in json.loads(path.read_text()) if e.get("cat") == "forward"]
    tl.end_step()
    layers = [e for e in json.loads(path.read_text()) if e.get("cat") == "forward"]
    assert len(layers) == n and len(_FakeEvent.synced) == 1
    # a start and an end event per layer, each 1 ms after the previous: the layers ran one
    # after another, 1 ms each, in the order of the calls
    layers.sort(key=lambda e: e["ts"])
    assert [e["dur"] for e in layers] == pytest.approx([1000] * n, abs=0.5)
    assert layers[-1]["ts"] - layers[0]["ts"] == pytest.approx(2000 * (n - 1), abs=0.5)
    assert layers[0]["name"] == "forward conv1" and layers[-1]["name"] == "forward fc"


def test_a_disabled_timeline_records_and_synchronizes_nothing(tmp_path):
    from engine.trace import DeviceClock

    def no_event():
        raise AssertionError("a disabled timeline made an event")
    tl = Timeline(None, enabled=False, clock=DeviceClock(no_event, lambda: None, lambda ev: 0.0))
    tl.begin_step(0)
    with tl.span("forward", "forward"):
        pass
    tl.end(tl.begin("backward", "backward"))
    tl.record("allreduce b0", "comm", 0.0, 1.0)
    assert tl.end_step() is None
    with pytest.raises(ValueError, match="enabled"):
        Timeline(str(tmp_path / "t.json"), enabled=False)
