"""Per-rank timeline of a training step, as Chrome trace JSON, and its overlap figures.

    tl = Timeline("runs/trace.rank0.json", rank=0)
    instrument(model, tl)       # optional: a forward and a backward span per layer
    tl.begin_step(step)
    with tl.span("forward", "forward"): ...
    tl.record("allreduce b3", "comm", work.started_at, work.finished_at, {"bucket": 3})
    figures = tl.end_step()     # compute, comm, exposed comm, hidden fraction of this step

The file is a JSON array of trace events that Perfetto and chrome://tracing open. Each
event is written together with the closing bracket in one positioned write, so the file is
valid JSON after every event: a crashed or still-running job leaves a readable trace.
Times are wall-clock microseconds (from perf_counter, anchored once to time.time()), so
traces of ranks on one node line up; `merge` also aligns ranks on their "clock_sync" event
(recorded right after a barrier) when every trace has one.

Categories: "forward", "backward", "update" count as compute; "comm" is an all-reduce,
from the moment it ran to its completion; "data" and "wait" are the loader and the main
thread blocked on communication.

On a GPU the host only enqueues work, so a compute span timed on the host says when the
work was issued, not when it ran. With a `DeviceClock` the compute spans are timed by CUDA
events on the compute stream instead, and resolved at `end_step` after one synchronize,
onto the host clock through the communicator's reference event: the very conversion the
all-reduce spans get (engine.comm.NcclCommunicator.host_time), so both kinds of span
share one clock and their overlap means what it says. "data", "wait" and "step" stay host
times: they are what the host did. Per step:

    compute  = length of the union of compute spans
    comm     = length of the union of comm spans
    exposed  = length of comm time not covered by any compute span
    hidden   = (comm - exposed) / comm          (1 = all communication hidden)

`bench/overlap.py` also measures the design's hidden fraction from whole-step times,
(serial - overlapped) / comm; docs/overlap.md, "Reading the overlap figures", explains both.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager

COMPUTE = frozenset({"forward", "backward", "update"})
COMM = frozenset({"comm"})
# One track (Chrome "thread") per kind of work, so spans of a rank never overlap on a track.
_TRACKS = {"data": 0, "forward": 1, "backward": 1, "update": 1, "wait": 1, "step": 2, "comm": 3}
_TRACK_NAMES = {0: "data", 1: "compute", 2: "steps", 3: "communication"}
_TAIL = b"\n]\n"


def _union(intervals):
    """Sorted, merged copy of [(start, end), ...]."""
    merged = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return merged


def _length(intervals) -> float:
    return sum(e - s for s, e in intervals)


def _uncovered(a, b) -> float:
    """Length of union(a) not covered by union(b)."""
    a, b = _union(a), _union(b)
    total, j = 0.0, 0
    for s, e in a:
        cur = s
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e:
            if b[k][0] > cur:
                total += b[k][0] - cur
            cur = max(cur, b[k][1])
            k += 1
        if cur < e:
            total += e - cur
    return total


def overlap_figures(spans) -> dict:
    """compute/comm/exposed seconds and hidden fraction of [(cat, start, end), ...]."""
    compute = [(s, e) for c, s, e in spans if c in COMPUTE]
    comm = [(s, e) for c, s, e in spans if c in COMM]
    comm_time = _length(_union(comm))
    exposed = _uncovered(comm, compute)
    return {"compute_s": _length(_union(compute)), "comm_s": comm_time, "exposed_s": exposed,
            "hidden_fraction": (comm_time - exposed) / comm_time if comm_time > 0 else float("nan")}


class DeviceClock:
    """Times compute spans with events on the stream compute runs on (see the module docstring).

    new_event() -> an unrecorded timing event (cupy.cuda.Event); stream() -> the compute
    stream (recorded on explicitly: CuPy 14.2's Event.record(None) takes the thread's current
    stream, though its docstring says the null stream);
    host_time(event) -> perf_counter seconds of a completed event; rebase() -> None, called
    at each step's start, when every event recorded so far has been converted, renews the
    reference host_time measures from (engine.comm.NcclCommunicator.rebase_clock)."""

    def __init__(self, new_event, stream, host_time, rebase=lambda: None):
        self._new_event, self._stream, self.host_time, self.rebase = new_event, stream, host_time, rebase

    def mark(self):
        event = self._new_event()
        event.record(self._stream())
        return event


class Timeline:
    """Records spans of one rank; writes them to `path` (None: keep figures only).

    enabled=False: records nothing, end_step() returns None, nothing ever synchronizes; the
    trainer's timeline without --trace. clock: a DeviceClock times compute spans on a GPU;
    None times everything on the host (right on a CPU, where work runs as it is issued)."""

    def __init__(self, path: str | None = None, rank: int = 0, *, enabled: bool = True, clock=None):
        if path is not None and not enabled:
            raise ValueError(f"timeline: a trace file ({path}) needs enabled=True")
        self.rank, self.enabled, self._clock = rank, enabled, clock
        self._deferred: list[tuple] = []   # device-timed spans waiting for end_step
        self._anchor = time.time() - time.perf_counter()
        self._fd = None
        self._end = 0                      # file offset of the closing bracket
        self._step = None
        self._step_start = None
        self._spans: list[tuple[str, float, float]] = []
        self._open: dict[int, tuple] = {}
        self._tokens = 0
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(self._fd, b"[" + _TAIL)
            self._end = 1
            self._first = True
            self._emit({"name": "process_name", "ph": "M", "pid": rank, "tid": 0,
                        "args": {"name": f"rank {rank}"}})
            for tid, name in _TRACK_NAMES.items():
                self._emit({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid,
                            "args": {"name": name}})
        self.path = path

    # -- writing ---------------------------------------------------------------------------
    def _emit(self, event: dict) -> None:
        if self._fd is None:
            return
        body = json.dumps(event, separators=(",", ":")).encode()
        data = (b"\n" if self._first else b",\n") + body + _TAIL
        os.pwrite(self._fd, data, self._end)       # event and closing bracket in one write
        self._end += len(data) - len(_TAIL)
        self._first = False

    def _us(self, t: float) -> float:
        return round((t + self._anchor) * 1e6, 3)

    # -- recording -------------------------------------------------------------------------
    def record(self, name: str, cat: str, start: float, end: float, args: dict | None = None) -> None:
        """A finished span; start/end are time.perf_counter() seconds."""
        if not self.enabled:
            return
        self._spans.append((cat, start, end))
        event = {"name": name, "cat": cat, "ph": "X", "ts": self._us(start),
                 "dur": round((end - start) * 1e6, 3), "pid": self.rank, "tid": _TRACKS.get(cat, 1)}
        if args:
            event["args"] = args
        self._emit(event)

    def _on_device(self, cat: str) -> bool:
        return self._clock is not None and cat in COMPUTE

    def _now(self, cat: str):
        return self._clock.mark() if self._on_device(cat) else time.perf_counter()

    @contextmanager
    def span(self, name: str, cat: str, args: dict | None = None):
        token = self.begin(name, cat, args)
        try:
            yield
        finally:
            self.end(token)

    def begin(self, name: str, cat: str, args: dict | None = None) -> int:
        """Open a span; returns the token that `end` takes (for code that cannot use `with`)."""
        if not self.enabled:
            return 0
        self._tokens += 1
        self._open[self._tokens] = (name, cat, self._now(cat), args)
        return self._tokens

    def end(self, token: int) -> None:
        if not self.enabled:
            return
        name, cat, start, args = self._open.pop(token)
        if self._on_device(cat):
            self._deferred.append((name, cat, start, self._clock.mark(), args))
        else:
            self.record(name, cat, start, time.perf_counter(), args)

    def _resolve(self) -> None:
        """Device-timed spans onto the host clock. Compute runs on one stream, so the span
        that ended last completes last: one synchronize on its end event covers them all."""
        if not self._deferred:
            return
        self._deferred[-1][3].synchronize()
        host_time = self._clock.host_time
        for name, cat, start, end, args in self._deferred:
            self.record(name, cat, host_time(start), host_time(end), args)
        self._deferred = []

    def instant(self, name: str, args: dict | None = None) -> None:
        event = {"name": name, "ph": "i", "s": "p", "ts": self._us(time.perf_counter()),
                 "pid": self.rank, "tid": 2}
        if args:
            event["args"] = args
        self._emit(event)

    def sync(self, comm) -> None:
        """Barrier, then a "clock_sync" mark that `merge` aligns ranks on."""
        comm.barrier()
        self.instant("clock_sync")

    # -- steps -----------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        if not self.enabled:
            return
        self._resolve()          # spans recorded between steps (an evaluation) go to the file
        if self._clock is not None:
            self._clock.rebase()
        self._step, self._step_start = step, time.perf_counter()
        self._spans = []

    def end_step(self) -> dict | None:
        """This step's overlap figures (also written to the trace as counters); None when
        the timeline is disabled."""
        if not self.enabled:
            return None
        self._resolve()
        # A device span's host time can trail the synchronize's return by the reference
        # event's own host latency: the step span covers its spans all the same.
        end = max([time.perf_counter()] + [e for _, _, e in self._spans])
        figures = overlap_figures(self._spans)
        figures["step"] = self._step
        figures["step_s"] = end - self._step_start
        self.record(f"step {self._step}", "step", self._step_start, end)
        self._spans = []
        self._emit({"name": "overlap", "ph": "C", "ts": self._us(end), "pid": self.rank,
                    "args": {"comm_ms": figures["comm_s"] * 1e3, "exposed_ms": figures["exposed_s"] * 1e3}})
        return figures

    def close(self) -> None:
        if self.enabled:
            self._resolve()      # spans after the last step (the final evaluation)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _timed(fn, timeline, name, cat):
    def timed(*args, **kwargs):
        with timeline.span(name, cat):
            return fn(*args, **kwargs)
    return timed


def _model_layers(obj, seen):
    """Every engine.layers.Layer reachable from the model's attributes, lists included."""
    from engine.layers import Layer
    for value in vars(obj).values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, Layer):
                if id(item) not in seen:
                    seen.add(id(item))
                    yield item
            elif type(item).__module__ == "engine.model" and id(item) not in seen:
                seen.add(id(item))
                yield from _model_layers(item, seen)


