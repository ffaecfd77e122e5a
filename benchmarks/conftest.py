"""`pytest benchmarks/`: the suite's cases through pytest-benchmark (opt-in; `make test` runs
`pytest tests` only).

Without a GPU the triton provider runs under the Triton interpreter: TRITON_INTERPRET must be
set before adapterops first imports its kernels, hence here, at the top, before the test module
imports the benchmark files. The cuda provider runs its C++ on CPU tensors
(ADAPTEROPS_CSRC_ON_CPU=1).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("ADAPTEROPS_CSRC_ON_CPU", "1")
