"""ltm_extensions: Triton GPU kernels with PyTorch references."""
