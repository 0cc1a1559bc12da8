"""Weight layout of TensorRT-LLM's weight-only mixed-precision GEMM (W4A16 / W8A16, GPTQ and per-channel).

TensorRT-LLM does not store weight-only quantized linears in a plain layout: the integer matrix, laid out
(in, out) like the transposed ``nn.Linear`` weight, is re-arranged for the CUTLASS mixed-input kernel by
``preprocess_weights_for_mixed_gemm``, and the GPTQ converters write the result straight into the checkpoint
(an fp16 "bit container" of shape (in, out/4) for int4, (in, out/2) for int8). This module re-implements that
re-arrangement and its inverse for fp16/bf16 activations, so that we can write such checkpoints without a GPU
and read them back on the CPU.

Caller contract
---------------
* ``q`` holds *signed* integers laid out (in, out), one value per element: int4 in [-8, 7], int8 in
  [-128, 127]. For AutoGPTQ int4 that is ``unpack(qweight.T).T - 8`` (``qweight`` is int32 (in/8, out) with
  eight nibbles along the input dim, lowest nibble first); for int8 GPTQ it is ``uint8 - 128``.
* The nibble packing that TensorRT-LLM's converters apply before calling the preprocessor (along the output
  dim, element 2k in the low nibble of byte k, two's complement nibbles) is done here: do not pack ``q``.
* The result is the int8 byte tensor the preprocessor returns, shaped (in, out/2) for int4 and (in, out) for
  int8; write ``result.view(torch.float16)`` (shape (in, out/4) resp. (in, out/2)) into the checkpoint.
  ``unpreprocess_weights_for_mixed_gemm`` takes either that int8 tensor or the 16-bit container.
* Tensor-parallel splitting happens before preprocessing, on ``q`` (each rank's (in, out) slice is laid out on
  its own); shape requirements below apply per rank.
* The layout depends on the GPU the checkpoint is meant for (``sm``, e.g. 80 for A100, 86, 89, 90 for H100).

The steps
---------
Let K = in, N = out, b = bits. In the order TensorRT-LLM applies them:

1. LDSM row permutation (SM75-89, SM90 current, SM100+): within every group of 32 rows (int4) or 16 rows
   (int8) of the (K, N) matrix, output row r is input row ``P[r]`` with
   int4 ``P = 0 1 8 9 16 17 24 25 2 3 10 11 18 19 26 27 4 5 12 13 20 21 28 29 6 7 14 15 22 23 30 31`` and
   int8 ``P = 0 1 8 9 2 3 10 11 4 5 12 13 6 7 14 15`` (pairs of rows, strided by 8).
2. Sub-byte transpose (all supported archs): the matrix becomes column-major, i.e. the element stream runs
   over k fastest: stream index ``n*K + k``; for int4, even k in the low nibble.
3. Column interleave (SM75-89, SM100+; not SM90): tiles of 64 consecutive k (ThreadblockK = 128*8/16 for
   fp16/bf16 activations) of I adjacent columns are placed one after the other, I = 4 for int4 and 2 for
   int8 (ColumnsInterleaved = (128*8/b) / 64). Stream index of (n, k):
   ``(((n // I) * (K // 64) + k // 64) * I + n % I) * 64 + k % 64``.
4. Bias and register interleave (SM75-89, SM90 current, SM100+): every value gets +8 (int4) / +128 (int8),
   making it unsigned, and inside every 32-bit word the elements are reordered: for int4 the word that held
   elements e0..e7 (e0 in the lowest nibble) holds, from the lowest nibble up, e0 e2 e4 e6 e1 e3 e5 e7; for
   int8 the bytes e0 e1 e2 e3 become e0 e2 e1 e3.

Shape requirements (ValueError otherwise): int4 needs K and N multiples of 64; int8 needs N a multiple of 32
and K a multiple of 64 (SM75-89, SM100+; the column tile) or of 32 (SM90). These are the checks of TensorRT-LLM's
C++ preprocessor (the transpose works on 32-byte vectors, the column interleave on whole 64-row tiles, the row
permutation on whole 32/16-row groups), so anything it accepts is accepted here.

Per architecture
----------------
* SM75 (Turing), SM80/86/87/89 (Ampere, Ada): steps 1, 2, 3, 4.
* SM90 (Hopper), current layout (default): steps 1, 2, 4 (no column interleave).
  ``legacy_sm90=True`` gives the layout of older releases instead: step 2 only (no row permutation, no
  column interleave, no bias; the values stay signed). Which one a Hopper checkpoint carries depends on the
  TensorRT-LLM release that wrote it; the two cannot be told apart from the bytes alone.
* SM100+ (Blackwell): the engine-building releases map these to the SM80 layout (steps 1-4), so we do.
* SM70 (Volta) is refused: releases that build engines from this format require SM75+ for this GEMM; older
  releases used a Volta layout without row permutation or column interleave (and, further back, without the
  transpose), so supporting it would need the exact release to pick one of those.
* SM91-99 do not exist and are refused. W4A8 (fp8 activations) uses another permutation table and tile size
  and is not covered.

Sources (NVIDIA/TensorRT-LLM public sources; facts restated, no code taken)
---------------------------------------------------------------------------
* ``cpp/tensorrt_llm/kernels/cutlass_kernels/cutlass_preprocessors.cpp`` (snapshots 05316d33 and b35ac1b6):
  the permutation tables and group sizes (``get_permutation_map``, ``permute_B_rows_for_mixed_gemm``, which
  gathers output row ``base + r`` from input row ``base + P[r]``); ``subbyte_transpose`` (nibble order and the
  multiple-of-32-bytes check on both dims); ``interleave_column_major_tensor`` (write-row formula, the
  rows-per-tile and rows-multiple checks); ``add_bias_and_interleave_int4s_inplace`` / ``..._int8s_inplace``
  (bias, register pictures); ``preprocess_weights_for_mixed_gemm`` (step order; arch mapping 75-79 -> Sm75,
  80-89 -> Sm80, 90-99 -> Sm90, >=100 -> Sm80, >=120 -> 80; in b35ac1b6 the column interleave is skipped for
  arch 90 and the bias step runs for every arch, in 05316d33 the bias step runs only for 70 <= arch < 90).
* ``cpp/tensorrt_llm/cutlass_extensions/include/cutlass_extensions/gemm/kernel/mixed_gemm_B_layout.h``:
  ThreadblockK = 128*8/bits(A), ColumnsInterleaved = (128*8/bits(B)) / ThreadblockK, layout
  ``ColumnMajorTileInterleave`` with the dequantize-after-LDSM operator (which is what turns on step 1) for
  Turing+; Volta and, in some snapshots, Hopper (``>= 90``) use plain ``ColumnMajor`` with the ordinary
  operator (no step 1, no step 3).
* ``tensorrt_llm/quantization/functional.py`` (engine-building era): the PyTorch ``preprocess_weights_for_mixed_gemm``
  (SM90 with a 2-D weight: row permutation, transpose, no column interleave, bias; sm > 90 treated as 80;
  requires sm >= 75) and ``postprocess_weight_only_groupwise`` (GPTQ: ``unpack(qweight.T).T - 8``, low nibble =
  even output column, int8 GPTQ ``uint8 - 128``, result viewed as the model dtype).
* ``examples/*/convert.py`` ``load_weights_from_gptq``: the same unpack/pack and
  ``torch.ops.trtllm.preprocess_weights_for_mixed_gemm(packed, torch.quint4x2, torch.float16).view(float16)``.

Verified vs inferred
--------------------
* Read in the sources: every table, tile size, index formula, register order, step order and shape check
  above, the SM75-89 path, and the current SM90 path (stated by both the C++ and the PyTorch preprocessor).
  The vectorised implementation here was checked against a scalar re-derivation of the C++ index loops on
  random matrices for every supported arch.
* Inferred: the legacy SM90 layout pairs the 05316d33 preprocessor with a layout header whose Hopper
  specialisation is plain ``ColumnMajor`` (that header was read in forks of the repository of the same era,
  not in an NVIDIA snapshot of that date); SM100+ follows the engine-era sources (a 2026 PyTorch-backend
  version skips steps 1, 3 and 4 on SM100/103). Nothing here has been compared byte-for-byte with
  ``torch.ops.trtllm.preprocess_weights_for_mixed_gemm`` on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "LDSM_ROW_PERMUTATION",
    "REGISTER_ORDER",
    "LayoutSteps",
    "bias_and_interleave_registers",
    "check_shape",
    "interleave_column_tiles",
    "layout_steps",
    "pack_stream",
    "permute_rows_for_ldsm",
    "preprocess_weights_for_mixed_gemm",
    "unpack_stream",
    "unpreprocess_weights_for_mixed_gemm",
]

# Step 1: output row r of every group takes input row LDSM_ROW_PERMUTATION[bits][r].
LDSM_ROW_PERMUTATION: dict[int, tuple[int, ...]] = {
    4: tuple(8 * j + 2 * i + p for i in range(4) for j in range(4) for p in range(2)),
    8: tuple(8 * j + 2 * i + p for i in range(4) for j in range(2) for p in range(2)),
}

# Step 4: position j of a 32-bit word takes the element that was at REGISTER_ORDER[bits][j].
REGISTER_ORDER: dict[int, tuple[int, ...]] = {
    4: (0, 2, 4, 6, 1, 3, 5, 7),
    8: (0, 2, 1, 3),
}

# Elements of one column tile along the input dim (ThreadblockK for 16-bit activations).
_K_TILE = 64
# Columns interleaved per tile: (128 * 8 / bits) / _K_TILE.
_COLUMNS_INTERLEAVED = {4: 4, 8: 2}


@dataclass(frozen=True)
class LayoutSteps:
    """Which of the four re-layout steps an architecture applies (the sub-byte transpose always runs)."""

    permute_rows: bool
    columns_interleaved: int  # 1: no column interleave
    bias_and_register_interleave: bool


def layout_steps(bits: int, sm: int, *, legacy_sm90: bool = False) -> LayoutSteps:
    """The steps TensorRT-LLM's preprocessor applies for ``bits`` on GPU architecture ``sm``."""
    _check_bits(bits)
    if isinstance(sm, bool) or not isinstance(sm, int):
        raise ValueError(f"sm must be an integer SM version such as 80, 86, 89 or 90, got {sm!r}")
    if sm < 70:
        raise ValueError(f"sm {sm}: the weight-only mixed GEMM needs SM75 or newer")
    if sm < 75:
        raise ValueError(
            f"sm {sm}: Volta is not supported; releases that build engines from this format need SM75+ for the "
            "weight-only GEMM, and older releases used a Volta layout (no row permutation or column interleave) "
            "that differed between releases"
        )
    if legacy_sm90 and sm != 90:
        raise ValueError(f"legacy_sm90 applies only to sm 90, got sm {sm}")
    if 75 <= sm < 90 or sm >= 100:
        return LayoutSteps(True, _COLUMNS_INTERLEAVED[bits], True)
    if sm == 90:
        if legacy_sm90:
            return LayoutSteps(False, 1, False)
        return LayoutSteps(True, 1, True)
    raise ValueError(f"sm {sm}: unknown architecture (expected 75-89, 90 or 100+)")


