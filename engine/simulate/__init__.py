"""A discrete-event model of one data-parallel training step, from 1 to thousands of devices.

    python -m engine.simulate --preset seed                       # the paper's 1024 P100s
    python -m engine.simulate --preset dgx-h100 --gpus 8,64,512,4096 --bucket-mb 0,4,25
    python -m engine.simulate --preset dgx-a100 --precision tf32 --calib-ips 938 --batch 128 --json
    python -m engine.simulate --trace runs/predict.rank0.json --arch resnet50 --classes 10 \\
        --batch 8 --intra-alpha-us 60 --intra-gbs 2 --gpus 2 --per-node 2
    python -m engine.simulate --study docs/simulate.png          # docs/simulate.md, "The study"

It uses the engine's own pieces, never a copy: the model's flat layout (`ResNet.layout`,
each layer's `grad_range`) and the reducer's bucket planner (`engine.reducer.plan_buckets`);
its simulated step is written in `engine.trace`'s Chrome trace format, so
`python -m engine.trace figures` and Perfetto read it like a measured one.

Modules, each with its formulas in its docstring (all of them are in --help):
  systems      devices, links, systems, the presets and their sources
  collectives  the cost of one all-reduce per algorithm, and NCCL's choice (--algo auto)
  profiles     per-layer compute times: a measured trace, or the calibrated roofline
  step         the two-stream schedule of one step and its figures
  report       tables, JSON and plots; cli the command line; study the docs' study
"""
from engine.simulate.collectives import ALGOS, Cost, allreduce_s, ring_link_from_fit
from engine.simulate.profiles import LayerTime, Profile, analytic_profile, calibrate, trace_profile
from engine.simulate.step import Network, Task, run_step, schedule, simulate, write_trace
from engine.simulate.systems import PRESETS, Device, Link, System, preset

__all__ = ["ALGOS", "Cost", "Device", "LayerTime", "Link", "Network", "PRESETS", "Profile", "System", "Task",
           "allreduce_s", "analytic_profile", "calibrate", "preset", "ring_link_from_fit", "run_step", "schedule",
           "simulate", "trace_profile", "write_trace"]
