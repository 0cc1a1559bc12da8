"""The compiled quantized kernels (pipeline.runtime.native) compute the reference: the weights dequantized exactly
(q * scale + zero, pipeline.quantize.numerics) times the activations after prequant and INT8/FP8 fake quantization,
on awkward shapes (odd group counts, tp-split widths, widths not multiples of the SIMD width, batch 1..11), in each
instance of the weight kernels this CPU runs (AVX2 everywhere, AVX-512 where the CPU has it); and a machine without a
compiler falls back to torch's kernels with one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pipeline.quantize.engine_format import EngineQuant
from pipeline.quantize.numerics import dequantize_groups, fake_quant_fp8, fake_quant_int8
from pipeline.runtime import native
from pipeline.runtime.kernels import NativeKernel, OneDnnKernel, TorchKernel, choose_kernel
from pipeline.runtime.quant_linear import QuantLinear

BITS = {"int8": 8, "int4": 4, "fp8": 0}
# (out, in, groups): odd group counts (9 groups of 64), tp-split widths (288 = 576 / 2, 768 = 1536 / 2), widths not a
# multiple of 8 or 32 (20, 40 in groups of 8, 48 in groups of 16), one group per row. Batches 1 and 2 of groups of whole
# 32-value blocks run the kernel that scales each group's sum once (rows_kernel_factored; groups of 64 and 128 have
# their own instances), the others rows_kernel; int4 in the AVX-512 instance runs rows_kernel_int4_lookup at any
# batch where groups are whole blocks. Inputs of 1056 and 1536 at eight rows (over 32 KB of activations) run
# rows_kernel_k_chunks: 1056 in groups of 96, which straddle its 512-value chunks, and a last chunk of one block;
# 37 and 21 output rows, not multiples of its tiles.
SHAPES = [(13, 20, 1), (17, 40, 5), (5, 48, 3), (33, 288, 9), (96, 576, 9), (40, 384, 3), (64, 768, 1), (31, 96, 3),
          (37, 1056, 11), (21, 1536, 1)]


@pytest.fixture(scope="module")
def kernels():
    reason = native.unavailable_reason()
    if reason is not None:
        pytest.skip(f"compiled kernels unavailable here: {reason}")
    module = native.load()  # a compiler is here: a failed build is a failure, not a skip
    assert module is not None
    return module


@pytest.fixture(params=["avx2", "avx512"])
def isa(request, kernels):
    """The weight kernels' instance under test, set for the test and restored after it."""
    if request.param not in kernels.supported_isas():
        pytest.skip(f"this CPU has no {request.param.upper()} (its instances: {', '.join(kernels.supported_isas())})")
    default = kernels.isa()
    kernels.set_isa(request.param)
    yield request.param
    kernels.set_isa(default)


def quantized(fmt: str, n: int, k: int, groups: int, zero: bool, act: str | None) -> EngineQuant:
    g = torch.Generator().manual_seed(n * 1000 + k)
    if fmt == "int8":
        q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    elif fmt == "int4":
        q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    else:
        q = (torch.randn(n, k, generator=g) * 60).clamp(-448, 448).to(torch.float8_e4m3fn)
    return EngineQuant(q, torch.rand(n, groups, generator=g) * 0.01 + 1e-3, BITS[fmt],
                       zero=torch.randn(n, groups, generator=g) * 0.01 if zero else None,
                       prequant=torch.rand(k, generator=g) + 0.5 if act else None,
                       act_scale=torch.tensor([0.04]) if act else None)


def reference(w: EngineQuant, x: torch.Tensor, act: str | None, bias: torch.Tensor | None) -> torch.Tensor:
    weight = dequantize_groups(w.q.float() if w.bits == 0 else w.q, w.scale, w.zero)
    if w.prequant is not None:
        x = x * w.prequant
    if act:
        x = {"int8": fake_quant_int8, "fp8": fake_quant_fp8}[act](x, w.act_scale)
    y = x.double() @ weight.double().T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("zero,act", [(False, None), (True, None), (False, "int8"), (True, "fp8")])
