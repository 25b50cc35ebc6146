"""Per-layer compute times of one step: from a measured trace, or from a roofline of the
real layer shapes calibrated on one (or two) measured single-device throughputs.

Measured (`trace_profile`): a trace with per-layer spans (`engine.trace.instrument`); each
layer's time is from the end of the previous layer's span to the end of its own (so the
glue between layers, e.g. the residual add, is kept), median over the trace's compute-only
steps, scaled together so that forward + backward + the rest + update is the median step.

Analytical (`analytic_profile`), per op and direction, from the real shapes at --px:
    t = max(flops / peak, bytes / mem_bw) x (1 + half_work / outputs) / efficiency + overhead
`outputs` is the op's parallel work, the elements it writes (a backward: its dx, plus its
dy for the dW reduction, which splits over the batch; dW alone would not grow with it): a kernel with fewer threads
than the device holds (sms x 2048) runs its SMs part-empty, and `half_work` is the size at
which it runs at half speed (Hockney's n_1/2), so efficiency falls at small batches.
Every step also costs `step_overhead_s` outside the layers, and the optimizer update
    update_s = elements x UPDATE_BYTES / mem_bw / efficiency.
`efficiency` is calibrated (`calibrate`) so that one device runs the calibration batch at
the calibration size (--calib-px, 224 by default) at the measured images/s; with a second
point (the same device at another batch) `half_work` is solved from the two as well:
    batch_k / ips_k - ops x overhead - step_overhead = x A_k + y B_k     (k = 1, 2)
    A = sum_ops roofline + update,  B = sum_ops roofline / outputs,  efficiency = 1/x,  half_work = y/x.
An efficiency above 1 (a calibration faster than the device's roofline) is refused.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from functools import lru_cache

from engine.conv import out_size
from engine.simulate.systems import ACTIVATION_BYTES, System

UPDATE_BYTES = 28      # hybrid update per element: read w, g, m, d; write w, m, d (float32)


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


@lru_cache(maxsize=8)
def real_model(arch: str, classes: int):
    """The engine's real ResNet (zeroed buffers, never run, never changed, hence shared):
    its layers and flat layout."""
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
    """[(layer, (flops, bytes, outputs) forward, (flops, bytes, outputs) backward)] in forward
    order, from the real shapes at `px` x `px` input and `batch` images, activations of
    `nbytes` bytes; outputs: the op's parallel work (module docstring).
    Counts (e = elements of the activation, w = weight elements):
      conv    fwd 2 N Ho Wo K^2 Cin Cout flops, bytes of x + y + w, writes y; bwd twice the
              flops (dW and dx; the stem has no dx), bytes of x, dy, w, dW (+ dx), work dy (+ dx)
      BN      fwd 8e flops, 3e bytes (two reads, one write); bwd 12e flops, 5e bytes; writes e
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
                fwd = (fl, nbytes * (e_in + e_out + wts), e_out)
                bwd = (fl * (1 + dx), nbytes * (e_in * (1 + dx) + e_out + 2 * wts), e_in * dx + e_out)
            else:
                fwd, bwd = (9.0 * e_out, nbytes * (e_in + e_out), e_out), (9.0 * e_out, nbytes * (e_in + e_out), e_in)
            hwc = (ho, wo, cout)
        elif isinstance(layer, BatchNorm):
            fwd, bwd = (8.0 * e_in, 3 * nbytes * e_in, e_in), (12.0 * e_in, 5 * nbytes * e_in, e_in)
        elif isinstance(layer, GlobalAvgPool):
            io = nbytes * (e_in + batch * c)
            fwd, bwd = (float(e_in), io, batch * c), (float(e_in), io, e_in)
            hwc = (1, 1, c)
        elif isinstance(layer, Linear):
            fl = 2.0 * batch * layer.fin * layer.fout
            io, wts = batch * (layer.fin + layer.fout), layer.fin * layer.fout
            fwd = (fl, nbytes * (io + wts), batch * layer.fout)
            bwd = (2 * fl, nbytes * (io + batch * layer.fin + 2 * wts), io)
            hwc = (1, 1, layer.fout)
        else:
            raise TypeError(f"layer_costs: no cost model for {type(layer).__name__} {layer.name}")
        out.append((layer, fwd, bwd))
    return out


@dataclass(frozen=True)
class Roofline:
    """One step's ops at a batch and image size, at 100% efficiency: per layer (forward s,
    forward outputs, backward s, backward outputs), and the sums the calibration solves with."""
    model: object
    ops: list               # [(layer, forward s, forward outputs, backward s, backward outputs)]
    update_s: float         # the optimizer update at full memory bandwidth

    def sums(self) -> tuple[float, float]:
        """(A, B) of the module docstring: sum of times (update included), sum of time/outputs."""
        a = sum(f + b for _, f, _, b, _ in self.ops) + self.update_s
        return a, sum(f / nf + b / nb for _, f, nf, b, nb in self.ops)


def roofline(system: System, arch: str, classes: int, px: int, batch: int) -> Roofline:
    model = real_model(arch, classes)
    peak, bw = system.peak, system.device.mem_bw
    ops = [(layer, max(f[0] / peak, f[1] / bw), max(1, f[2]), max(b[0] / peak, b[1] / bw), max(1, b[2]))
           for layer, f, b in layer_costs(model, px, batch, ACTIVATION_BYTES[system.precision])]
    return Roofline(model, ops, model.layout.total * UPDATE_BYTES / bw)


