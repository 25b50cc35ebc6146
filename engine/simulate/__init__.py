"""A discrete-event model of one data-parallel training step, from 1 to thousands of devices.

    python -m engine.simulate --preset seed                       # the paper's 1024 P100s
    python -m engine.simulate --preset dgx-h100 --gpus 8,64,512,4096 --bucket-mb 0,4,25
    python -m engine.simulate --trace runs/predict.rank0.json --arch resnet50 --classes 10 \\
        --batch 8 --intra-alpha-us 60 --intra-gbs 2 --gpus 2 --per-node 2
    python -m engine.simulate --study docs/simulate.png          # docs/overlap.md, "Overlap at scale"

(core model here; the command line in cli.py, the study of docs/overlap.md in study.py)

It uses the engine's own pieces, never a copy: the model's flat layout (`ResNet.layout`,
each layer's `grad_range`) and the reducer's bucket planner (`engine.reducer.plan_buckets`);
its simulated step is written in `engine.trace`'s Chrome trace format, so
`python -m engine.trace figures` and Perfetto read it like a measured one.

Compute profile (per layer, in forward order; backward runs it in reverse, which is the
flat layout's order), from either
  * a measured trace with per-layer spans (`engine.trace.instrument`): each layer's time is
    from the end of the previous layer's span to the end of its own (so the glue between
    layers, e.g. the residual add, is kept), median over the trace's compute-only steps,
    scaled together so that forward + backward + the rest + update is the median step; or
  * an analytical roofline from the real layer shapes (`layer_costs`), per op and direction
        t = max(flops / peak, bytes / mem_bw) / efficiency + overhead
    with `efficiency` calibrated so that one device at the calibration batch runs at the
    measured images/s (`calibrate`):
        efficiency = (sum_ops max(flops/peak, bytes/mem_bw) + elements*UPDATE_BYTES/mem_bw)
                     / (batch/ips - n_ops*overhead)
Optimizer update: update_s = elements * UPDATE_BYTES / mem_bw / efficiency per bucket.

All-reduce of n bytes over p = g*m ranks (g per node, m nodes), each link level an
alpha (seconds per message step) and a bandwidth B (bytes/s; between nodes: a node's
total, i.e. all of its NICs); inside one node (m = 1) alpha_i and B_i, else the
slowest level: alpha = alpha_e, B = min(B_i, B_e) (`allreduce_s`):
    ring          2(p-1) alpha + 2 (p-1)/p n / B
    tree          2 ((g-1) alpha_i + ceil(log2 m) alpha_e) + 2 n / B
                  (NCCL's double binary tree: a chain inside each node, two binary trees
                  over nodes each carrying half, pipelined: reduce up, broadcast down)
    hierarchical  2 ((g-1) alpha_i + (g-1)/g n / B_i)            reduce-scatter + all-gather in the node
                  + 2(m-1) alpha_e + 2 (m-1)/m n / B_e          g rings of n/g bytes across nodes
                                                                sharing the node's B_e

Step schedule (`schedule`): a compute stream (forward layers, backward layers, then one
update per bucket, each after its bucket landed) and one communication stream. Bucket k
starts at max(its last gradient ready, bucket k-1 done); a conv or fc reports its gradients
halfway through its backward, after dW and before dx (`ready_fraction`), the stem conv and
the other layers at the end of theirs. With contention (a CPU's
communication thread shares the cores that compute): while both streams are busy,
compute advances at rate 1/(1+contention) and communication at 1/(1+comm_contention).
Data loading runs ahead in worker processes: the step takes at least
batch * decode_s / workers.

Outputs per configuration (`simulate`): step time, compute-only time, serial step,
exposed communication, hidden(trace) = (comm - exposed)/comm and
hidden(steps) = (serial - overlapped)/(serial - compute) as bench/overlap.py defines them,
images/s, scaling efficiency = compute-only step / step (per-device throughput against one
device), time to train = epochs * images / (images/s).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace

from engine.conv import out_size
from engine.reducer import plan_buckets

UPDATE_BYTES = 28      # hybrid update per element: read w, g, m, d; write w, m, d (float32)
DTYPE_BYTES = {"fp32": 4, "fp16": 2}
ALGOS = ("ring", "tree", "hier")


# ------------------------------------------------------------------------ systems ------

@dataclass(frozen=True)
class Link:
    alpha_s: float          # per message step
    bandwidth: float        # bytes/s, one direction

    def __post_init__(self):
        if not (self.alpha_s >= 0 and self.bandwidth > 0):
            raise ValueError(f"link: alpha must be >= 0 s and bandwidth > 0 B/s, got alpha={self.alpha_s}, "
                             f"bandwidth={self.bandwidth}")


@dataclass(frozen=True)
class Device:
    name: str
    peak: dict              # FLOP/s per compute precision
    mem_bw: float           # bytes/s


@dataclass(frozen=True)
class System:
    device: Device
    precision: str          # compute precision ("fp32" or "fp16" mixed)
    per_node: int           # devices per node
    intra: Link
    inter: Link
    calib_ips: float        # one device's measured training images/s ...
    calib_batch: int        # ... at this batch, 224 px
    gpus: int = 8
    batch: int = 32
    algo: str = "ring"
    wire: str = "fp16"
    overhead_s: float = 10e-6   # per op and direction (launch and framework), an assumption
    decode_s: float = 5e-3      # per image per loader worker, an assumption
    workers: int = 4            # loader workers per device
    sources: str = ""


GB = 1e9
P100_PCIE = Device("Tesla P100 PCIe 16GB", {"fp32": 9.3e12, "fp16": 18.7e12}, 732 * GB)
V100_SXM2 = Device("Tesla V100 SXM2", {"fp32": 15.7e12, "fp16": 125e12}, 900 * GB)
A100_SXM4 = Device("A100 SXM4 80GB", {"fp32": 19.5e12, "fp16": 312e12}, 2039 * GB)
H100_SXM5 = Device("H100 SXM5", {"fp32": 67e12, "fp16": 989e12}, 3350 * GB)

PRESETS = {
    "seed": System(
        P100_PCIE, "fp32", 8, Link(5e-6, 10 * GB), Link(5e-6, 2 * 56e9 / 8 * 64 / 66),
        calib_ips=200, calib_batch=32, gpus=1024, batch=32, algo="ring", wire="fp16", workers=2,
        sources="Akiba, Suzuki, Fukuda 2017 and PFN's MN-1 description (tech.preferred.jp, 'MN-1: "
                "a GPU cluster behind 15-min ImageNet'): 128 nodes x 8 P100 (4.7 TFLOPS FP64 each, "
                "i.e. the PCIe card), two FDR InfiniBand links (56 Gb/s each, 64b/66b coding) per "
                "node, ring all-reduce, FP16 gradients, FP32 compute, 32 images/GPU. P100 PCIe data "
                "sheet: 9.3 TFLOPS FP32, 18.7 FP16, 732 GB/s HBM2. ASSUMED: PCIe gen3 between GPUs "
                "at 10 GB/s effective, 5 us per message step, 200 images/s per P100 (FP32, batch "
                "32), 2 loader workers per GPU (2x 8-core Xeon per node) at 5 ms per image, the "
                "thin-tree switch layout ignored."),
    "dgx1-v100": System(
        V100_SXM2, "fp16", 8, Link(3e-6, 150 * GB), Link(5e-6, 4 * 100e9 / 8),
        calib_ips=1200, calib_batch=256, gpus=64, batch=256,
        sources="DGX-1 (V100) data sheet: 8x V100 SXM2 with NVLink (300 GB/s per GPU both ways), "
                "4x 100 Gb/s EDR InfiniBand per node; V100 data sheet: 15.7 TFLOPS FP32, 125 "
                "tensor, 900 GB/s. ASSUMED: 1200 images/s per V100 (mixed precision, batch 256), "
                "3 us (NVLink) and 5 us (IB) per message step, 4 loader workers at 5 ms/image."),
    "dgx-a100": System(
        A100_SXM4, "fp16", 8, Link(3e-6, 300 * GB), Link(5e-6, 8 * 200e9 / 8),
        calib_ips=2500, calib_batch=256, gpus=64, batch=256, workers=16,
        sources="DGX A100 data sheet: 8x A100 80GB, NVLink 600 GB/s per GPU both ways, 8x 200 "
                "Gb/s HDR InfiniBand for compute; A100 data sheet: 19.5 TFLOPS FP32, 312 FP16 "
                "tensor, 2039 GB/s. ASSUMED: 2500 images/s per A100 (mixed precision, batch 256), "
                "3/5 us per message step, 16 loader workers per GPU (128 cores) at 5 ms/image."),
    "dgx-h100": System(
        H100_SXM5, "fp16", 8, Link(3e-6, 450 * GB), Link(5e-6, 8 * 400e9 / 8),
        calib_ips=3000, calib_batch=256, gpus=64, batch=256, workers=14,
        sources="DGX H100 data sheet: 8x H100 SXM5, NVLink 900 GB/s per GPU both ways, 8x 400 "
                "Gb/s NDR InfiniBand; H100 SXM data sheet: 67 TFLOPS FP32, 989 FP16 tensor "
                "(dense), 3.35 TB/s. ASSUMED: 3000 images/s per H100 (mixed precision, batch 256), "
                "3/5 us per message step, 14 loader workers per GPU (112 cores) at 5 ms/image."),
}


def preset(name: str) -> System:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


# ------------------------------------------------------------------ communication ------

def allreduce_s(nbytes: float, ranks: int, per_node: int, intra: Link, inter: Link,
                algo: str = "ring") -> tuple[float, float]:
    """(latency part, bandwidth part) of one all-reduce of `nbytes`; formulas in the module
    docstring. Ranks fill nodes of `per_node` devices."""
    if algo not in ALGOS:
        raise ValueError(f"unknown all-reduce algorithm {algo!r}; choose one of {', '.join(ALGOS)}")
    if ranks < 1 or per_node < 1 or (ranks > per_node and ranks % per_node):
        raise ValueError(f"{ranks} ranks do not fill nodes of {per_node} devices")
    p = ranks
    if p == 1:
        return 0.0, 0.0
    g, m = min(p, per_node), max(1, p // per_node)
    alpha, bw = (intra.alpha_s, intra.bandwidth) if m == 1 else (inter.alpha_s, min(intra.bandwidth, inter.bandwidth))
    if algo == "ring" or (algo == "hier" and m == 1):
        return 2 * (p - 1) * alpha, 2 * (p - 1) / p * nbytes / bw
    if algo == "tree":
        return 2 * ((g - 1) * intra.alpha_s + math.ceil(math.log2(m)) * inter.alpha_s), 2 * nbytes / bw
    lat = 2 * (g - 1) * intra.alpha_s + 2 * (m - 1) * inter.alpha_s
    return lat, 2 * (g - 1) / g * nbytes / intra.bandwidth + 2 * (m - 1) / m * nbytes / inter.bandwidth


def ring_link_from_fit(a: float, b: float, ranks: int) -> Link:
    """The link of a one-node ring whose all-reduce of n bytes takes a + b n seconds, as
    fitted by bench/overlap.py --predict: 2(p-1) alpha = a, 2(p-1)/p / B = b."""
    if ranks < 2 or b <= 0:
        raise ValueError(f"a ring fit needs >= 2 ranks and a positive slope, got {ranks} ranks, b={b}")
    return Link(max(0.0, a) / (2 * (ranks - 1)), 2 * (ranks - 1) / ranks / b)


# ------------------------------------------------------------------------ profiles ------

@dataclass(frozen=True)
class LayerTime:
    name: str
    forward_s: float
    backward_s: float
    grad: tuple | None      # (start, stop) in the flat layout, None for layers without parameters
    ready_frac: float = 1.0  # share of backward_s done when the layer reports its gradients


def ready_fraction(layer, model) -> float:
    """A conv or fc reports its gradients once dW is final, before it computes dx
    (engine.layers): dW and dx are GEMMs of the same FLOPs, so half its backward. The stem
    conv computes no dx, and a batch norm reports at its end."""
    from engine.layers import Conv2d, Linear
    return 0.5 if isinstance(layer, (Conv2d, Linear)) and layer is not model.conv1 else 1.0


@dataclass(frozen=True)
class Profile:
    layers: tuple           # LayerTime in forward order
    layout: object          # the model's FlatLayout
    update_s_per_elem: float
    batch: int
    source: str
    other_s: float = 0.0    # compute outside the layers (loss, glue around the passes), run before backward


def _model(arch: str, classes: int):
    """The engine's real ResNet (zeroed buffers, never run): its layers and flat layout."""
    from engine.backend import get_backend
    from engine.model import ResNet
    return ResNet(arch, classes, get_backend("cpu"), threads=1)