def test_native_kernel_equals_reference_dequantization(kernels, isa, fmt, zero, act):
    for n, k, groups in SHAPES:
        w = quantized(fmt, n, k, groups, zero, act)
        linear = QuantLinear(w, act, torch.float32, True, OneDnnKernel())
        assert linear.mode == "native"
        bias = torch.randn(n) if zero else None
        for batch in (1, 2, 3, 5, 8, 10, 11):  # 10: a pass of 8 rows, then the factored kernel's 2
            x = torch.randn(batch, 2, k) if batch == 3 else torch.randn(batch, k)  # 3: a (B, T, K) input
            got = linear(x, bias)
            want = reference(w, x, act, bias)
            assert got.shape == (*x.shape[:-1], n)
            # float32 accumulation in another order than float64's: a few units of float32 rounding
            err = (got.double() - want).abs().max().item()
            assert err <= 2e-6 * want.abs().max().item(), (n, k, groups, batch, err)


def test_fp8_decoding_covers_every_byte(kernels, isa):
    """Each e4m3 byte (normals, subnormals, both zeros, +-448) decodes to its value: y = x @ W^T with x = identity."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0  # the two NaN codes: never in a checkpoint (values saturate to +-448)
    q = codes.view(torch.float8_e4m3fn).reshape(1, 256)
    w = EngineQuant(q, torch.tensor([[0.75]]), 0)
    got = QuantLinear(w, None, torch.float32, True, OneDnnKernel())(torch.eye(256))
    assert torch.equal(got[:, 0], q.float()[0] * 0.75)


@pytest.mark.parametrize("zero", [False, True])
def test_int4_weights_come_out_exactly(kernels, isa, zero):
    """Each int4 weight, at every position of a block and with each of its 16 values, comes out as the reference's
    dequantized weight (q * scale, then + zero) bit for bit: y = x @ W^T with x = rows of the identity, wherever a
    kernel dequantizes each weight: the AVX-512 instance at any row count (it looks the weights up in a per-group
    table; groups of 2, 3, 4 and 18 blocks), the AVX2 one from three rows on (at one or two it scales each group's
    sum of the integer values once: the same in exact arithmetic only, see
    test_native_kernel_equals_reference_dequantization)."""
    row_counts = (1, 2, 4, 8) if isa == "avx512" else (4, 8)  # each divides every k
    for n, k, groups in [(16, 128, 2), (7, 96, 1), (9, 256, 2), (5, 576, 1), (3, 576, 9), (6, 1056, 11)]:
        w = quantized("int4", n, k, groups, zero, None)
        w.q[:, :16] = torch.arange(-8, 8, dtype=torch.int8)  # every value in the first block of every row
        linear = QuantLinear(w, None, torch.float32, True, OneDnnKernel())
        want = dequantize_groups(w.q, w.scale, w.zero).T
        for rows in row_counts:
            got = torch.cat([linear(x) for x in torch.eye(k).split(rows)])
            assert torch.equal(got, want), (n, k, groups, rows)


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("zero", [False, True])
def test_inputs_in_chunks_give_the_unchunked_bits(kernels, isa, fmt, zero):
    """Eight rows of 1056 inputs (34 KB of activations) run rows_kernel_k_chunks; five rows of them (21 KB) run
    rows_kernel, whose operations per row are the same from five rows on. Each row comes out with the same bits
    either way: the chunks keep every row's order of operations."""
    for n, k, groups in [(37, 1056, 11), (21, 1536, 1), (40, 1536, 24)]:
        w = quantized(fmt, n, k, groups, zero, None)
        linear = QuantLinear(w, None, torch.float32, True, OneDnnKernel())
        x = torch.randn(8, k, generator=torch.Generator().manual_seed(k))
        chunked = linear(x)
        assert torch.equal(chunked[:5], linear(x[:5])), (n, k, groups)
        assert torch.equal(chunked[3:], linear(x[3:])), (n, k, groups)


