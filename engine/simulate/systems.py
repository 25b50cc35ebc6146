"""The machines engine.simulate models: devices, links, whole systems, and the presets with
their sources (data sheets for what is published, ASSUMED for what is not)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

GB = 1e9
PRECISIONS = ("fp32", "tf32", "mixed")      # compute precision: FP32 cores, TF32 or FP16 tensor cores
ACTIVATION_BYTES = {"fp32": 4, "tf32": 4, "mixed": 2}
THREADS_PER_SM = 2048    # resident threads per SM, Pascal to Hopper (CUDA's occupancy tables)


@dataclass(frozen=True)
class Link:
    alpha_s: float          # per message step
    bandwidth: float        # bytes/s, one direction

    def __post_init__(self):
        if not (math.isfinite(self.alpha_s) and self.alpha_s >= 0
                and math.isfinite(self.bandwidth) and self.bandwidth > 0):
            raise ValueError(f"link: alpha must be finite and >= 0 s and bandwidth finite and > 0 B/s, got "
                             f"alpha={self.alpha_s}, bandwidth={self.bandwidth}")


@dataclass(frozen=True)
class Device:
    name: str
    peak: dict              # FLOP/s per compute precision (a precision the device lacks is absent)
    mem_bw: float           # bytes/s
    sms: int                # streaming multiprocessors: how much parallel work fills the device
    cc: int                 # compute capability x 10 (NCCL's tuner models some things per generation)

    def peak_of(self, precision: str) -> float:
        if precision not in self.peak:
            raise ValueError(f"--precision {precision}: {self.name} has no {precision} peak (it has "
                             f"{', '.join(self.peak)}); choose one of those or give --device-tflops")
        return self.peak[precision]


@dataclass(frozen=True)
class System:
    device: Device
    precision: str          # compute precision, PRECISIONS
    per_node: int           # devices per node
    intra: Link
    inter: Link
    calib_ips: float        # one device's measured training images/s ...
    calib_batch: int        # ... at this batch ...
    calib_px: int = 224     # ... and this image size
    calib2: tuple | None = None  # optional second point (images/s, batch) of the same device: sets the small-batch falloff
    gpus: int = 8
    batch: int = 32
    algo: str = "auto"
    wire: str = "fp16"
    overhead_s: float = 10e-6   # per op and direction (kernel launch, framework), ASSUMED
    step_overhead_s: float = 1e-3  # per step, outside the layers (optimizer launch, loader hand-off, Python), ASSUMED
    collective_s: float = 20e-6  # per all-reduce: launch, the framework's hook, NCCL's protocol set-up, ASSUMED
    nccl_sms: int = 8       # SMs NCCL's kernels hold while a collective runs (compute slows meanwhile), ASSUMED
    jitter: float = 0.01    # step-to-step spread of a device's compute (coefficient of variation), ASSUMED
    decode_s: float = 5e-3  # per image per loader worker, ASSUMED
    workers: int = 4        # loader workers each device asks for ...
    node_cores: int = 64    # ... out of the node's CPU cores, which all of its devices share
    half_work: float | None = None  # outputs per op at which a kernel runs at half speed; None: sms x THREADS_PER_SM
    sources: str = field(default="", compare=False)

    @property
    def peak(self) -> float:
        return self.device.peak_of(self.precision)

    @property
    def half_work_elems(self) -> float:
        return self.device.sms * THREADS_PER_SM if self.half_work is None else self.half_work

    @property
    def contention(self) -> float:
        """Compute slowdown while a collective runs: NCCL's kernels hold `nccl_sms` of the SMs."""
        free = max(1, self.device.sms - self.nccl_sms)
        return self.nccl_sms / free


# Data sheets: peak FLOP/s dense (no sparsity), memory bandwidth, SM count.
P100_PCIE = Device("Tesla P100 PCIe 16GB", {"fp32": 9.3e12, "mixed": 18.7e12}, 732 * GB, 56, 60)
V100_SXM2 = Device("Tesla V100 SXM2", {"fp32": 15.7e12, "mixed": 125e12}, 900 * GB, 80, 70)
V100_SXM3 = Device("Tesla V100 SXM3 32GB", {"fp32": 15.7e12, "mixed": 125e12}, 900 * GB, 80, 70)
A100_SXM4_40GB = Device("A100 SXM4 40GB", {"fp32": 19.5e12, "tf32": 156e12, "mixed": 312e12}, 1555 * GB, 108, 80)
A100_SXM4 = Device("A100 SXM4 80GB", {"fp32": 19.5e12, "tf32": 156e12, "mixed": 312e12}, 2039 * GB, 108, 80)
H100_SXM5 = Device("H100 SXM5", {"fp32": 67e12, "tf32": 494.7e12, "mixed": 989.4e12}, 3350 * GB, 132, 90)
H200_SXM = Device("H200 SXM 141GB", {"fp32": 67e12, "tf32": 494.7e12, "mixed": 989.4e12}, 4800 * GB, 132, 90)

_COMMON = ("ASSUMED for every preset unless it says otherwise: 10 us per op and direction, 1 ms per step outside the layers, "
           "20 us per all-reduce, NCCL holding 8 SMs while it runs, 1% step-to-step compute spread, "
           "5 ms to decode an image per loader worker.")

