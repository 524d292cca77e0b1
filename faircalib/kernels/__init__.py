"""Numerical building blocks below the models: Hadamard transforms, int4 packing, and the Triton kernels of the
low-bit linears with their torch references (``ops`` picks one or the other)."""
