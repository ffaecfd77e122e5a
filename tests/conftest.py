"""Test set-up shared by every test file.

Without a GPU, Triton kernels run under the interpreter on CPU tensors: TRITON_INTERPRET must be
set before adapterops first imports its kernels, hence here, at the top. With a GPU the same
tests run on CUDA tensors (`device` fixture) and compiled kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