PRESETS = {
    "seed": System(
        P100_PCIE, "fp32", 8, Link(5e-6, 10 * GB), Link(5e-6, 2 * 56e9 / 8 * 64 / 66),
        calib_ips=200, calib_batch=32, gpus=1024, batch=32, algo="ring", wire="fp16", workers=2, node_cores=16,
        nccl_sms=0,
        sources="Akiba, Suzuki, Fukuda 2017 and PFN's MN-1 description (tech.preferred.jp, 'MN-1: "
                "a GPU cluster behind 15-min ImageNet'): 128 nodes x 8 P100 (4.7 TFLOPS FP64 each, "
                "i.e. the PCIe card), two FDR InfiniBand links (56 Gb/s each, 64b/66b coding) and two "
                "8-core Xeons per node, ChainerMN's ring all-reduce, FP16 gradients, FP32 compute, 32 "
                "images/GPU. P100 PCIe data sheet: 9.3 "
                "TFLOPS FP32, 18.7 FP16, 732 GB/s HBM2, 56 SMs. ASSUMED: PCIe gen3 between GPUs at 10 "
                "GB/s effective, 5 us per message step, 200 images/s per P100 (FP32, batch 32), 2 "
                "loader workers per GPU, no SMs held by the all-reduce (nccl_sms 0, this "
                "preset's own), the thin-tree switch layout ignored. " + _COMMON),
    "dgx1-v100": System(
        V100_SXM2, "mixed", 8, Link(3e-6, 150 * GB), Link(5e-6, 4 * 100e9 / 8),
        calib_ips=1200, calib_batch=256, gpus=64, batch=256, workers=5, node_cores=40,
        sources="DGX-1 (V100) data sheet: 8x V100 SXM2 with NVLink (300 GB/s per GPU both ways), "
                "4x 100 Gb/s EDR InfiniBand, 2x 20-core Xeon E5-2698 v4 per node; V100 data sheet: "
                "15.7 TFLOPS FP32, 125 tensor, 900 GB/s, 80 SMs (no TF32). ASSUMED: 1200 images/s per "
                "V100 (mixed precision, batch 256), 3 us (NVLink) and 5 us (IB) per message step. " + _COMMON),
    "dgx2-v100": System(
        V100_SXM3, "mixed", 16, Link(3e-6, 150 * GB), Link(5e-6, 8 * 100e9 / 8),
        calib_ips=1200, calib_batch=256, gpus=16, batch=256, workers=3, node_cores=48,
        sources="DGX-2 data sheet: 16x V100 32GB on NVSwitch (300 GB/s per GPU both ways), 8x 100 "
                "Gb/s EDR InfiniBand, 2x 24-core Xeon Platinum 8168; V100 data sheet: 15.7 TFLOPS "
                "FP32, 125 tensor, 900 GB/s, 80 SMs. ASSUMED: 1200 images/s per V100 (mixed precision, "
                "batch 256), 3/5 us per message step. " + _COMMON),
    "dgx-a100": System(
        A100_SXM4, "mixed", 8, Link(3e-6, 300 * GB), Link(5e-6, 8 * 200e9 / 8),
        calib_ips=2500, calib_batch=256, gpus=64, batch=256, workers=16, node_cores=128,
        sources="DGX A100 data sheet: 8x A100 80GB, NVLink 600 GB/s per GPU both ways, 8x 200 "
                "Gb/s HDR InfiniBand for compute, 2x 64-core AMD EPYC 7742; A100 data sheet: 19.5 "
                "TFLOPS FP32, 156 TF32, 312 FP16 tensor (dense), 2039 GB/s, 108 SMs. ASSUMED: 2500 "
                "images/s per A100 (mixed precision, batch 256), 3/5 us per message step. " + _COMMON),
    "dgx-h100": System(
        H100_SXM5, "mixed", 8, Link(3e-6, 450 * GB), Link(5e-6, 8 * 400e9 / 8),
        calib_ips=3000, calib_batch=256, gpus=64, batch=256, workers=14, node_cores=112,
        sources="DGX H100 data sheet: 8x H100 SXM5, NVLink 900 GB/s per GPU both ways, 8x 400 "
                "Gb/s NDR InfiniBand, 2x 56-core Xeon Platinum 8480C; H100 SXM data sheet: 67 TFLOPS "
                "FP32, 494.7 TF32, 989.4 FP16 tensor (dense, half the sparsity figures), 3.35 TB/s, "
                "132 SMs. ASSUMED: 3000 images/s per H100 (mixed precision, batch 256), 3/5 us per "
                "message step. " + _COMMON),
    "dgx-h200": System(
        H200_SXM, "mixed", 8, Link(3e-6, 450 * GB), Link(5e-6, 8 * 400e9 / 8),
        calib_ips=3200, calib_batch=256, gpus=64, batch=256, workers=14, node_cores=112,
        sources="DGX H200 data sheet: 8x H200 SXM 141GB, NVLink 900 GB/s per GPU both ways, 8x 400 "
                "Gb/s NDR InfiniBand (ConnectX-7), 2x 56-core Xeon Platinum 8480C; H200 data sheet: "
                "the H100's compute (67 TFLOPS FP32, 494.7 TF32, 989.4 FP16 dense, 132 SMs) with 4.8 "
                "TB/s HBM3e. ASSUMED: 3200 images/s per H200 (mixed precision, batch 256; more memory "
                "bandwidth than the H100 helps the BN and pooling layers), 3/5 us per message step. " + _COMMON),
}


def preset(name: str) -> System:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
