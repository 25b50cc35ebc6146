"""A small training engine: ResNet-50 on NumPy (CPU) and CuPy (GPU), MPI and NCCL."""
