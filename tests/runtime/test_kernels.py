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
    with pytest.raises(ValueError, match="native kernel needs the compiled kernels"):
        kernels.choose_kernel("native", torch.float32)
    monkeypatch.setattr(kernels, "native_available", lambda: True)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):  # the compiled GEMV's float formats
        assert kernels.choose_kernel("auto", dtype).name == "native"
    with pytest.raises(ValueError, match="onednn kernel cannot run bfloat16 on this CPU"):
        kernels.choose_kernel("onednn", torch.bfloat16)


def test_native_kernel_keeps_each_dtypes_quantized_path(monkeypatch):
    """A 16-bit engine's quantized weights take torch's bfloat16 weight-only kernels only where oneDNN's bfloat16
    runs (what `auto` chose before the native kernel took 16-bit engines), else their exact dequantization."""
    monkeypatch.setattr(kernels, "onednn_supports", lambda dtype: dtype in (torch.float32, torch.bfloat16))
    assert kernels.NativeKernel(torch.float32).fast_quantized
    assert kernels.NativeKernel(torch.bfloat16).fast_quantized
    assert not kernels.NativeKernel(torch.float16).fast_quantized
    monkeypatch.setattr(kernels, "onednn_supports", lambda dtype: dtype == torch.float32)
    assert not kernels.NativeKernel(torch.bfloat16).fast_quantized


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
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


@pytest.mark.skipif(not kernels.native_available(), reason="the compiled kernels of pipeline.runtime.native are not "
                    "available here (no C++ compiler or no AVX2/FMA)")
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9])  # up to 8: the compiled GEMV; more: torch's GEMM
@pytest.mark.parametrize("shape", [(24, 16), (37, 101), (576, 1536), (130, 64)])
def test_native_16bit_linear_is_the_float32_product_rounded_once(isa, dtype, rows, shape):
    """A 16-bit engine's float linear: float32 activations times the stored 16-bit weights, summed in float32 and
    rounded to the dtype once (what torch's 16-bit CPU GEMM computes, in another order of the float32 sum), with and
    without bias, on widths below, off and on the kernel's 32-value block."""
    kernel = kernels.choose_kernel("native", dtype)
    if isa not in kernel.kernels.supported_isas():
        pytest.skip(f"this CPU cannot run the {isa} instance")
    torch.manual_seed(rows)
    w, b = torch.randn(*shape).to(dtype), torch.randn(shape[0]).to(dtype)
    x = torch.randn(1, rows, 2 * shape[1]).to(dtype)[..., ::2]  # a strided view, as the runtime's slices can be
    prepared = kernel.prepare(w)
    assert prepared.shape == w.shape
    default = kernel.kernels.isa()
    kernel.kernels.set_isa(isa)
    try:
        for bias in (None, b):
            out = kernel(x, prepared, bias)
            exact = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
            assert out.dtype == dtype and out.shape == exact.shape
            if rows > kernels.NativeFloatLinear.MAX_ROWS:  # prefill: torch's GEMM itself
                assert torch.equal(out, torch.nn.functional.linear(x, w, bias))
                continue
            # float32 sums of exact products: within float32 rounding of the exact sum, then one 16-bit rounding
            # (half an ulp: 2^-11 of the value in half, 2^-8 in bfloat16)
            half_ulp = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11
            err = (out.double() - exact).abs()
            assert (err <= half_ulp * exact.abs() * (1 + 1e-3) + 1e-5 * shape[1] ** 0.5).all()
            torch.testing.assert_close(out, torch.nn.functional.linear(x, w, bias), atol=0.05, rtol=0.02)
    finally:
        kernel.kernels.set_isa(default)


@pytest.mark.skipif(not kernels.native_available(), reason="the compiled kernels of pipeline.runtime.native are not "
                    "available here (no C++ compiler or no AVX2/FMA)")
@pytest.mark.parametrize("shape", [(1, 1, 576), (8, 1, 576), (3, 40, 576), (5, 7), (1, 1), (600, 64)])
@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 30.0])
def test_native_rms_norm_equals_the_formula(shape, magnitude):
    """The compiled RMSNorm computes torch's formula in the same order: only the float32 sum of squares may round
    differently (last bit of the mean), so outputs agree to a few float32 ulps."""
    torch.manual_seed(0)
    native, reference = kernels.choose_kernel("native", torch.float32), kernels.TorchKernel()
    x, w = torch.randn(shape) * magnitude, torch.randn(shape[-1])
    out = native.rms_norm(x, w, 1e-5)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, reference.rms_norm(x, w, 1e-5), atol=0, rtol=5e-7)


@pytest.mark.skipif(not kernels.native_available(), reason="the compiled kernels of pipeline.runtime.native are not "
                    "available here (no C++ compiler or no AVX2/FMA)")
