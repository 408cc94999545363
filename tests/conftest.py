"""Test set-up: Triton's interpreter on machines without a GPU.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, that is,
before softmax_ce_gpu is imported: pytest loads this file first. With a CUDA
device the kernels are compiled and tests run on the GPU (DEVICE = "cuda");
without one they run on CPU tensors through the interpreter (DEVICE = "cpu").
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