def instrument(model, timeline) -> int:
    """Record a "forward NAME" / "backward NAME" span for every layer of `model` (wrapping
    each layer's methods on the instance; the model's code is unchanged). Returns the
    number of layers instrumented; calling it again does nothing."""
    count = 0
    for layer in _model_layers(model, set()):
        if getattr(layer, "_timeline", None) is not None:
            continue
        layer._timeline = timeline
        layer.forward = _timed(layer.forward, timeline, f"forward {layer.name}", "forward")
        layer.backward = _timed(layer.backward, timeline, f"backward {layer.name}", "backward")
        count += 1
    return count


def format_figures(f: dict) -> str:
    """One log line of a step's overlap figures."""
    return (f"step {f['step']}: step {f['step_s'] * 1e3:.1f} ms, compute {f['compute_s'] * 1e3:.1f} ms, "
            f"comm {f['comm_s'] * 1e3:.1f} ms, exposed comm {f['exposed_s'] * 1e3:.1f} ms, "
            f"hidden {f['hidden_fraction']:.0%}")


def load(path: str) -> list:
    with open(path) as f:
        return json.load(f)


def merge(paths, out: str) -> int:
    """Merge per-rank traces into one file; ranks are shifted so their clock_sync marks agree
    (when all have one). Returns the number of events written."""
    traces = [load(p) for p in paths]
    syncs = [next((e["ts"] for e in t if e.get("name") == "clock_sync"), None) for t in traces]
    if all(s is not None for s in syncs):
        ref = syncs[0]
        for t, s in zip(traces, syncs):
            for e in t:
                if "ts" in e:
                    e["ts"] = round(e["ts"] + (ref - s), 3)
    events = [e for t in traces for e in t]
    with open(out, "w") as f:
        json.dump(events, f, separators=(",", ":"))
    return len(events)