def _budget(system: System, roof: Roofline, ips: float, batch: int) -> float:
    """Seconds of one calibration step left for the ops' efficiency-scaled work."""
    return batch / ips - 2 * len(roof.ops) * system.overhead_s - system.step_overhead_s


def calibrate(system: System, arch: str = "resnet50", classes: int = 1000) -> tuple[float, float]:
    """(efficiency, half_work) that make one device run `calib_batch` images of `calib_px`
    at `calib_ips` images/s (and the second point, if given); module docstring. Refused
    when the overheads alone exceed the measured step, or when the throughput is above
    what the device's roofline allows."""
    points = [(system.calib_ips, system.calib_batch)] + ([system.calib2] if system.calib2 else [])
    roofs = [roofline(system, arch, classes, system.calib_px, batch) for _, batch in points]
    budgets = [_budget(system, r, ips, batch) for r, (ips, batch) in zip(roofs, points)]
    for option, (ips, batch), budget, roof in zip(("--calib-ips", "--calib2-ips"), points, budgets, roofs):
        if budget <= 0:
            raise ValueError(f"{option} {ips:g} at batch {batch} is {batch / ips * 1e3:.3g} ms per step, less than "
                             f"the {2 * len(roof.ops)} ops x {system.overhead_s * 1e6:g} us and "
                             f"{system.step_overhead_s * 1e3:g} ms per step of overhead alone")
    (a1, b1), h = roofs[0].sums(), system.half_work_elems
    if system.calib2:
        a2, b2 = roofs[1].sums()
        det = a1 * b2 - a2 * b1
        x = (budgets[0] * b2 - budgets[1] * b1) / det if det else -1.0
        y = (a1 * budgets[1] - a2 * budgets[0]) / det if det else -1.0
        if not (x > 0 and y >= 0):
            raise ValueError(f"--calib2-ips: {system.calib_ips:g} images/s at batch {system.calib_batch} and "
                             f"{system.calib2[0]:g} at batch {system.calib2[1]} do not fit one efficiency with a "
                             "falloff at small batches (per image, the larger batch gains less than the fixed "
                             "per-op and per-step costs alone predict); check --calib2-ips and --calib2-batch")
        eff, h = 1 / x, y / x
    else:
        eff = (a1 + h * b1) / budgets[0]
    if eff > 1:
        ips, batch = points[0]
        best = batch / (batch / ips - budgets[0] + a1 + h * b1)
        raise ValueError(f"--calib-ips {ips:g} is above what {system.device.name} can run ({system.precision}, "
                         f"batch {batch}, {system.calib_px} px): its roofline and the modelled overheads allow at "
                         f"most {best:.0f} images/s; check the device, --precision or --device-tflops")
    return eff, h


def analytic_profile(system: System, arch: str = "resnet50", classes: int = 1000, px: int = 224,
                     batch: int | None = None) -> Profile:
    """Per-layer times of `arch` at `px` on `system`'s device from the calibrated roofline
    (module docstring)."""
    batch = system.batch if batch is None else batch
    eff, h = calibrate(system, arch, classes)
    roof = roofline(system, arch, classes, px, batch)
    layers = tuple(LayerTime(layer.name, f * (1 + h / nf) / eff + system.overhead_s,
                             b * (1 + h / nb) / eff + system.overhead_s,
                             getattr(layer, "grad_range", None), ready_fraction(layer, roof.model))
                   for layer, f, nf, b, nb in roof.ops)
    return Profile(layers, roof.model.layout, UPDATE_BYTES / system.device.mem_bw / eff, batch,
                   f"{arch} {px}px, {batch}/device on {system.device.name} ({system.precision}), efficiency "
                   f"{eff:.2f} and half speed at {h:.3g} outputs per op (calibrated at {system.calib_px} px)",
                   system.step_overhead_s)


def trace_profile(path: str, arch: str, classes: int = 1000) -> Profile:
    """Per-layer times from a trace this engine wrote with per-layer spans (module
    docstring), median over its steps without communication (all steps if every one has some)."""
    model = real_model(arch, classes)
    layers = [layer for layer, _ in forward_layers(model)]
    names = {layer.name for layer in layers}
    events = [e for e in _load_trace(path) if e.get("ph") == "X"]
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


def _load_trace(path: str) -> list:
    """The trace's events; a file that is not a JSON list of events is refused by name."""
    from engine.trace import load
    try:
        events = load(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"--trace {path}: not a JSON trace ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"--trace {path}: not a JSON trace (not UTF-8 text)") from None
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise ValueError(f"--trace {path}: not a trace (a JSON list of events, as engine.trace writes)")
    return events


def _trace_batch(events) -> int:
    """The batch a trace ran at, if one of its events says (bench/overlap.py --predict writes
    it as args.batch of its "clock_sync" mark); else 0 (images/s then unknown)."""
    for e in events:
        batch = (e.get("args") or {}).get("batch")
        if batch:
            return int(batch)
    return 0


