"""One data-parallel step as a discrete-event schedule, and its figures.

Step schedule (`schedule`): a compute stream (forward layers, backward layers, then one
update per bucket, each after its bucket landed) and one communication stream. Bucket k
starts at max(its last gradient ready, bucket k-1 done); a conv or fc reports its gradients
halfway through its backward, after dW and before dx (`profiles.ready_fraction`), the stem
conv and the other layers at the end of theirs. Contention: while both streams are busy,
compute advances at rate 1/(1+contention) (on a GPU, NCCL's kernels hold some of the SMs:
`System.contention`; on a CPU, the communication thread shares the cores) and
communication at 1/(1+comm_contention).

The step (`simulate`) is the schedule's end plus the wait for the slowest rank: each
device's compute varies from step to step (coefficient of variation `jitter`) and every
collective waits for the last, so p > 1 ranks pay jitter x compute x sqrt(2 ln p) (about
the expected maximum of p normal draws, in standard deviations). Data loading runs ahead in worker processes and is a
floor: the step takes at least batch x decode_s / workers, where a node's devices share
its CPU cores (each device gets min(workers, node_cores / devices in the node)).

Figures per configuration: step time, compute-only time, serial step, exposed
communication, hidden(trace) = (comm - exposed)/comm and hidden(steps) = (serial -
overlapped)/(serial - compute) as bench/overlap.py defines them, images/s, scaling
efficiency = compute-only step / step (per-device throughput against one device), time to
train = epochs x images / (images/s), the algorithm each bucket ran.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace

from engine.reducer import plan_buckets
from engine.simulate.collectives import allreduce_s
from engine.simulate.profiles import Profile
from engine.simulate.systems import Link, System

WIRE_BYTES = {"fp32": 4, "fp16": 2}


@dataclass(frozen=True)
class Task:
    name: str
    cat: str                # engine.trace category: forward, backward, update, comm
    work_s: float           # duration when running alone
    after: int | None = None  # index of the task on the OTHER stream it waits for
    args: dict | None = None

    def __post_init__(self):
        if not (math.isfinite(self.work_s) and self.work_s >= 0):
            raise ValueError(f"task {self.name}: duration must be finite and >= 0 s, got {self.work_s}")


def schedule(compute: list, comm: list, contention: float = 0.0, comm_contention: float = 0.0) -> list:
    """Run two streams of Tasks; returns [(name, cat, start, end, args)], waits included.

    Each stream runs its tasks in order; a task starts when its predecessor on its stream
    ended and, if `after` is set, the named task of the other stream ended. So bucket k's
    all-reduce starts at max(ready, end of bucket k-1). While both streams run, compute
    advances at 1/(1+contention) and communication at 1/(1+comm_contention) of full speed.
    Every round of the loop ends at least one task, so it runs at most len(compute) +
    len(comm) rounds."""
    if not all(math.isfinite(c) and c >= 0 for c in (contention, comm_contention)):
        raise ValueError(f"contention must be finite and >= 0, got {contention}, {comm_contention}")
    streams = (compute, comm)
    rate_shared = (1 / (1 + contention), 1 / (1 + comm_contention))
    ends = ([None] * len(compute), [None] * len(comm))
    nxt, started, left = [0, 0], [None, None], [0.0, 0.0]
    idle_since = None
    out, t = [], 0.0
    for _ in range(len(compute) + len(comm)):
        if nxt[0] == len(compute) and nxt[1] == len(comm):
            break
        for s in (0, 1):
            if started[s] is None and nxt[s] < len(streams[s]):
                task = streams[s][nxt[s]]
                if task.after is None or ends[1 - s][task.after] is not None:
                    started[s], left[s] = t, task.work_s
                    if s == 0 and idle_since is not None:
                        if t > idle_since:
                            out.append((f"wait b{task.after}", "wait", idle_since, t, {"bucket": task.after}))
                        idle_since = None
        busy = [started[s] is not None for s in (0, 1)]
        if not any(busy):
            raise ValueError("schedule: every stream waits on the other (a task waits for one that never runs)")
        if not busy[0] and idle_since is None and nxt[0] < len(compute):
            idle_since = t
        rates = [rate_shared[s] if all(busy) else 1.0 for s in (0, 1)]
        dt = min(left[s] / rates[s] for s in (0, 1) if busy[s])
        t += dt
        for s in (0, 1):
            if not busy[s]:
                continue
            # the stream that set dt ends exactly; the other ends too if within rounding
            left[s] = 0.0 if left[s] / rates[s] == dt else left[s] - dt * rates[s]
            if left[s] <= 1e-12 * max(1.0, t):
                task = streams[s][nxt[s]]
                ends[s][nxt[s]] = t
                out.append((task.name, task.cat, started[s], t, task.args))
                started[s], nxt[s] = None, nxt[s] + 1
    if nxt != [len(compute), len(comm)]:
        raise RuntimeError(f"schedule: {nxt[0]} of {len(compute)} compute and {nxt[1]} of {len(comm)} "
                           "communication tasks ended after one round per task")
    return out


def buckets_of(profile: Profile, bucket_mb: float, first_bucket_mb: float, itemsize: int) -> list:
    """The reducer's bucket plan on the real layout; bucket_mb=0: one bucket per layer
    with parameters (the reducer's grad_ready ranges)."""
    if bucket_mb == 0:
        return sorted(l.grad for l in profile.layers if l.grad is not None)
    return plan_buckets(profile.layout, bucket_mb, first_bucket_mb, itemsize)


@dataclass(frozen=True)
class Network:
    """How the gradients travel and the ranks meet: ranks, their grouping into nodes, the
    links, the algorithm, the wire precision, the reducer's bucket sizes, the fixed cost of
    a collective, contention, NCCL's channels and the devices' generation
    (collectives.allreduce_s), and the ranks' step-to-step spread (module docstring)."""
    ranks: int
    per_node: int
    intra: Link
    inter: Link
    algo: str = "auto"
    wire: str = "fp16"
    bucket_mb: float = 25.0
    first_bucket_mb: float = 1.0
    contention: float = 0.0
    comm_contention: float = 0.0
    collective_s: float = 0.0
    channels: int = 1
    cc: int = 80
    jitter: float = 0.0

    @classmethod
    def of(cls, system: System, **changes) -> "Network":
        net = cls(system.gpus, system.per_node, system.intra, system.inter, system.algo, system.wire,
                  contention=system.contention, collective_s=system.collective_s,
                  channels=max(1, system.nccl_sms), cc=system.device.cc, jitter=system.jitter)
        return replace(net, **changes)

    def allreduce(self, nbytes: float):
        return allreduce_s(nbytes, self.ranks, self.per_node, self.intra, self.inter, self.algo,
                           fixed_s=self.collective_s, channels=self.channels, cc=self.cc)


def step_tasks(profile: Profile, buckets: list, net: Network, mode: str) -> tuple[list, list]:
    """(compute tasks, comm tasks) of one step in `mode`: "compute" (no communication, one
    update), "serial" (all buckets after backward) or "overlap" (each bucket launched when
    its last gradient is ready); with communication, each bucket is updated after it lands."""
    fwd = [Task(f"forward {l.name}", "forward", l.forward_s) for l in profile.layers]
    bwd, ready, done = [], [], 0     # ready[j]: gradient elements final once task j has run
    for l in reversed(profile.layers):
        # The part of the layer's backward before it reports, then (a conv's or fc's dx) the rest.
        parts = (l.backward_s * l.ready_frac, l.backward_s * (1 - l.ready_frac)) if l.ready_frac < 1 \
            else (l.backward_s,)
        bwd.append(Task(f"backward {l.name}", "backward", parts[0]))
        if l.grad is not None:
            if l.grad[0] != done:
                raise ValueError(f"profile: {l.name}'s gradients [{l.grad[0]}, {l.grad[1]}) do not follow "
                                 f"[0, {done}) in backward order")
            done = l.grad[1]
        ready.append(done)
        for rest in parts[1:]:
            bwd.append(Task(f"backward {l.name}", "backward", rest))
            ready.append(done)
    if done != profile.layout.total:
        raise ValueError(f"profile: backward finishes {done} of {profile.layout.total} gradient elements")
    compute = fwd + [Task("loss", "forward", profile.other_s)] + bwd
    if mode == "compute":
        return compute + [Task("update", "update", profile.layout.total * profile.update_s_per_elem)], []
    if mode not in ("serial", "overlap"):
        raise ValueError(f"unknown mode {mode!r}; choose compute, serial or overlap")
    itemsize = WIRE_BYTES[net.wire]
    comm, updates = [], []
    for i, (a, b) in enumerate(buckets):
        k = len(bwd) - 1 if mode == "serial" else next(j for j, d in enumerate(ready) if d >= b)
        cost = net.allreduce((b - a) * itemsize)
        comm.append(Task(f"allreduce b{i}", "comm", cost.latency_s + cost.bandwidth_s, len(fwd) + 1 + k,
                         {"bucket": i, "start": a, "stop": b, "bytes": (b - a) * itemsize, "algo": cost.algo,
                          "latency_s": cost.latency_s, "bandwidth_s": cost.bandwidth_s}))
        updates.append(Task(f"update b{i}", "update", (b - a) * profile.update_s_per_elem, i, {"bucket": i}))
    return compute + updates, comm


def run_step(profile: Profile, net: Network, mode: str) -> list:
    """The spans [(name, cat, start, end, args)] of one simulated step."""
    buckets = buckets_of(profile, net.bucket_mb, net.first_bucket_mb, WIRE_BYTES[net.wire])
    compute, comm = step_tasks(profile, buckets, net, mode)
    return schedule(compute, comm, net.contention, net.comm_contention)


def loader_workers(workers: int, node_cores: int, ranks: int, per_node: int) -> float:
    """Loader workers one device gets: what it asks for, at most its share of the node's cores."""
    return min(workers, node_cores / min(ranks, per_node))


def simulate(profile: Profile, net: Network, *, decode_s: float = 0.0, workers: int = 1,
             node_cores: int | None = None, epochs: float = 90, images: int = 1281167) -> dict:
    """Figures of one configuration (module docstring); times in seconds. node_cores=None:
    every device has its `workers` to itself."""
    from engine.trace import overlap_figures
    if not (math.isfinite(decode_s) and decode_s >= 0) or workers < 1:
        raise ValueError(f"decode_s must be finite and >= 0 and workers >= 1, got {decode_s}, {workers}")
    spans = run_step(profile, net, "overlap")
    end = lambda s: max(e for _, _, _, e, _ in s)                       # noqa: E731
    compute_only = end(run_step(profile, net, "compute"))
    serial = end(run_step(profile, net, "serial"))
    straggler = net.jitter * compute_only * math.sqrt(2 * math.log(net.ranks))
    per_device = workers if node_cores is None else loader_workers(workers, node_cores, net.ranks, net.per_node)
    load_s = profile.batch * decode_s / per_device
    fig = overlap_figures([(c, s, e) for _, c, s, e, _ in spans])
    comms = [a for _, c, _, _, a in spans if c == "comm"]
    overlapped = end(spans) + straggler
    step = max(overlapped, load_s)
    latency, bandwidth = sum(a["latency_s"] for a in comms), sum(a["bandwidth_s"] for a in comms)
    if load_s >= overlapped:
        bound = "data"
    elif fig["exposed_s"] < 0.05 * step:
        bound = "compute"
    else:
        bound = "latency" if latency > bandwidth else "bandwidth"
    ips = net.ranks * profile.batch / step
    return {"step_s": step, "compute_s": compute_only, "serial_s": max(serial + straggler, load_s),
            "comm_s": fig["comm_s"], "exposed_s": fig["exposed_s"], "hidden_trace": fig["hidden_fraction"],
            "hidden_steps": (serial - end(spans)) / (serial - compute_only) if serial > compute_only else math.nan,
            "latency_s": latency, "bandwidth_s": bandwidth, "straggler_s": straggler, "load_s": load_s,
            "loader_workers": per_device, "buckets": len(comms),
            "algos": dict(sorted(Counter(a["algo"] for a in comms).items())),
            "images_s": ips, "scaling": max(compute_only, load_s) / step,
            "train_s": epochs * images / ips, "bound": bound}


def write_trace(spans: list, path: str, rank: int = 0) -> None:
    """One simulated step as engine.trace writes a measured one (same tracks and names)."""
    from engine.trace import Timeline
    tl = Timeline(path, rank=rank)
    for name, cat, start, end, args in spans:
        tl.record(name, cat, start, end, args)
    tl.record("step 0", "step", 0.0, max(e for _, _, _, e, _ in spans))
    tl.close()
