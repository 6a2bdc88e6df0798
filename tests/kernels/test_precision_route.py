"""fp32 in the Triton linear kernels follows torch's matmul precision setting, and on CUDA full
fp32 without dropout takes the library GEMM (merge route) instead of Triton's FMA-bound dot."""

from __future__ import annotations

import types

import pytest
import torch

from recpeft.kernels import lora_linear as fused
from recpeft.kernels.reference import LinearRoute


@pytest.fixture
def precision():
    """Set torch's fp32 matmul precision for a test and restore it after."""
    before = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cuda.matmul.allow_tf32 = before[1]


def test_fp32_dots_follow_torchs_setting(precision):
    precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    assert fused._dot_precision(torch.float32) == "ieee"
    precision("high")
    assert fused._dot_precision(torch.float32) == "tf32"
    precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = True
    assert fused._dot_precision(torch.float32) == "tf32"
    assert fused._dot_precision(torch.bfloat16) == "tf32"  # ignored by tl.dot for 16-bit inputs


def _x(rows, k, dtype, cuda):
    """A stand-in input with what default_route reads (a CUDA tensor without a GPU)."""
    size = torch.empty((), dtype=dtype).element_size()
    return types.SimpleNamespace(
        is_cuda=cuda, dtype=dtype, shape=(rows, k), numel=lambda: rows * k, element_size=lambda: size
    )


@pytest.mark.parametrize("dropout", [False, True])
def test_full_fp32_on_cuda_takes_the_library_gemm(precision, dropout):
    precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    weight, lora_A = torch.empty(512, 256), torch.empty(8, 256)
    got = fused.default_route(_x(4096, 256, torch.float32, True), weight, lora_A, dropout)
    assert got is (LinearRoute.EPILOGUE if dropout else LinearRoute.MERGE)  # dropout needs the epilogue
    model = fused.choose_route(4096, 256, 512, 8, 4, dropout)
    assert fused.default_route(_x(4096, 256, torch.float32, False), weight, lora_A, dropout) is model  # CPU: model
    precision("high")  # TF32 allowed: Triton's tensor-core dot is fine, the cost model decides
    assert fused.default_route(_x(4096, 256, torch.float32, True), weight, lora_A, dropout) is model
    bf16 = fused.choose_route(4096, 256, 512, 8, 2, dropout)
    assert fused.default_route(_x(4096, 256, torch.bfloat16, True), weight, lora_A, dropout) is bf16
