"""A small data-parallel ResNet training engine (NumPy/CuPy, MPI/NCCL)."""