def step_figures(events) -> list:
    """Overlap figures of every step of one rank's trace (what end_step computed)."""
    steps = sorted((e for e in events if e.get("cat") == "step"), key=lambda e: e["ts"])
    spans = [(e["cat"], e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6)
             for e in events if e.get("ph") == "X" and e.get("cat") != "step"]
    out, slack = [], 1e-6     # the file's microseconds near 1.7e15 keep ~0.25 us: a span
    for st in steps:          # that ends the step may round to just past it
        lo, hi = st["ts"] / 1e6, (st["ts"] + st["dur"]) / 1e6
        figures = overlap_figures([s for s in spans if s[1] >= lo - slack and s[2] <= hi + slack])
        figures["step"] = st["name"].split()[-1]
        figures["step_s"] = hi - lo
        out.append(figures)
    return out


def main(argv=None) -> int:
    """python -m engine.trace merge OUT IN... | figures TRACE"""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 3 and argv[0] == "merge":
        n = merge(argv[2:], argv[1])
        print(f"merged {len(argv) - 2} traces, {n} events -> {argv[1]}")
        return 0
    if len(argv) == 2 and argv[0] == "figures":
        for f in step_figures(load(argv[1])):
            print(format_figures(f))
        return 0
    usage = ("usage: python -m engine.trace merge OUT.json RANK0.json RANK1.json ...\n"
             "       python -m engine.trace figures RANK.json\n\n"
             "merge: the per-rank traces of a --trace run into one file (chrome://tracing, Perfetto),\n"
             "       the ranks' clocks lined up on their common sync mark;\n"
             "figures: each step's compute, communication and exposed-communication times.")
    if argv in (["-h"], ["--help"]):
        print(usage)
        return 0
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
