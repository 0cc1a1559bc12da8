import itertools

import pytest
import torch

from pipeline.quantize.mixed_gemm import (
    LDSM_ROW_PERMUTATION,
    REGISTER_ORDER,
    bias_and_interleave_registers,
    interleave_column_tiles,
    layout_steps,
    pack_stream,
    permute_rows_for_ldsm,
    preprocess_weights_for_mixed_gemm,
    unpack_stream,
    unpreprocess_weights_for_mixed_gemm,
)

# The row maps as printed in TensorRT-LLM's cutlass_preprocessors.cpp (comment above get_permutation_map).
SOURCE_ROW_MAP = {
    8: [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15],
    4: [0, 1, 8, 9, 16, 17, 24, 25, 2, 3, 10, 11, 18, 19, 26, 27,
        4, 5, 12, 13, 20, 21, 28, 29, 6, 7, 14, 15, 22, 23, 30, 31],
}

SMS = [75, 80, 86, 89, 90, 100, 120]


def random_q(rows, cols, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    half = 1 << (bits - 1)
    return torch.randint(-half, half, (rows, cols), generator=g, dtype=torch.int8)


# --- step 1: LDSM row permutation -------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_row_map_matches_source_table(bits):
    assert list(LDSM_ROW_PERMUTATION[bits]) == SOURCE_ROW_MAP[bits]
    assert sorted(LDSM_ROW_PERMUTATION[bits]) == list(range(len(SOURCE_ROW_MAP[bits])))


@pytest.mark.parametrize("bits,period", [(4, 32), (8, 16)])
def test_row_permutation_is_a_permutation_with_the_source_period(bits, period):
    rows = 4 * period
    rows_idx = torch.arange(rows, dtype=torch.int64)[:, None].expand(rows, 8).to(torch.uint8)
    out = permute_rows_for_ldsm(rows_idx, bits)[:, 0].tolist()
    assert sorted(out) == list(range(rows))
    for r in range(rows):  # output row base + r comes from input row base + P[r]
        assert out[r] == (r // period) * period + SOURCE_ROW_MAP[bits][r % period]
    assert torch.equal(permute_rows_for_ldsm(permute_rows_for_ldsm(rows_idx, bits), bits, inverse=True), rows_idx)


# --- step 3: column interleave ----------------------------------------------------------------------

@pytest.mark.parametrize("rows,cols,interleave", [(64, 8, 4), (128, 64, 4), (192, 32, 2), (64, 64, 2)])
def test_column_interleave_is_the_documented_bijection(rows, cols, interleave):
    stream = torch.arange(rows * cols, dtype=torch.int64)  # column-major position n*rows + k
    out = interleave_column_tiles(stream, rows, cols, interleave)
    assert sorted(out.tolist()) == list(range(rows * cols))
    where = {int(v): i for i, v in enumerate(out.tolist())}
    tiles = rows // 64
    for n, k in itertools.product(range(cols), range(rows)):
        expected = (((n // interleave) * tiles + k // 64) * interleave + n % interleave) * 64 + k % 64
        assert where[n * rows + k] == expected
    assert torch.equal(interleave_column_tiles(out, rows, cols, interleave, inverse=True), stream)


# --- step 4: bias and register interleave -----------------------------------------------------------

def test_int4_bias_maps_signed_to_unsigned_nibbles():
    signed = list(range(-8, 8))
    codes = torch.tensor([v & 0xF for v in signed], dtype=torch.uint8)  # 16 values = two registers
    out = bias_and_interleave_registers(codes, 4)
    expected_in_place = torch.tensor([v + 8 for v in signed], dtype=torch.uint8)
    order = REGISTER_ORDER[4]
    for reg in range(2):
        for j in range(8):
            assert int(out[8 * reg + j]) == int(expected_in_place[8 * reg + order[j]])
    assert sorted(out.tolist()) == list(range(16))


def test_int8_bias_maps_signed_to_unsigned_bytes():
    signed = torch.arange(-128, 128, dtype=torch.int16)
    out = bias_and_interleave_registers((signed & 0xFF).to(torch.uint8), 8)
    unswapped = out.reshape(-1, 4)[:, [0, 2, 1, 3]].reshape(-1)  # [0, 2, 1, 3] is its own inverse
    assert torch.equal(unswapped.to(torch.int16), signed + 128)


def test_int4_register_picture_from_the_source():
    # Source picture, bit 31 .. 0: [elt_7 elt_5 elt_3 elt_1 elt_6 elt_4 elt_2 elt_0].
    biased_elements = torch.arange(8, dtype=torch.uint8)
    codes = biased_elements ^ 8  # codes whose biased values are 0..7
    word = pack_stream(bias_and_interleave_registers(codes, 4), 4).view(torch.uint8)
    assert int.from_bytes(bytes(word.tolist()), "little") == 0x75316420


def test_int8_register_picture_from_the_source():
    # Source picture, bit 31 .. 0: [elt_3 elt_1 elt_2 elt_0].
    codes = torch.tensor([10, 11, 12, 13], dtype=torch.uint8) ^ 0x80
    out = bias_and_interleave_registers(codes, 8)
    assert int.from_bytes(bytes(out.tolist()), "little") == 0x0D0B0C0A


@pytest.mark.parametrize("bits", [4, 8])
def test_register_step_round_trips(bits):
    g = torch.Generator().manual_seed(3)
    stream = torch.randint(0, 1 << bits, (256,), generator=g).to(torch.uint8)
    there = bias_and_interleave_registers(stream, bits)
    assert torch.equal(bias_and_interleave_registers(there, bits, inverse=True), stream)


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_puts_even_elements_in_low_nibble(bits):
    stream = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    packed = pack_stream(stream, bits).view(torch.uint8).tolist()
    assert packed == ([0x21, 0x43] if bits == 4 else [1, 2, 3, 4])
    assert torch.equal(unpack_stream(pack_stream(stream, bits).view(torch.uint8), bits), stream)


# --- per-arch plans ---------------------------------------------------------------------------------

def test_layout_steps_per_arch():
    for sm in (75, 80, 86, 87, 89, 100, 120):
        s4, s8 = layout_steps(4, sm), layout_steps(8, sm)
        assert (s4.permute_rows, s4.columns_interleaved, s4.bias_and_register_interleave) == (True, 4, True)
        assert (s8.permute_rows, s8.columns_interleaved, s8.bias_and_register_interleave) == (True, 2, True)
    h = layout_steps(4, 90)
    assert (h.permute_rows, h.columns_interleaved, h.bias_and_register_interleave) == (True, 1, True)
    legacy = layout_steps(4, 90, legacy_sm90=True)
    assert (legacy.permute_rows, legacy.columns_interleaved, legacy.bias_and_register_interleave) == (False, 1, False)


@pytest.mark.parametrize("bits", [4, 8])
def test_ampere_family_shares_one_layout_and_hopper_differs(bits):
    q = random_q(128, 128, bits, seed=5)
    ref = preprocess_weights_for_mixed_gemm(q, bits, 80)
    for sm in (75, 86, 89, 100, 120):
        assert torch.equal(preprocess_weights_for_mixed_gemm(q, bits, sm), ref)
    assert not torch.equal(preprocess_weights_for_mixed_gemm(q, bits, 90), ref)


# --- worked examples (positions derived by hand from the step definitions) --------------------------

def _single(rows, cols, r, c, v):
    q = torch.zeros(rows, cols, dtype=torch.int8)
    q[r, c] = v
    return q


def test_worked_example_int4_sm80():
    # q[8, 1] = 1, K=128, N=64: row 8 -> row 2 (P[2] = 8); column-major index 1*128 + 2 = 130;
    # interleave (I=4): column 1 of group 0, tile 0 -> 1*64 + 2 = 66; register 8, position 2 -> position 1 = 65,
    # i.e. byte 32, high nibble, value 1 + 8. Every other element is 0 + 8.
    out = preprocess_weights_for_mixed_gemm(_single(128, 64, 8, 1, 1), 4, 80).view(torch.uint8).reshape(-1)
    assert out.shape == (128 * 64 // 2,)
    assert int(out[32]) == 0x98
    assert (torch.cat([out[:32], out[33:]]) == 0x88).all()


def test_worked_example_int4_sm90():
    # Same element on Hopper: no column interleave, so index 130 -> register 16, position 2 -> 129: byte 64, high.
    out = preprocess_weights_for_mixed_gemm(_single(128, 64, 8, 1, 1), 4, 90).view(torch.uint8).reshape(-1)
    assert int(out[64]) == 0x98
    assert (torch.cat([out[:64], out[65:]]) == 0x88).all()


def test_worked_example_int4_legacy_sm90_is_a_plain_transpose():
    # No permutation, no bias: index 1*128 + 8 = 136 -> byte 68, low nibble, value 1; zeros stay 0.
    q = _single(128, 64, 8, 1, 1)
    out = preprocess_weights_for_mixed_gemm(q, 4, 90, legacy_sm90=True).view(torch.uint8).reshape(-1)
    assert int(out[68]) == 0x01
    assert int(out.sum()) == 1
    q = random_q(128, 64, 4, seed=9)
    out = preprocess_weights_for_mixed_gemm(q, 4, 90, legacy_sm90=True).view(torch.uint8)
    t = (q.t().to(torch.int16) & 0xF).to(torch.uint8)  # (N, K) column-major
    assert torch.equal(out.reshape(64, 64), t[:, 0::2] | (t[:, 1::2] << 4))


def test_worked_example_int8_sm80():
    # q[10, 1] = 5, K=64, N=32: row 10 -> row 6 (P[6] = 10); index 1*64 + 6 = 70; interleave (I=2) keeps 70;
    # register 17 (68..71), position 2 -> position 1 = 69; value 5 + 128. Every other byte is 0 + 128.
    out = preprocess_weights_for_mixed_gemm(_single(64, 32, 10, 1, 5), 8, 80).view(torch.uint8).reshape(-1)
    assert int(out[69]) == 133
    assert (torch.cat([out[:69], out[70:]]) == 128).all()


# --- round trips and shapes -------------------------------------------------------------------------

SHAPES = [(64, 64), (128, 192), (256, 128), (4096 // 16, 64 * 3)]


@pytest.mark.parametrize("bits,sm,shape", list(itertools.product([4, 8], SMS, SHAPES)))
def test_round_trip(bits, sm, shape):
    q = random_q(*shape, bits, seed=sum(shape) + sm)
    data = preprocess_weights_for_mixed_gemm(q, bits, sm)
    assert data.dtype == torch.int8
    assert data.shape == (shape[0], shape[1] * bits // 8)
    assert torch.equal(unpreprocess_weights_for_mixed_gemm(data, bits, sm), q)
    container = data.view(torch.float16)  # what the checkpoint stores
    assert container.shape == (shape[0], shape[1] * bits // 16)
    assert torch.equal(unpreprocess_weights_for_mixed_gemm(container, bits, sm), q)


@pytest.mark.parametrize("bits", [4, 8])
def test_round_trip_legacy_sm90(bits):
    q = random_q(128, 128, bits, seed=11)
    data = preprocess_weights_for_mixed_gemm(q, bits, 90, legacy_sm90=True)
    assert torch.equal(unpreprocess_weights_for_mixed_gemm(data, bits, 90, legacy_sm90=True), q)


def test_int8_on_sm90_needs_only_32_rows():
    q = random_q(96, 64, 8, seed=2)
    data = preprocess_weights_for_mixed_gemm(q, 8, 90)
    assert torch.equal(unpreprocess_weights_for_mixed_gemm(data, 8, 90), q)


def test_wider_integer_input_accepted():
    q = random_q(64, 64, 4, seed=4)
    assert torch.equal(preprocess_weights_for_mixed_gemm(q.to(torch.int32), 4, 80),
                       preprocess_weights_for_mixed_gemm(q, 4, 80))


def test_extreme_values_round_trip():
    for bits in (4, 8):
        half = 1 << (bits - 1)
        q = torch.full((64, 64), -half, dtype=torch.int8)
        q[::2] = half - 1
        for sm in (80, 90):
            assert torch.equal(
                unpreprocess_weights_for_mixed_gemm(preprocess_weights_for_mixed_gemm(q, bits, sm), bits, sm), q)


# --- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,sm,shape,needle", [
    (4, 80, (96, 64), "multiple of 64"),       # int4 rows: transpose vector and column tile
    (4, 90, (96, 64), "multiple of 64"),       # int4 rows on Hopper: transpose vector
    (4, 80, (64, 32), "multiple of 64"),       # int4 columns
    (8, 80, (96, 64), "multiple of 64"),       # int8 rows: column tile of 64
    (8, 80, (64, 48), "multiple of 32"),       # int8 columns
    (8, 90, (80, 64), "multiple of 32"),       # int8 rows on Hopper
])
def test_bad_shapes_name_the_requirement(bits, sm, shape, needle):
    with pytest.raises(ValueError, match=needle):
        preprocess_weights_for_mixed_gemm(torch.zeros(shape, dtype=torch.int8), bits, sm)
    with pytest.raises(ValueError, match=needle):
        unpreprocess_weights_for_mixed_gemm(torch.zeros(shape[0], shape[1] * bits // 8, dtype=torch.int8), bits, sm)


def test_column_tile_is_named_in_the_error():
    with pytest.raises(ValueError, match="column interleave works on tiles of 64"):
        preprocess_weights_for_mixed_gemm(torch.zeros(96, 64, dtype=torch.int8), 8, 80)


@pytest.mark.parametrize("sm,needle", [(70, "Volta"), (72, "Volta"), (61, "SM75"), (95, "unknown"), ("80", "integer")])
def test_unsupported_sm(sm, needle):
    with pytest.raises(ValueError, match=needle):
        preprocess_weights_for_mixed_gemm(torch.zeros(64, 64, dtype=torch.int8), 4, sm)


def test_other_bad_inputs():
    z = torch.zeros(64, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        preprocess_weights_for_mixed_gemm(z, 2, 80)
    with pytest.raises(ValueError, match="legacy_sm90"):
        preprocess_weights_for_mixed_gemm(z, 4, 80, legacy_sm90=True)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        preprocess_weights_for_mixed_gemm(z + 8, 4, 80)
    with pytest.raises(ValueError, match="2-D"):
        preprocess_weights_for_mixed_gemm(z[None], 4, 80)
    with pytest.raises(ValueError, match="integer tensor"):
        preprocess_weights_for_mixed_gemm(z.float(), 4, 80)
    with pytest.raises(ValueError, match="16-bit container"):
        unpreprocess_weights_for_mixed_gemm(z.float(), 4, 80)