def forward_layers(model) -> list:
    """[(layer, role)] in the order ResNet.forward runs them (in each block the main branch,
    then the downsample branch); backward runs them in reverse. role: "block" for a block's
    first conv, "shortcut" for its downsample conv (both read the block's input), else None."""
    layers = [(model.conv1, None), (model.bn1, None), (model.maxpool, None)]
    for block in model.blocks:
        layers += [(layer, "block" if i == 0 else None) for i, layer in enumerate(block.main)]
        layers += [(layer, "shortcut" if i == 0 else None) for i, layer in enumerate(block.downsample)]
    return layers + [(model.avgpool, None), (model.fc, None)]


def layer_costs(model, px: int, batch: int, nbytes: int) -> list:
    """[(layer, (flops, bytes) forward, (flops, bytes) backward)] in forward order, from the
    real shapes at `px` x `px` input and `batch` images, activations of `nbytes` bytes.
    Counts (e = elements of the activation, w = weight elements):
      conv    fwd 2 N Ho Wo K^2 Cin Cout flops, bytes of x + y + w; bwd twice the flops
              (dW and dx; the stem has no dx), bytes of x, dy, w, dW (+ dx)
      BN      fwd 8e flops, 3e bytes (two reads, one write); bwd 12e flops, 5e bytes
      pools   max 3x3: 9 e_out flops each way, avg: e_in; bytes of x + y each way
      fc      fwd 2 N Cin Cout flops, bytes of x + w + y; bwd twice the flops, x, dy, w, dW, dx."""
    from engine.layers import BatchNorm, Conv2d, GlobalAvgPool, Linear, MaxPool
    out, hwc, block_in = [], (px, px, 3), None
    for layer, role in forward_layers(model):
        if role == "block":
            block_in = hwc
        elif role == "shortcut":
            hwc = block_in
        h, w, c = hwc
        e_in = batch * h * w * c
        if isinstance(layer, (Conv2d, MaxPool)):
            ho, wo = out_size(h, layer.k, layer.stride, layer.pad), out_size(w, layer.k, layer.stride, layer.pad)
            cout = layer.cout if isinstance(layer, Conv2d) else c
            e_out = batch * ho * wo * cout
            if isinstance(layer, Conv2d):
                wts = layer.k * layer.k * c * cout
                fl = 2.0 * e_out * layer.k * layer.k * c
                dx = 0 if layer is model.conv1 else 1
                fwd = (fl, nbytes * (e_in + e_out + wts))
                bwd = (fl * (1 + dx), nbytes * (e_in * (1 + dx) + e_out + 2 * wts))
            else:
                fwd = bwd = (9.0 * e_out, nbytes * (e_in + e_out))
            hwc = (ho, wo, cout)
        elif isinstance(layer, BatchNorm):
            fwd, bwd = (8.0 * e_in, 3 * nbytes * e_in), (12.0 * e_in, 5 * nbytes * e_in)
        elif isinstance(layer, GlobalAvgPool):
            fwd = bwd = (float(e_in), nbytes * (e_in + batch * c))
            hwc = (1, 1, c)
        elif isinstance(layer, Linear):
            fl = 2.0 * batch * layer.fin * layer.fout
            io, wts = batch * (layer.fin + layer.fout), layer.fin * layer.fout
            fwd = (fl, nbytes * (io + wts))
            bwd = (2 * fl, nbytes * (io + batch * layer.fin + 2 * wts))
            hwc = (1, 1, layer.fout)
        else:
            raise TypeError(f"layer_costs: no cost model for {type(layer).__name__} {layer.name}")
        out.append((layer, fwd, bwd))
    return out