def check_shape(rows: int, cols: int, bits: int, sm: int, *, legacy_sm90: bool = False) -> None:
    """Raise ValueError unless an (in=rows, out=cols) matrix can take the layout for ``sm``."""
    steps = layout_steps(bits, sm, legacy_sm90=legacy_sm90)
    problems = []
    # The transpose moves 32-byte vectors: 64 int4 or 32 int8 elements along each dim.
    vector = 256 // bits
    k_multiple = vector
    reasons = [f"the sub-byte transpose works on 32-byte vectors ({vector} int{bits} values)"]
    if steps.permute_rows:
        group = len(LDSM_ROW_PERMUTATION[bits])
        k_multiple = math.lcm(k_multiple, group)
        reasons.append(f"the LDSM row permutation works on groups of {group} rows")
    if steps.columns_interleaved > 1:
        k_multiple = math.lcm(k_multiple, _K_TILE)
        reasons.append(f"the column interleave works on tiles of {_K_TILE} input rows")
    if rows <= 0 or rows % k_multiple:
        problems.append(
            f"in_features (rows) must be a positive multiple of {k_multiple}, got {rows} ({'; '.join(reasons)})"
        )
    if cols <= 0 or cols % vector:
        problems.append(
            f"out_features (columns) must be a positive multiple of {vector}, got {cols} "
            f"(the sub-byte transpose works on 32-byte vectors of int{bits} values)"
        )
    if problems:
        raise ValueError(f"int{bits} weight of shape ({rows}, {cols}) cannot take the SM{sm} mixed-GEMM layout: "
                         + "; ".join(problems))


