"""Kernel choice: `auto` never picks a kernel the CPU cannot run, and an explicit impossible choice is one clear error."""

import pytest
import torch

from pipeline.runtime import kernels


def test_auto_falls_back_to_torch_where_onednn_cannot_run_the_dtype(monkeypatch):
    monkeypatch.setattr(kernels, "onednn_supports", lambda dtype: dtype == torch.float32)
    monkeypatch.setattr(kernels, "native_available", lambda: False)
    assert kernels.choose_kernel("auto", torch.bfloat16).name == "torch"
    assert kernels.choose_kernel("auto", torch.float16).name == "torch"
    assert kernels.choose_kernel("auto", torch.float32).name == "onednn"
    with pytest.raises(ValueError, match="native kernel needs oneDNN and the compiled kernels"):
        kernels.choose_kernel("native", torch.float32)
    monkeypatch.setattr(kernels, "native_available", lambda: True)
    assert kernels.choose_kernel("auto", torch.float32).name == "native"  # float32 only: the GEMV is float32
    assert kernels.choose_kernel("auto", torch.bfloat16).name == "torch"
    with pytest.raises(ValueError, match="onednn kernel cannot run bfloat16 on this CPU"):
        kernels.choose_kernel("onednn", torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chosen_kernel_runs_here(dtype):
    kernel = kernels.choose_kernel("auto", dtype)
    w = torch.randn(24, 16).to(dtype)
    x = torch.randn(3, 16).to(dtype)
    out = kernel(x, kernel.prepare(w))
    torch.testing.assert_close(out.float(), (x.float() @ w.float().T), atol=0.1, rtol=0.02)


@pytest.mark.skipif(not kernels.native_available(), reason="the compiled kernels of pipeline.runtime.native are not "
                    "available here (no C++ compiler or no AVX2/FMA)")
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])  # up to 8: the compiled GEMV; more: MKL's GEMM
@pytest.mark.parametrize("shape", [(24, 16), (37, 101), (576, 1536)])  # widths below, off and on its 32-value block
def test_native_float_linear_equals_f_linear(rows, shape):
    kernel = kernels.choose_kernel("native", torch.float32)
    w, b = torch.randn(*shape), torch.randn(shape[0])
    x = torch.randn(1, rows, 2 * shape[1])[..., ::2]  # a strided view, as the runtime's slices can be
    prepared = kernel.prepare(w)
    assert prepared.shape == w.shape
    for bias in (None, b):
        torch.testing.assert_close(kernel(x, prepared, bias), torch.nn.functional.linear(x, w, bias),
                                   atol=1e-4, rtol=1e-4)
