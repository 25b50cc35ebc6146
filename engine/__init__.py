"""A small training engine: ResNet-50 on NumPy (CPU) and CuPy (GPU), MPI and NCCL."""
import os

# OpenBLAS's idle workers spin for ~0.1 s after each GEMM by default, on the cores that
# the work between GEMMs is split over (engine.parallel); with this they sleep at once
# (ResNet-50 step at 224 px, 2 threads: 2.2-2.4 s against 2.6-2.7 s spinning). OpenBLAS
# reads it when it loads, so it counts only where engine is imported before NumPy, as in
# `python -m engine.train`; a script that imports NumPy first can set it itself.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