def activation_cases(act: str, scale: float) -> torch.Tensor:
    """Values whose quantization is easy to get wrong: exact ties between two neighbours of the grid and one float32
    step either side of them, the clamp's edges, FP8's subnormal range and its lower edge, zeros and infinities (not
    NaN: through the identity weights one NaN makes its whole row NaN), then random values over eight decades.
    `scale` is a power of two, so x / scale is exact and a tie stays a tie."""
    if act == "fp8":
        grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        grid = grid[grid.isfinite()].unique()  # sorted, -448 .. 448
        ties = (grid[1:] + grid[:-1]) / 2
        edges = [448.0, 464.0, 480.0, 2.0**-6, 2.0**-9, 2.0**-10, 3 * 2.0**-11]
    else:
        ties = torch.arange(-130, 130) + 0.5
        edges = [127.0, 127.5, 128.0, 128.5, 200.0]
    special = torch.tensor(edges + [-e for e in edges] + [0.0, -0.0, float("inf"), -float("inf")])
    near = torch.cat([ties, ties.nextafter(torch.tensor(float("inf"))), ties.nextafter(torch.tensor(-float("inf")))])
    g = torch.Generator().manual_seed(3)
    spread = torch.randn(20000, generator=g) * 10.0 ** torch.empty(20000).uniform_(-6, 2, generator=g)
    return torch.cat([near, special, spread]) * scale


@pytest.mark.parametrize("act,k", [("int8", 203), ("int8", 224), ("fp8", 203)])
def test_activation_quantization_is_torchs_bits(kernels, isa, act, k):
    """The compiled activation quantization (8 values at a time, then one at a time for the rest of a row) equals
    torch's, bit for bit: y = fake_quant(x * prequant) through identity int8 weights, rows of 203 values (25 vectors
    and 3 more), one and two rows a call. INT8 rows of 224 values (7 blocks of 32) take the integer product, whose
    quantization to int16 is a code of its own."""
    scale = 2.0**-4
    x = activation_cases(act, scale)
    x = torch.cat([x, torch.zeros(-len(x) % k)]).reshape(-1, k)
    prequant = torch.ones(k)
    prequant[::2] = 1.5  # an exact product in half the columns; the other half keeps the cases as they are
    eye = EngineQuant(torch.eye(k, dtype=torch.int8), torch.ones(k, 1), 8, prequant=prequant,
                      act_scale=torch.tensor([scale]))
    linear = QuantLinear(eye, act, torch.float32, True, OneDnnKernel())
    assert linear.mode == "native"
    want = {"int8": fake_quant_int8, "fp8": fake_quant_fp8}[act](x * prequant, eye.act_scale)
    for rows in (1, 2):
        got = torch.cat([linear(x[i:i + rows]) for i in range(0, len(x), rows)])
        assert torch.equal(got, want)