def _roofline(costs, device: Device, precision: str) -> list:
    """[(layer, forward s, backward s)] at 100% efficiency, no overhead."""
    peak = device.peak[precision]
    return [(layer, max(f[0] / peak, f[1] / device.mem_bw), max(b[0] / peak, b[1] / device.mem_bw))
            for layer, f, b in costs]


def calibrate(system: System, arch: str = "resnet50", classes: int = 1000, px: int = 224) -> float:
    """The efficiency that makes one device run `calib_batch` images at `calib_ips` images/s
    (module docstring); refused when the overheads alone exceed the measured step."""
    model = _model(arch, classes)
    ideal = _roofline(layer_costs(model, px, system.calib_batch, DTYPE_BYTES[system.precision]),
                      system.device, system.precision)
    budget = system.calib_batch / system.calib_ips - 2 * len(ideal) * system.overhead_s
    if budget <= 0:
        raise ValueError(f"calibration: {system.calib_ips} images/s at batch {system.calib_batch} leaves no "
                         f"time for the layers after {2 * len(ideal)} ops x {system.overhead_s} s overhead")
    return (sum(f + b for _, f, b in ideal) + model.layout.total * UPDATE_BYTES / system.device.mem_bw) / budget


def analytic_profile(system: System, arch: str = "resnet50", classes: int = 1000, px: int = 224,
                     batch: int | None = None, efficiency: float | None = None) -> Profile:
    """Per-layer times of `arch` on `system`'s device from the roofline (module docstring)."""
    batch = system.batch if batch is None else batch
    eff = calibrate(system, arch, classes, px) if efficiency is None else efficiency
    model = _model(arch, classes)
    ideal = _roofline(layer_costs(model, px, batch, DTYPE_BYTES[system.precision]), system.device, system.precision)
    layers = tuple(LayerTime(layer.name, f / eff + system.overhead_s, b / eff + system.overhead_s,
                             getattr(layer, "grad_range", None), ready_fraction(layer, model))
                   for layer, f, b in ideal)
    return Profile(layers, model.layout, UPDATE_BYTES / system.device.mem_bw / eff, batch,
                   f"{arch} {px}px, {batch}/device on {system.device.name} ({system.precision}), "
                   f"efficiency {eff:.2f}")