def preprocess_weights_for_mixed_gemm(q: torch.Tensor, bits: int, sm: int, *, legacy_sm90: bool = False
                                      ) -> torch.Tensor:
    """Lay out signed integers ``q`` (in, out) as TensorRT-LLM's mixed-GEMM preprocessor does for ``sm``.

    Returns int8 bytes of shape (in, out/2) for int4, (in, out) for int8; view as float16 for the checkpoint.
    """
    _check_bits(bits)
    if q.dim() != 2:
        raise ValueError(f"expected a 2-D (in, out) tensor, got shape {tuple(q.shape)}")
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise ValueError(f"expected an integer tensor of signed int{bits} values, got dtype {q.dtype}")
    rows, cols = q.shape
    check_shape(rows, cols, bits, sm, legacy_sm90=legacy_sm90)
    steps = layout_steps(bits, sm, legacy_sm90=legacy_sm90)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = q.detach().to(torch.int16)
    if int(q.min()) < lo or int(q.max()) > hi:
        raise ValueError(f"int{bits} values must lie in [{lo}, {hi}], got [{int(q.min())}, {int(q.max())}]")
    codes = (q & ((1 << bits) - 1)).to(torch.uint8)  # two's complement code of each value

    if steps.permute_rows:
        codes = permute_rows_for_ldsm(codes, bits)
    stream = codes.t().reshape(-1)  # sub-byte transpose: column-major, k runs fastest
    if steps.columns_interleaved > 1:
        stream = interleave_column_tiles(stream, rows, cols, steps.columns_interleaved)
    if steps.bias_and_register_interleave:
        stream = bias_and_interleave_registers(stream, bits)
    return pack_stream(stream, bits).reshape(rows, cols * bits // 8)


def unpreprocess_weights_for_mixed_gemm(data: torch.Tensor, bits: int, sm: int, *, legacy_sm90: bool = False
                                        ) -> torch.Tensor:
    """Invert ``preprocess_weights_for_mixed_gemm``: signed int8 values laid out (in, out).

    ``data`` is the int8 (or uint8) byte tensor, (in, out/2) for int4 and (in, out) for int8, or the same bytes
    viewed as a 16-bit container (float16 / bfloat16 / int16) as stored in the checkpoint.
    """
    _check_bits(bits)
    if data.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(data.shape)}")
    if data.dtype not in (torch.int8, torch.uint8, torch.float16, torch.bfloat16, torch.int16):
        raise ValueError(f"expected int8/uint8 bytes or a 16-bit container, got dtype {data.dtype}")
    data = data.detach().contiguous().view(torch.uint8)
    rows, byte_cols = data.shape
    cols = byte_cols * 8 // bits
    check_shape(rows, cols, bits, sm, legacy_sm90=legacy_sm90)
    steps = layout_steps(bits, sm, legacy_sm90=legacy_sm90)

    stream = unpack_stream(data.reshape(-1), bits)
    if steps.bias_and_register_interleave:
        stream = bias_and_interleave_registers(stream, bits, inverse=True)
    if steps.columns_interleaved > 1:
        stream = interleave_column_tiles(stream, rows, cols, steps.columns_interleaved, inverse=True)
    codes = stream.reshape(cols, rows).t()
    if steps.permute_rows:
        codes = permute_rows_for_ldsm(codes, bits, inverse=True)
    values = codes.to(torch.int16)
    values = values - ((values >> (bits - 1)) << bits)  # sign-extend the two's complement codes
    return values.to(torch.int8).contiguous()