def test_native_rms_norm_of_strided_heads_and_other_dtypes():
    """Per-head norms (Gemma3's q/k norms) get a transposed view; bfloat16 engines keep the torch formula."""
    native, reference = kernels.choose_kernel("native", torch.float32), kernels.TorchKernel()
    heads, w = torch.randn(2, 4, 9, 64).transpose(1, 2), torch.randn(64)
    torch.testing.assert_close(native.rms_norm(heads, w, 1e-6), reference.rms_norm(heads, w, 1e-6), atol=0, rtol=5e-7)
    xb, wb = torch.randn(3, 64).bfloat16(), torch.randn(64).bfloat16()
    assert torch.equal(native.rms_norm(xb, wb, 1e-6), reference.rms_norm(xb, wb, 1e-6))


def _attention_layer(heads: int, kv_heads: int, head_size: int):
    from pipeline.runtime.model import Attention, ModelArgs
    from pipeline.runtime.parallel import Dist

    args = ModelArgs(hidden_size=heads * head_size, num_heads=heads, num_kv_heads=kv_heads, head_size=head_size,
                     intermediate_size=8, vocab_size=10, num_layers=1, layers=[0], norm_eps=1e-5, hidden_act="silu",
                     dtype="float32", rotary_dim=head_size, rotary_base=10000.0)
    return Attention(args, Dist(), kernels.TorchKernel()), args


@pytest.mark.skipif(not kernels.native_available(), reason="the compiled kernels of pipeline.runtime.native are not "
                    "available here (no C++ compiler or no AVX2/FMA)")
@pytest.mark.parametrize("heads,kv_heads,head_size", [(9, 3, 64), (4, 4, 16), (6, 1, 34)])
@pytest.mark.parametrize("steps", [1, 3])  # query positions per sequence: decode, and a few (speculative-style)
@pytest.mark.parametrize("slots,starts", [(40, (5, 17, 30)), (700, (9, 255, 600))])  # one chunk of keys, or several
def test_native_attention_equals_the_layers_own(heads, kv_heads, head_size, steps, slots, starts):
    """The fused RoPE + cache write + causal attention gives the torch path's output and leaves the same cache,
    for sequences at different positions (each sees only its own keys up to its position), grouped KV heads, and a
    cache viewed from a later row (as a prefill chunk's is). Long contexts are split into chunks of keys merged
    afterwards; a sequence can end inside the first chunk, on a chunk's edge or in a later one."""
    from pipeline.runtime.kv_cache import KVCache
    from pipeline.runtime.model import causal_mask, rope_tables

    torch.manual_seed(heads + steps)
    layer, args = _attention_layer(heads, kv_heads, head_size)
    native = kernels.choose_kernel("native", torch.float32)
    assert layer.plain
    b = 3
    caches = [KVCache(b + 1, kv_heads, slots, head_size, torch.float32) for _ in range(2)]
    history = torch.randn(b + 1, kv_heads, slots, head_size)  # earlier positions' keys and values
    for c in caches:
        c.k.copy_(history)
        c.v.copy_(-history)
    start = torch.tensor(starts).unsqueeze(1)
    input_pos = start + torch.arange(steps)  # [B, T]
    kv_len = int(input_pos.max()) + 1
    cos_table, sin_table = rope_tables(args, slots)
    cos, sin = cos_table[input_pos].unsqueeze(1), sin_table[input_pos].unsqueeze(1)
    qkv = torch.randn(b, steps, (heads + 2 * kv_heads) * head_size)
    mask = causal_mask(input_pos, kv_len)
    for c in caches:  # rows 1.. only, as a prefill chunk from row 1 sees them
        c.k, c.v = c.k[1:], c.v[1:]
    expected = layer.attend(qkv, cos, sin, mask, caches[0], input_pos, kv_len)
    got = native.attention(layer, qkv, cos, sin, mask, caches[1], input_pos, kv_len)
    assert got.shape == expected.shape == (b, steps, heads * head_size)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=2e-5)
    assert torch.equal(caches[1].k, caches[0].k) and torch.equal(caches[1].v, caches[0].v)  # RoPE rounds alike


@pytest.mark.skipif(not kernels.native_available(), reason="the compiled kernels of pipeline.runtime.native are not "
                    "available here (no C++ compiler or no AVX2/FMA)")
def test_native_attention_leaves_other_layers_to_the_torch_path(monkeypatch):
    """Prefill widths and layers that are not plain (here a quantized KV cache) take `attend`, unchanged."""
    layer, args = _attention_layer(4, 2, 16)
    native = kernels.choose_kernel("native", torch.float32)
    calls = []
    monkeypatch.setattr(layer, "attend", lambda *a: calls.append(a[0].shape[1]))
    qkv = torch.randn(1, native.MAX_FUSED_POSITIONS + 1, 8 * 16)
    native.attention(layer, qkv, None, None, None, None, None, 0)
    layer.plain = False
    native.attention(layer, qkv[:, :1], None, None, None, None, None, 0)
    assert calls == [native.MAX_FUSED_POSITIONS + 1, 1]
    from dataclasses import replace

    from pipeline.runtime.model import Attention
    from pipeline.runtime.parallel import Dist

    assert not Attention(replace(args, kv_cache_quant="int8"), Dist(), kernels.TorchKernel()).plain
    assert not Attention(replace(args, rotary_dim=8), Dist(), kernels.TorchKernel()).plain
    assert not Attention(replace(args, sliding_window=4), Dist(), kernels.TorchKernel()).plain