def integer_product(w: EngineQuant, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """SmoothQuant's product as an INT8 GEMM computes it: the activations' integers times the weights', each group's
    sum exact (int64 here), converted to float32 and multiplied by its scale, the group terms added in order in
    float32, then times the activation scale (and + bias)."""
    n, k = w.q.shape
    groups = w.scale.shape[1]
    r = torch.clamp(torch.round((x * w.prequant) / w.act_scale), -128, 127).to(torch.int64)
    q = w.q.to(torch.int64)
    y = torch.zeros(x.shape[0], n)
    for g, cols in enumerate(torch.arange(k).chunk(groups)):
        y = y + (r[:, cols] @ q[:, cols].T).float() * w.scale[:, g]
    y = y * w.act_scale
    return y if bias is None else y + bias


@pytest.mark.parametrize("groups", [1, 3, 18])
def test_smoothquant_multiplies_integers_exactly(kernels, isa, groups):
    """INT8 activations (SmoothQuant) times int8 weights in groups of whole 32-value blocks: the integers are
    multiplied and summed exactly (to float32 only per group, bit for bit what `integer_product` computes, which the
    float path's rounding after every product would not give). Weights and activations reach -128 (one 16-bit
    pair of products is then 2^15), activations saturate at both ends, batches 1 to 11."""
    n, k = 37, 576
    g = torch.Generator().manual_seed(groups)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    q[0] = -128
    w = EngineQuant(q, torch.rand(n, groups, generator=g) * 0.01 + 1e-3, 8, prequant=torch.rand(k, generator=g) + 0.5,
                    act_scale=torch.tensor([0.04]))
    linear = QuantLinear(w, "int8", torch.float32, True, OneDnnKernel())
    bias = torch.randn(n, generator=g)
    for batch in (1, 2, 3, 8, 11):
        x = torch.randn(batch, k, generator=g) * 3
        x[0, :64] = -100.0  # r = -128 after the clamp
        x[-1, 64:128] = 100.0  # r = 127
        assert torch.equal(linear(x, bias), integer_product(w, x, bias)), batch


def test_smoothquant_keeps_nan_through_the_float_path(kernels, isa):
    """Integers have no NaN: a call whose activations hold one computes in floats, and the row gets NaN as the
    reference's does; the other rows are the reference's."""
    w = quantized("int8", 16, 64, 2, False, "int8")
    linear = QuantLinear(w, "int8", torch.float32, True, OneDnnKernel())
    x = torch.randn(3, 64)
    x[1, 5] = float("nan")
    got = linear(x)
    assert got[1].isnan().all() and not got[[0, 2]].isnan().any()
    want = reference(w, x, "int8", None)
    assert torch.allclose(got[[0, 2]].double(), want[[0, 2]], rtol=0, atol=2e-6 * want[[0, 2]].abs().max().item())


def test_float32_gemv_equals_the_product(kernels, isa):
    """The plain float32 format (the `native` kernel's GEMV at decode batch sizes) in each instance: widths that are
    not a multiple of a block (20, 100), batch 1 to 11."""
    g = torch.Generator().manual_seed(5)
    for n, k in [(13, 20), (40, 384), (17, 100), (64, 1536)]:
        w = torch.randn(n, k, generator=g)
        for batch in (1, 2, 3, 8, 11):
            x = torch.randn(batch, k, generator=g)
            got = kernels.quant_linear(x, w, 3, k, torch.ones(n, 1), None, None, None, None, 0)
            want = x.double() @ w.double().T
            assert (got.double() - want).abs().max().item() <= 2e-6 * want.abs().max().item(), (n, k, batch)


class FakeModule:
    """The ISA calls of the compiled module, for a CPU with the given instances."""

    def __init__(self, supported):
        self.supported, self.chosen = supported, None

    def supported_isas(self):
        return list(self.supported)

    def set_isa(self, name):
        self.chosen = name


@pytest.mark.parametrize("env,supported,chosen,notice", [
    (None, ["avx2", "avx512"], "avx512", None), ("best", ["avx2"], "avx2", None),
    ("AVX2", ["avx2", "avx512"], "avx2", None), ("avx512", ["avx2"], "avx2", "this CPU runs avx2"),
    ("sse4", ["avx2", "avx512"], "avx512", "expected avx2, avx512 or best")])
def test_isa_choice_follows_the_environment(monkeypatch, capsys, env, supported, chosen, notice):
    """Unset or `best`: the widest instance; a name the CPU lacks, or no instance's name: one line, then the widest."""
    if env is None:
        monkeypatch.delenv(native.ISA_ENV, raising=False)
    else:
        monkeypatch.setenv(native.ISA_ENV, env)
    module = FakeModule(supported)
    assert native.choose_isa(module) is module and module.chosen == chosen
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [] if notice is None else (len(err) == 1 and notice in err[0] and native.ISA_ENV in err[0]), err


def test_both_instances_agree_on_a_decode_step(kernels):
    """AVX-512 against AVX2 on the same calls: float32 rounding apart (their sums are split over 16 or 8 lanes), and
    SmoothQuant's integer product bit for bit."""
    if "avx512" not in kernels.supported_isas():
        pytest.skip("this CPU has no AVX-512: the AVX2 instance is the only one")
    default = kernels.isa()
    try:
        for fmt, act in [("int4", None), ("int8", None), ("fp8", "fp8"), ("int8", "int8")]:
            w = quantized(fmt, 96, 576, 9, False, act)
            linear = QuantLinear(w, act, torch.float32, True, OneDnnKernel())
            x = torch.randn(8, 576)
            out = {}
            for isa in ("avx2", "avx512"):
                kernels.set_isa(isa)
                out[isa] = torch.cat([linear(x[:1]), linear(x[:2]), linear(x)])
            if act == "int8":
                assert torch.equal(out["avx2"], out["avx512"])
            else:
                scale = out["avx2"].abs().max().item()
                assert (out["avx2"] - out["avx512"]).abs().max().item() <= 2e-6 * scale, fmt
                assert not torch.equal(out["avx2"], out["avx512"])  # the instances did differ: both ran
    finally:
        kernels.set_isa(default)


def test_int4_padding_and_torch_kernel_stay_on_the_exact_path(kernels):
    w = quantized("int4", 3, 20, 1, False, None)
    assert QuantLinear(w, None, torch.float32, False, TorchKernel()).mode is None  # what the exporters run
    # float32 engines only; the bfloat16 float kernel is whichever this CPU runs (oneDNN's needs AVX-512 or AVX-NE-CONVERT)
    assert QuantLinear(w, None, torch.bfloat16, True, choose_kernel("auto", torch.bfloat16)).mode != "native"


def test_missing_compiler_falls_back_with_one_line(monkeypatch, tmp_path, capsys):
    """No compiler and no cached build: one notice, and the linear runs torch's kernels with the same result."""
    monkeypatch.setenv("TRTLLM_PIPELINE_NATIVE_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    native.load.cache_clear()
    try:
        assert native.load() is None
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no C++ compiler" in err[0] and "using torch's kernels" in err[0], err
        w = quantized("int8", 16, 64, 1, False, None)
        linear = QuantLinear(w, None, torch.float32, True, OneDnnKernel())
        assert linear.mode == "int8"  # torch's packed int8 kernel
        x = torch.randn(2, 64)
        want = reference(w, x, None, None)
        assert (linear(x).double() - want).abs().max().item() < 0.02 * want.abs().max().item()
    finally:
        monkeypatch.undo()
        native.load.cache_clear()


def test_a_build_killed_midway_does_not_block_the_next(kernels):
    """torch's build lock file left by a killed build is stale under our flock: the next load proceeds."""
    (native.build_dir() / "lock").write_text("")
    assert native.build() is not None
    assert not (native.build_dir() / "lock").exists()


@pytest.mark.parametrize("act_on_second", [False, True])
def test_gated_silu_is_torchs_bits(kernels, act_on_second):
    """The native kernel's silu(fc) * gate equals torch's chunk, F.silu and multiply bit for bit: rows of decode and
    prefill widths, halves that are not a multiple of the vector run (19, 23, 1000), saturating and zero inputs."""
    native_kernel, reference_kernel = NativeKernel(), TorchKernel()
    calls = []

    class CountingKernels:  # the compiled module, counting the calls that reach silu_mul
        def silu_mul(self, *args):
            calls.append(args[0].shape)
            return kernels.silu_mul(*args)

    native_kernel.__dict__["kernels"] = CountingKernels()  # NativeKernel.kernels is a cached_property
    g = torch.Generator().manual_seed(3)
    for shape in [(1, 1, 3072), (8, 1, 3072), (3, 5, 38), (2, 46), (4, 7, 2000)]:
        for magnitude in (1.0, 30.0):
            fused = torch.randn(shape, generator=g) * magnitude
            fused[..., :3] = torch.tensor([-100.0, 100.0, 0.0])
            got = native_kernel.gated_activation(fused, F.silu, act_on_second)
            want = reference_kernel.gated_activation(fused, F.silu, act_on_second)
            assert torch.equal(got, want), (shape, magnitude, (got - want).abs().max().item())
    assert len(calls) == 10  # every float32 silu above ran the compiled kernel
    # other activations and dtypes keep torch's ops
    fused = torch.randn(2, 8, generator=g)
    assert torch.equal(native_kernel.gated_activation(fused, F.gelu, act_on_second),
                       reference_kernel.gated_activation(fused, F.gelu, act_on_second))
    half = fused.to(torch.bfloat16)
    assert torch.equal(native_kernel.gated_activation(half, F.silu, act_on_second),
                       reference_kernel.gated_activation(half, F.silu, act_on_second))
    assert len(calls) == 10


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                    reason="torch dispatches to AVX2 here, which the test above covers")
def test_gated_silu_follows_torchs_dispatch(kernels):
    """torch's elementwise runs are two of its vectors: 32 values under AVX-512, 16 under AVX2, and the values after
    a row's last run take the scalar exp. The test above ran under AVX-512 here; the same test in a process that
    tells torch to dispatch to AVX2 (ATEN_CPU_CAPABILITY=avx2) checks the other run length on this machine."""
    test = f"{__file__}::test_gated_silu_is_torchs_bits"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                          env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}, capture_output=True, text=True)
    assert done.returncode == 0 and "2 passed" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
