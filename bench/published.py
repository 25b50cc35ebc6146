"""engine.simulate against published multi-GPU ResNet-50 training throughputs.

    .venv/bin/python bench/published.py            # the table and its error summary
    .venv/bin/python bench/published.py --json     # the same, every row, as JSON

Each group below is one source's runs of one device and precision at one batch per GPU.
Its 1-GPU figure is the calibration (`--calib-ips` at that batch, 224 px), set up as a user
would from the preset's data sheets; every other figure of the group is predicted from it
and the presets' constants, which are never fitted to these figures. The input pipeline is
each source's: PyTorch's decodes on the CPU (its configs.yml: 8 workers per GPU on DGX-1, 16
on DGX A100), TensorFlow's tf.data on the CPU too (as many threads as the node's cores),
both sharing the node's cores at the presets' 5 ms per image; MXNet's DALI decodes on the
GPU (decode cost 0 here). The buckets are each framework's default (PyTorch DDP 25 MB,
Horovod's 64 MB fusion buffer, which MXNet and TensorFlow use)
and the wire precision the gradients' own (PyTorch and TensorFlow AMP keep FP32
parameters, so FP32 gradients; MXNet float16 trains FP16 gradients).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.simulate import Network, analytic_profile, simulate       # noqa: E402
from engine.simulate.systems import A100_SXM4_40GB, PRESETS            # noqa: E402

SOURCES = {
    "pytorch": "NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md "
               "(commit 291f0d0), 'Training performance results', pytorch-21.03 NGC container; batch "
               "per GPU from PyTorch/Classification/ConvNets/configs.yml (AMP and TF32 256, FP32 on V100 112)",
    "mxnet": "NVIDIA DeepLearningExamples, MxNet/Classification/RN50v1.5/README.md (commit 134510b), "
             "'Training performance results', mxnet-20.12 NGC container, batch per GPU as its benchmark.py "
             "commands state",
    "tf": "NVIDIA DeepLearningExamples, TensorFlow/Classification/ConvNets/resnet50v1.5/README.md "
          "(commit 1d4211f), 'Training performance results', TensorFlow 20.06-tf1 NGC container, XLA on, "
          "batch per GPU as its tables state",
}
DEVICES = {"DGX A100 (8x A100 40GB)": A100_SXM4_40GB}     # where the source's system differs from the preset's

# loader workers per GPU (capped by the node's cores); absent: decoded on the GPU
LOADER_WORKERS = {("pytorch", "dgx-a100"): 16, ("pytorch", "dgx1-v100"): 8,
                  ("tf", "dgx-a100"): 128, ("tf", "dgx1-v100"): 40, ("tf", "dgx2-v100"): 48}

# (source, what the source calls the system, preset, precision, batch/GPU, wire, bucket MB, {GPUs: images/s})
GROUPS = [
    ("pytorch", "DGX A100 (8x A100 80GB)", "dgx-a100", "tf32", 256, "fp32", 25, {1: 938, 8: 7248}),
    ("pytorch", "DGX A100 (8x A100 80GB)", "dgx-a100", "mixed", 256, "fp32", 25, {1: 2470, 8: 16621}),
    ("pytorch", "DGX-1 (8x V100 16GB)", "dgx1-v100", "fp32", 112, "fp32", 25, {1: 367, 8: 2855}),
    ("pytorch", "DGX-1 (8x V100 16GB)", "dgx1-v100", "mixed", 256, "fp32", 25, {1: 1200, 8: 8322}),
    ("pytorch", "DGX-1 (8x V100 32GB)", "dgx1-v100", "fp32", 112, "fp32", 25, {1: 356, 8: 2766}),
    ("pytorch", "DGX-1 (8x V100 32GB)", "dgx1-v100", "mixed", 256, "fp32", 25, {1: 1156, 8: 8056}),
    ("mxnet", "DGX A100 (8x A100 80GB)", "dgx-a100", "mixed", 256, "fp16", 64, {1: 2180, 2: 4332, 4: 8587, 8: 16925}),
    ("mxnet", "DGX A100 (8x A100 80GB)", "dgx-a100", "tf32", 256, "fp32", 64, {1: 1022, 2: 2032, 4: 4035, 8: 8001}),
    ("mxnet", "DGX-1 (8x V100 16GB)", "dgx1-v100", "mixed", 192, "fp16", 64, {1: 1376, 2: 2768, 4: 5357, 8: 10723}),
    ("mxnet", "DGX-1 (8x V100 16GB)", "dgx1-v100", "fp32", 96, "fp32", 64, {1: 384, 2: 763, 4: 1513, 8: 3005}),
    ("mxnet", "DGX-2 (16x V100 32GB)", "dgx2-v100", "mixed", 256, "fp16", 64,
     {1: 1492, 2: 2935, 4: 5726, 8: 11368, 16: 21484}),
    ("mxnet", "DGX-2 (16x V100 32GB)", "dgx2-v100", "fp32", 128, "fp32", 64,
     {1: 417, 2: 821, 4: 1623, 8: 3223, 16: 6338}),
    ("tf", "DGX A100 (8x A100 40GB)", "dgx-a100", "tf32", 256, "fp32", 64, {1: 909, 8: 7000}),
    ("tf", "DGX A100 (8x A100 40GB)", "dgx-a100", "mixed", 256, "fp32", 64, {1: 2375, 8: 17400}),
    ("tf", "DGX-1 (8x V100 16GB)", "dgx1-v100", "fp32", 128, "fp32", 64, {1: 412, 8: 3170}),
    ("tf", "DGX-1 (8x V100 16GB)", "dgx1-v100", "mixed", 256, "fp32", 64, {1: 1270, 8: 9510}),
    ("tf", "DGX-2 (16x V100 32GB)", "dgx2-v100", "fp32", 128, "fp32", 64, {1: 432, 16: 6500}),
    ("tf", "DGX-2 (16x V100 32GB)", "dgx2-v100", "mixed", 256, "fp32", 64, {1: 1300, 16: 17250}),
]


def predictions(algo: str = "auto", cpu_loaders: bool = True) -> list:
    """One row per published multi-GPU figure: the reported and the predicted images/s.
    cpu_loaders=False: every loader as if it decoded on the GPU (never the bound)."""
    rows = []
    for source, system_name, name, precision, batch, wire, bucket_mb, figures in GROUPS:
        workers = LOADER_WORKERS.get((source, name)) if cpu_loaders else None
        s = replace(PRESETS[name], device=DEVICES.get(system_name, PRESETS[name].device), precision=precision,
                    calib_ips=figures[1], calib_batch=batch, batch=batch,
                    wire=wire, algo=algo, decode_s=PRESETS[name].decode_s if workers else 0.0,
                    workers=workers or 1)
        profile = analytic_profile(s)
        for gpus, reported in figures.items():
            if gpus == 1:
                continue        # the calibration itself
            f = simulate(profile, Network.of(s, ranks=gpus, bucket_mb=bucket_mb), decode_s=s.decode_s,
                         workers=s.workers, node_cores=s.node_cores)
            rows.append({"source": source, "system": system_name, "preset": name, "precision": precision,
                         "batch": batch, "gpus": gpus, "calib_ips": figures[1], "reported_ips": reported,
                         "predicted_ips": f["images_s"], "error": f["images_s"] / reported - 1,
                         "scaling_reported": reported / (gpus * figures[1]),
                         "scaling_predicted": f["images_s"] / (gpus * figures[1]),
                         "algos": f["algos"], "bound": f["bound"]})
    return rows


def summary(rows) -> dict:
    errors = [r["error"] for r in rows]
    worst = max(rows, key=lambda r: abs(r["error"]))
    return {"figures": len(rows), "median_abs_error": statistics.median(abs(e) for e in errors),
            "signed_median": statistics.median(errors), "worst": worst["error"],
            "worst_row": f"{worst['source']} {worst['system']} {worst['precision']} {worst['gpus']} GPUs"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algo", default="auto", choices=("auto", "ring", "tree", "hier"))
    p.add_argument("--no-cpu-loader", action="store_true",
                   help="take no loader as the bound (what the model gives without its 5 ms per image assumption)")
    p.add_argument("--json", action="store_true", help="print every row and the summary as JSON")
    a = p.parse_args(argv)
    rows = predictions(a.algo, cpu_loaders=not a.no_cpu_loader)
    s = summary(rows)
    if a.json:
        print(json.dumps({"sources": SOURCES, "rows": rows, "summary": s}, indent=1))
        return 0
    print(f"{'source':<8} {'system':<24} {'prec':<5} {'batch':>5} {'GPUs':>4} {'1 GPU':>6} {'reported':>9} "
          f"{'predicted':>9} {'error':>7} {'scaling rep/pred':>16}  bound")
    for r in rows:
        print(f"{r['source']:<8} {r['system']:<24} {r['precision']:<5} {r['batch']:>5} {r['gpus']:>4} "
              f"{r['calib_ips']:>6} {r['reported_ips']:>9} {r['predicted_ips']:9.0f} {r['error']:+7.1%} "
              f"{r['scaling_reported']:8.1%}/{r['scaling_predicted']:.1%}  {r['bound']}")
    print(f"\n{s['figures']} figures: median absolute error {s['median_abs_error']:.1%}, signed median "
          f"{s['signed_median']:+.1%}, worst {s['worst']:+.1%} ({s['worst_row']})")
    for key, text in SOURCES.items():
        print(f"{key}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
