"""Triton kernels of deer, one file per op (jit kernels, a launcher returning its config, the autograd
Function). Importing this package does not import triton; each op module does, when it is used."""