def trace_profile(path: str, arch: str, classes: int = 1000) -> Profile:
    """Per-layer times from a trace this engine wrote with per-layer spans (module
    docstring), median over its steps without communication (all steps if every one has some)."""
    from engine.trace import load
    model = _model(arch, classes)
    layers = [layer for layer, _ in forward_layers(model)]
    names = {layer.name for layer in layers}
    events = [e for e in load(path) if e.get("ph") == "X"]
    per_layer = [e for e in events if e.get("cat") in ("forward", "backward")
                 and e["name"].split(" ", 1)[-1] in names and " " in e["name"]]
    if not per_layer:
        raise ValueError(f"{path}: no per-layer spans of {arch} ('forward conv1', 'backward fc', ...); "
                         "record the trace with engine.trace.instrument(model, timeline)")
    steps = sorted((e for e in events if e.get("cat") == "step"), key=lambda e: e["ts"])
    windows = [(s["ts"], s["ts"] + s["dur"]) for s in steps] or [(-math.inf, math.inf)]
    comm = [e for e in events if e.get("cat") == "comm"]
    quiet = [w for w in windows if not any(w[0] <= e["ts"] < w[1] for e in comm)] or windows
    fwd, bwd, upd, other = {n: [] for n in names}, {n: [] for n in names}, [], []
    for lo, hi in quiet:
        inside = [e for e in per_layer if lo <= e["ts"] and e["ts"] + e["dur"] <= hi]
        step = {}
        for cat, store in (("forward", fwd), ("backward", bwd)):
            spans = sorted((e for e in inside if e["cat"] == cat), key=lambda e: e["ts"])
            prev_end = spans[0]["ts"] if spans else 0.0
            for e in spans:     # from the previous span's end: the glue between layers counts
                key = cat, e["name"].split(" ", 1)[1]     # (a simulated trace splits a backward in two)
                step[key] = step.get(key, 0.0) + (e["ts"] + e["dur"] - prev_end) * 1e-6
                prev_end = e["ts"] + e["dur"]
        for (cat, name), seconds in step.items():
            (fwd if cat == "forward" else bwd)[name].append(seconds)
        upd.append(sum(e["dur"] for e in events if e.get("cat") == "update" and lo <= e["ts"] < hi) * 1e-6)
        if math.isfinite(hi):
            other.append(max(0.0, (hi - lo) * 1e-6 - upd[-1] - sum(step.values())))
    missing = sorted(n for n in names if not fwd[n] or not bwd[n])
    if missing:
        raise ValueError(f"{path}: no forward or backward span for {len(missing)} layer(s) of {arch} "
                         f"(e.g. {missing[0]}): is it a trace of {arch}?")
    fwd_s, bwd_s = ({n: statistics.median(t) for n, t in store.items()} for store in (fwd, bwd))
    other_s, update_s = (statistics.median(other) if other else 0.0), statistics.median(upd)
    # Medians per layer sum to less than the median step when the machine is noisy: scale
    # the compute (not the update) so that the profile's step is the trace's median step.
    steps_s = [(hi - lo) * 1e-6 for lo, hi in quiet if math.isfinite(hi)]
    parts = sum(fwd_s.values()) + sum(bwd_s.values()) + other_s
    k = (statistics.median(steps_s) - update_s) / parts if steps_s else 1.0
    out = tuple(LayerTime(l.name, k * fwd_s[l.name], k * bwd_s[l.name], getattr(l, "grad_range", None),
                          ready_fraction(l, model)) for l in layers)
    return Profile(out, model.layout, update_s / model.layout.total, _trace_batch(events),
                   f"{path} ({arch}, {len(quiet)} step(s), layer medians x{k:.3f} to the median step)", k * other_s)


