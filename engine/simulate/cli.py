"""The command line of engine.simulate (the package's and its modules' docstrings are the help).

Every number is checked where it is parsed: one line naming the option and the range it
accepts, exit status 2; anything accepted runs in bounded time (a schedule has one round
per task)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import replace

import engine.simulate as sim
from engine.model import ARCHS
from engine.simulate import collectives, profiles, step
from engine.simulate.collectives import ALGOS
from engine.simulate.profiles import analytic_profile, trace_profile
from engine.simulate.report import bucket_label, json_report, plot, table
from engine.simulate.step import WIRE_BYTES, Network, run_step, simulate, write_trace
from engine.simulate.systems import GB, PRECISIONS, PRESETS, Device, Link, System

MAX_RANKS = 1 << 20
MAX_BATCH = 1 << 16


def _read(text: str, lo: float, hi: float, integer: bool, open_lo: bool):
    """The number `text` says if it is finite and in range, else None."""
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        return None
    ok = math.isfinite(value) and (value > lo if open_lo else value >= lo) and value <= hi
    return value if ok else None


def _range(lo: float, hi: float, integer: bool, open_lo: bool) -> str:
    return f"{'integer' if integer else 'number'}s in {'(' if open_lo else '['}{lo:g}, {hi:g}]"


def number(lo: float, hi: float, *, integer: bool = False, open_lo: bool = False):
    """An argparse type: a finite number in [lo, hi] ((lo, hi] with open_lo), an integer if asked."""
    def parse(text: str):
        value = _read(text, lo, hi, integer, open_lo)
        if value is None:
            raise argparse.ArgumentTypeError(f"must be one of the {_range(lo, hi, integer, open_lo)}, got {text!r}")
        return value
    return parse


MAX_LIST = 64     # values in one list: each is a configuration (or more) to simulate


def numbers(lo: float, hi: float, *, integer: bool = False):
    """An argparse type: a comma-separated list of at most MAX_LIST such numbers."""
    def parse(text: str):
        values = [_read(x, lo, hi, integer, False) for x in text.split(",")]
        if None in values or len(values) > MAX_LIST:
            raise argparse.ArgumentTypeError(f"must be up to {MAX_LIST} comma-separated "
                                             f"{_range(lo, hi, integer, False)}, got {text!r}")
        return values
    return parse


def writable(path: str) -> str:
    """An argparse type: a file whose folder exists (nothing is created on the way)."""
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"folder {folder!r} does not exist (create it first), got {path!r}")
    return path


def parse(argv=None):
    help_text = "\n\n".join(m.__doc__ for m in (sim, collectives, profiles, step))
    p = argparse.ArgumentParser(prog="python -m engine.simulate", description=help_text,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--preset", default="seed", help=f"system: {', '.join(PRESETS)} (default seed)")
    add("--trace", help="measured trace with per-layer spans (instead of the device model)")
    add("--arch", default="resnet50", choices=tuple(ARCHS))
    add("--classes", type=number(1, 25_000, integer=True), default=1000,
        help="classes of the model's last layer (default 1000; ImageNet-21k has 21,841)")
    add("--px", type=number(32, 4096, integer=True), default=224, help="image size of the device model (default 224)")
    add("--batch", type=number(1, MAX_BATCH, integer=True), help="images per device (default: the preset's)")
    add("--gpus", type=numbers(1, MAX_RANKS, integer=True), help="device counts, comma-separated (default: the preset's)")
    add("--per-node", type=number(1, 1024, integer=True), help="devices per node (default: the preset's)")
    add("--bucket-mb", type=numbers(0, 1e5), default=[25.0], help="bucket sizes in MB, comma-separated, 0 = per layer")
    add("--first-bucket-mb", type=number(0, 1e5), default=1.0)
    add("--algo", choices=ALGOS, help="all-reduce algorithm (default: the preset's; auto = as NCCL 2.18 picks)")
    add("--wire", choices=tuple(WIRE_BYTES), help="gradient precision on the wire")
    add("--precision", choices=PRECISIONS, help="compute precision: FP32 cores, TF32 or FP16 (mixed) tensor cores")
    add("--device-tflops", type=number(0, 1e6, open_lo=True), help="device peak at --precision (TFLOP/s, dense)")
    add("--device-mem-gbs", type=number(0, 1e6, open_lo=True), help="device memory bandwidth (GB/s)")
    for level in ("intra", "inter"):
        add(f"--{level}-alpha-us", type=number(0, 1e6), help=f"{level}-node latency per message step (us)")
        add(f"--{level}-gbs", type=number(0, 1e6, open_lo=True), help=f"{level}-node bandwidth (GB/s, one direction)")
    add("--collective-us", type=number(0, 1e6), help="fixed cost of one all-reduce (us; launch, hook, protocol)")
    add("--nccl-sms", type=number(0, 1024, integer=True), help="SMs NCCL's kernels hold while a collective runs")
    add("--contention", type=number(0, 100),
        help="compute slowdown while communicating (default: from --nccl-sms, nccl_sms / (sms - nccl_sms))")
    add("--comm-contention", type=number(0, 100), default=0.0, help="comm slowdown while computing")
    add("--overhead-us", type=number(0, 1e5), help="fixed cost per op and direction (us)")
    add("--step-overhead-ms", type=number(0, 1e5), help="fixed cost per step outside the layers (ms)")
    add("--jitter", type=number(0, 1), help="step-to-step spread of a device's compute (coefficient of variation)")
    add("--calib-ips", type=number(0, 1e7, open_lo=True), help="measured images/s of one device at --calib-batch")
    add("--calib-batch", type=number(1, MAX_BATCH, integer=True))
    add("--calib-px", type=number(32, 4096, integer=True), help="image size of the calibration (default 224)")
    add("--calib2-ips", type=number(0, 1e7, open_lo=True), help="a second point: images/s at --calib2-batch")
    add("--calib2-batch", type=number(1, MAX_BATCH, integer=True))
    add("--half-work", type=number(0, 1e12), help="outputs per op at which a kernel runs at half speed")
    add("--decode-ms", type=number(0, 1e4), help="loader cost per image per worker (ms)")
    add("--workers", type=number(1, 4096, integer=True), help="loader workers each device asks for")
    add("--node-cores", type=number(1, 1 << 16, integer=True), help="CPU cores per node, shared by its devices' loaders")
    add("--epochs", type=number(0, 1e4, open_lo=True), default=90)
    add("--images", type=number(1, 1e10, integer=True), default=1281167, help="images per epoch (ImageNet's by default)")
    add("--out-trace", type=writable, help="write the overlapped step of the first configuration here")
    add("--plot", metavar="PNG", type=writable, help="plot the sweep: step time and scaling against devices")
    add("--json", action="store_true", help="print every figure of every row, with the inputs, as JSON")
    add("--study", metavar="PNG", type=writable, help="print the study tables of docs/simulate.md and plot them to PNG")
    a = p.parse_args(argv)
    refuse_inconsistent(p, a)
    return a


def refuse_inconsistent(p: argparse.ArgumentParser, a) -> None:
    """What each option accepts alone is checked by its type; these are checked together."""
    if a.preset not in PRESETS:
        p.error(f"unknown preset {a.preset!r}; choose one of {', '.join(PRESETS)}")
    if (a.calib2_ips is None) != (a.calib2_batch is None):
        p.error("--calib2-ips and --calib2-batch go together (a second calibration point)")
    s = PRESETS[a.preset]
    per_node = s.per_node if a.per_node is None else a.per_node
    for gpus in a.gpus or [s.gpus]:
        if gpus > per_node and gpus % per_node:
            p.error(f"--gpus {gpus} does not fill nodes of {per_node} (--per-node): give at most {per_node} "
                    f"or a multiple of it")
    batch = s.batch if a.batch is None else a.batch
    most = max(a.gpus or [s.gpus])
    if most * batch > a.images:
        p.error(f"--gpus {most} x --batch {batch} = {most * batch} images per step is more than the epoch's "
                f"--images {a.images}: give at most {a.images // batch} devices or a smaller batch")
    if a.calib2_batch is not None and a.calib2_batch == (a.calib_batch or s.calib_batch):
        p.error(f"--calib2-batch {a.calib2_batch} must differ from --calib-batch (two points at one batch "
                "cannot set the small-batch falloff)")
    if a.precision not in (None, s.precision) and a.calib_ips is None:
        p.error(f"--precision {a.precision} needs --calib-ips measured at {a.precision}: the preset's "
                f"{s.calib_ips:g} images/s are a {s.precision} figure")
    sms = s.device.sms
    if a.nccl_sms is not None and a.nccl_sms >= sms:
        p.error(f"--nccl-sms must be in [0, {sms - 1}] ({s.device.name} has {sms} SMs), got {a.nccl_sms}")


def device_from_args(a, device: Device, precision: str) -> Device:
    peak = dict(device.peak)
    if a.device_tflops is not None:
        peak[precision] = a.device_tflops * 1e12
    mem_bw = device.mem_bw if a.device_mem_gbs is None else a.device_mem_gbs * GB
    name = device.name if a.device_tflops is None and a.device_mem_gbs is None else f"{device.name} (as given)"
    return replace(device, name=name, peak=peak, mem_bw=mem_bw)


def system_from_args(a) -> System:
    s = PRESETS[a.preset]
    links = {}
    for level in ("intra", "inter"):
        link = getattr(s, level)
        alpha, gbs = getattr(a, f"{level}_alpha_us"), getattr(a, f"{level}_gbs")
        links[level] = Link(link.alpha_s if alpha is None else alpha * 1e-6,
                            link.bandwidth if gbs is None else gbs * GB)
    pick = lambda value, default: default if value is None else value      # noqa: E731
    scaled = lambda value, default, unit: default if value is None else value * unit   # noqa: E731
    precision = pick(a.precision, s.precision)
    return replace(s, **links, device=device_from_args(a, s.device, precision), precision=precision,
                   batch=pick(a.batch, s.batch), per_node=pick(a.per_node, s.per_node),
                   algo=pick(a.algo, s.algo), wire=pick(a.wire, s.wire), calib_ips=pick(a.calib_ips, s.calib_ips),
                   calib_batch=pick(a.calib_batch, s.calib_batch), calib_px=pick(a.calib_px, s.calib_px),
                   calib2=(a.calib2_ips, a.calib2_batch) if a.calib2_ips is not None else s.calib2,
                   half_work=pick(a.half_work, s.half_work), overhead_s=scaled(a.overhead_us, s.overhead_s, 1e-6),
                   step_overhead_s=scaled(a.step_overhead_ms, s.step_overhead_s, 1e-3),
                   collective_s=scaled(a.collective_us, s.collective_s, 1e-6),
                   nccl_sms=pick(a.nccl_sms, s.nccl_sms), jitter=pick(a.jitter, s.jitter),
                   decode_s=scaled(a.decode_ms, s.decode_s, 1e-3), workers=pick(a.workers, s.workers),
                   node_cores=pick(a.node_cores, s.node_cores))


def main(argv=None) -> int:
    a = parse(argv)
    if a.study:
        from engine.simulate.study import study
        study(a.study)
        return 0
    try:
        s = system_from_args(a)
        profile = (trace_profile(a.trace, a.arch, a.classes) if a.trace
                   else analytic_profile(s, a.arch, a.classes, a.px))
    except (OSError, ValueError) as e:
        print(f"engine.simulate: {e}", file=sys.stderr)
        return 2
    if a.batch:
        profile = replace(profile, batch=a.batch)
    rows, first = [], None
    counts, buckets = a.gpus or [s.gpus], a.bucket_mb
    for gpus in counts:
        for bucket in buckets:
            changes = {} if a.contention is None else {"contention": a.contention}
            net = Network.of(s, ranks=gpus, bucket_mb=bucket, first_bucket_mb=a.first_bucket_mb,
                             comm_contention=a.comm_contention, **changes)
            first = first or net
            r = simulate(profile, net, decode_s=s.decode_s, workers=s.workers, node_cores=s.node_cores,
                         epochs=a.epochs, images=a.images)
            rows.append((f"{gpus} devices, bucket {bucket_label(bucket)}",
                         {"gpus": gpus, "bucket_mb": bucket, "contention": net.contention}, r))
    if a.json:
        print(json.dumps(json_report(vars(a), s, profile.source, rows), indent=1, allow_nan=False))
    else:
        print(f"profile: {profile.source}\nsystem: {a.preset}, {s.algo} all-reduce, {s.wire} on the wire")
        print(table([(label, r) for label, _, r in rows]))
    if a.plot:
        plot(counts, buckets, [r for *_, r in rows], f"{a.preset}: {profile.source}", a.plot)
        print(f"wrote {a.plot}", file=sys.stderr if a.json else sys.stdout)
    if a.out_trace:
        write_trace(run_step(profile, first, "overlap"), a.out_trace)
        print(f"wrote {a.out_trace}", file=sys.stderr if a.json else sys.stdout)
    return 0
