"""Triton kernels of adapterops (installed as `adapterops.kernels`).

Leaves of the architecture: `@triton.jit` code only, importing nothing but triton. Launchers,
configurations and argument checks live in `adapterops.backends.triton`.
"""