def _trace_batch(events) -> int:
    """The batch a trace ran at, if one of its events says (bench/overlap.py --predict writes
    it as args.batch of its "clock_sync" mark); else 0 (images/s then unknown)."""
    for e in events:
        batch = (e.get("args") or {}).get("batch")
        if batch:
            return int(batch)
    return 0


# ------------------------------------------------------------------------ schedule ------

@dataclass(frozen=True)
class Task:
    name: str
    cat: str                # engine.trace category: forward, backward, update, comm
    work_s: float           # duration when running alone
    after: int | None = None  # index of the task on the OTHER stream it waits for
    args: dict | None = None


def schedule(compute: list, comm: list, contention: float = 0.0, comm_contention: float = 0.0) -> list:
    """Run two streams of Tasks; returns [(name, cat, start, end, args)], waits included.

    Each stream runs its tasks in order; a task starts when its predecessor on its stream
    ended and, if `after` is set, the named task of the other stream ended. So bucket k's
    all-reduce starts at max(ready, end of bucket k-1). While both streams run, compute
    advances at 1/(1+contention) and communication at 1/(1+comm_contention) of full speed."""
    if contention < 0 or comm_contention < 0:
        raise ValueError(f"contention must be >= 0, got {contention}, {comm_contention}")
    streams = (compute, comm)
    rate_shared = (1 / (1 + contention), 1 / (1 + comm_contention))
    ends = ([None] * len(compute), [None] * len(comm))
    nxt, started, left = [0, 0], [None, None], [0.0, 0.0]
    idle_since = None
    out, t = [], 0.0
    while nxt[0] < len(compute) or nxt[1] < len(comm):
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
            left[s] -= dt * rates[s]
            if left[s] <= 1e-12 * max(1.0, t):
                task = streams[s][nxt[s]]
                ends[s][nxt[s]] = t
                out.append((task.name, task.cat, started[s], t, task.args))
                started[s], nxt[s] = None, nxt[s] + 1
    return out