# The steps, each with its inverse. They work on uint8 codes, one element per entry; a "stream" is the
# flat element sequence in storage order (element i in bits [i*b, (i+1)*b) of the little-endian bytes).

def permute_rows_for_ldsm(codes: torch.Tensor, bits: int, *, inverse: bool = False) -> torch.Tensor:
    """Step 1 on a (rows, cols) matrix: output row base+r is input row base+P[r] in every group of rows."""
    index = _row_gather_index(codes.shape[0], bits, codes.device)
    if inverse:
        index = torch.argsort(index)
    return codes[index]


def interleave_column_tiles(stream: torch.Tensor, rows: int, cols: int, interleave: int, *,
                            inverse: bool = False) -> torch.Tensor:
    """Step 3 on a column-major stream: the 64-row tiles of ``interleave`` adjacent columns follow each other."""
    tiles = rows // _K_TILE
    if inverse:
        return stream.reshape(cols // interleave, tiles, interleave, _K_TILE).permute(0, 2, 1, 3).reshape(-1)
    return stream.reshape(cols // interleave, interleave, tiles, _K_TILE).permute(0, 2, 1, 3).reshape(-1)


def bias_and_interleave_registers(stream: torch.Tensor, bits: int, *, inverse: bool = False) -> torch.Tensor:
    """Step 4: +8 / +128 (modulo 2**bits) and the element order inside every 32-bit word."""
    order = torch.tensor(REGISTER_ORDER[bits], device=stream.device)
    if inverse:
        order = torch.argsort(order)
    flipped = stream ^ (1 << (bits - 1))  # adding half the range to a two's complement code
    return flipped.reshape(-1, len(order))[:, order].reshape(-1)


def pack_stream(stream: torch.Tensor, bits: int) -> torch.Tensor:
    """Element stream (uint8 codes) -> bytes as int8; int4: element 2j in the low nibble of byte j."""
    if bits == 8:
        return stream.view(torch.int8)
    return (stream[0::2] | (stream[1::2] << 4)).view(torch.int8)


def unpack_stream(data: torch.Tensor, bits: int) -> torch.Tensor:
    """Bytes (uint8) -> element stream of uint8 codes."""
    if bits == 8:
        return data
    return torch.stack((data & 0xF, data >> 4), dim=1).reshape(-1)


def _check_bits(bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")


def _row_gather_index(rows: int, bits: int, device: torch.device) -> torch.Tensor:
    """Index g with permuted[r] = original[g[r]] for all rows (rows is a multiple of the group size)."""
    table = torch.tensor(LDSM_ROW_PERMUTATION[bits], device=device)
    group = len(table)
    bases = torch.arange(0, rows, group, device=device)
    return (bases[:, None] + table[None, :]).reshape(-1)
