"""Kernel choice: `auto` never picks a kernel the CPU cannot run, and an explicit impossible choice is one clear error."""

import pytest
import torch

from pipeline.runtime import kernels


def test_auto_falls_back_to_torch_where_onednn_cannot_run_the_dtype(monkeypatch):
    monkeypatch.setattr(kernels, "onednn_supports", lambda dtype: dtype == torch.float32)
    assert kernels.choose_kernel("auto", torch.bfloat16).name == "torch"
    assert kernels.choose_kernel("auto", torch.float16).name == "torch"
    assert kernels.choose_kernel("auto", torch.float32).name == "onednn"
    with pytest.raises(ValueError, match="onednn kernel cannot run bfloat16 on this CPU"):
        kernels.choose_kernel("onednn", torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chosen_kernel_runs_here(dtype):
    kernel = kernels.choose_kernel("auto", dtype)
    w = torch.randn(24, 16).to(dtype)
    x = torch.randn(3, 16).to(dtype)
    out = kernel(x, kernel.prepare(w))
    torch.testing.assert_close(out.float(), (x.float() @ w.float().T), atol=0.1, rtol=0.02)