def buckets_of(profile: Profile, bucket_mb: float, first_bucket_mb: float, itemsize: int) -> list:
    """The reducer's bucket plan on the real layout; bucket_mb=0: one bucket per layer
    with parameters (the reducer's grad_ready ranges)."""
    if bucket_mb == 0:
        return sorted(l.grad for l in profile.layers if l.grad is not None)
    return plan_buckets(profile.layout, bucket_mb, first_bucket_mb, itemsize)


@dataclass(frozen=True)
class Network:
    """How the gradients travel: ranks, their grouping into nodes, the links, the algorithm,
    the wire precision, the reducer's bucket sizes, and contention (module docstring)."""
    ranks: int
    per_node: int
    intra: Link
    inter: Link
    algo: str = "ring"
    wire: str = "fp16"
    bucket_mb: float = 25.0
    first_bucket_mb: float = 1.0
    contention: float = 0.0
    comm_contention: float = 0.0

    @classmethod
    def of(cls, system: System, **changes) -> "Network":
        net = cls(system.gpus, system.per_node, system.intra, system.inter, system.algo, system.wire)
        return replace(net, **changes)


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
    itemsize = DTYPE_BYTES[net.wire]
    comm, updates = [], []
    for i, (a, b) in enumerate(buckets):
        k = len(bwd) - 1 if mode == "serial" else next(j for j, d in enumerate(ready) if d >= b)
        lat, bw = allreduce_s((b - a) * itemsize, net.ranks, net.per_node, net.intra, net.inter, net.algo)
        comm.append(Task(f"allreduce b{i}", "comm", lat + bw, len(fwd) + 1 + k,
                         {"bucket": i, "start": a, "stop": b, "bytes": (b - a) * itemsize,
                          "latency_s": lat, "bandwidth_s": bw}))
        updates.append(Task(f"update b{i}", "update", (b - a) * profile.update_s_per_elem, i, {"bucket": i}))
    return compute + updates, comm


