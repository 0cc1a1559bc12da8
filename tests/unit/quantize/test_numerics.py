"""The shared quantization arithmetic, against the reference's formulas."""

from __future__ import annotations

import torch

from pipeline.quantize.numerics import (dequantize_groups, fake_quant_fp8, fake_quant_int8, pack_int4_cols,
                                        pack_int4_rows, symmetric_per_channel, symmetric_per_group, unpack_int4_cols,
                                        unpack_int4_rows)


def test_int4_packing_round_trips_and_nibble_order():
    q = torch.randint(-8, 8, (6, 10), dtype=torch.int8)
    assert torch.equal(unpack_int4_rows(pack_int4_rows(q)), q)
    assert torch.equal(unpack_int4_cols(pack_int4_cols(q)), q)
    rows = pack_int4_rows(torch.tensor([[1], [-2]], dtype=torch.int8)).view(torch.uint8)
    assert rows.item() == (0xE << 4) | 0x1  # row 0 in the low nibble, row 1 (two's complement) in the high one


def test_weight_only_rule_divides_amax_by_two_to_the_bits_minus_one():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    q, s = symmetric_per_channel(w, 8, 128.0)
    assert torch.allclose(s, torch.tensor([2.0 / 128, 0.0]))
    assert q[0].tolist() == [64, -128, 32] and q[1].tolist() == [0, 0, 0]  # -amax maps to -128; zero rows to 0
    q4, s4 = symmetric_per_channel(w, 4, 8.0)
    assert q4[0].tolist() == [4, -8, 2]


def test_group_rule_uses_seven_and_stored_scale_dtype():
    w = torch.randn(4, 64)
    q, s = symmetric_per_group(w, 4, 32, torch.float16)
    assert s.shape == (4, 2) and torch.equal(s, s.half().float())
    assert q.abs().max() <= 8 and (q.reshape(4, 2, 32).abs().amax(-1) == 7).all()
    assert (dequantize_groups(q, s) - w).abs().max() <= s.max() / 2 + 1e-6


def test_activation_fake_quantization_saturates():
    s = torch.tensor([0.5])
    x = torch.tensor([1000.0, -1000.0, 0.26, 0.24])
    assert fake_quant_int8(x, s).tolist() == [63.5, -64.0, 0.5, 0.0]
    assert fake_quant_fp8(x, s).tolist()[:2] == [224.0, -224.0]  # 448 * 0.5, not NaN