def run_step(profile: Profile, net: Network, mode: str) -> list:
    """The spans [(name, cat, start, end, args)] of one simulated step."""
    buckets = buckets_of(profile, net.bucket_mb, net.first_bucket_mb, DTYPE_BYTES[net.wire])
    compute, comm = step_tasks(profile, buckets, net, mode)
    return schedule(compute, comm, net.contention, net.comm_contention)


def simulate(profile: Profile, net: Network, *, decode_s: float = 0.0, workers: int = 1,
             epochs: float = 90, images: int = 1281167) -> dict:
    """Figures of one configuration (module docstring); times in seconds."""
    from engine.trace import overlap_figures
    if decode_s < 0 or workers < 1:
        raise ValueError(f"decode_s must be >= 0 and workers >= 1, got {decode_s}, {workers}")
    spans = run_step(profile, net, "overlap")
    end = lambda s: max(e for _, _, _, e, _ in s)                       # noqa: E731
    compute_only = end(run_step(profile, net, "compute"))
    serial = end(run_step(profile, net, "serial"))
    load_s = profile.batch * decode_s / workers
    fig = overlap_figures([(c, s, e) for _, c, s, e, _ in spans])
    comms = [a for _, c, _, _, a in spans if c == "comm"]
    step = max(end(spans), load_s)
    latency, bandwidth = sum(a["latency_s"] for a in comms), sum(a["bandwidth_s"] for a in comms)
    if load_s >= end(spans):
        bound = "data"
    elif fig["exposed_s"] < 0.05 * step:
        bound = "compute"
    else:
        bound = "latency" if latency > bandwidth else "bandwidth"
    ips = net.ranks * profile.batch / step
    return {"step_s": step, "compute_s": compute_only, "serial_s": max(serial, load_s),
            "comm_s": fig["comm_s"], "exposed_s": fig["exposed_s"], "hidden_trace": fig["hidden_fraction"],
            "hidden_steps": (serial - end(spans)) / (serial - compute_only) if fig["comm_s"] > 0 else math.nan,
            "latency_s": latency, "bandwidth_s": bandwidth, "load_s": load_s, "buckets": len(comms),
            "images_s": ips, "scaling": max(compute_only, load_s) / step,
            "train_s": epochs * images / ips if ips > 0 else math.nan, "bound": bound}


def write_trace(spans: list, path: str, rank: int = 0) -> None:
    """One simulated step as engine.trace writes a measured one (same tracks and names)."""
    from engine.trace import Timeline
    tl = Timeline(path, rank=rank)
    for name, cat, start, end, args in spans:
        tl.record(name, cat, start, end, args)
    tl.record("step 0", "step", 0.0, max(e for _, _, _, e, _ in spans))
    tl.close()
