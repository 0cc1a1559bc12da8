"""Inverse of the TensorRT-LLM sharding, written independently of the converter, for tests: rank files back to
whole HF-named tensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def stage_layers(num_layers: int, pp: int) -> list[list[int]]:
    """torch.tensor_split semantics, computed with torch itself."""
    return [t.tolist() for t in torch.tensor_split(torch.arange(num_layers), pp)]


def reassemble_llama(ckpt: Path) -> dict[str, torch.Tensor]:
    cfg = json.loads((ckpt / "config.json").read_text())
    tp, pp = cfg["mapping"]["tp_size"], cfg["mapping"]["pp_size"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_size"]
    vocab, hidden = cfg["vocab_size"], cfg["hidden_size"]
    ranks = {r: load_file(ckpt / f"rank{r}.safetensors") for r in range(tp * pp)}
    out: dict[str, torch.Tensor] = {}

    def tp_group(pp_rank: int, name: str) -> list[torch.Tensor]:
        return [ranks[pp_rank * tp + t][name] for t in range(tp)]

    def same_on_all(pieces: list[torch.Tensor]) -> torch.Tensor:
        for p in pieces[1:]:
            assert torch.equal(p, pieces[0])
        return pieces[0]

    first = tp_group(0, "transformer.vocab_embedding.weight")
    if not cfg.get("use_parallel_embedding"):
        embed = same_on_all(first)
    elif cfg.get("embedding_sharding_dim", 0) == 0:
        embed = torch.cat(first, 0)
        assert torch.count_nonzero(embed[vocab:]) == 0, "embedding padding rows must be zero"
        embed = embed[:vocab]
    else:
        embed = torch.cat(first, 1)
    out["model.embed_tokens.weight"] = embed
    head = torch.cat(tp_group(pp - 1, "lm_head.weight"), 0)
    assert head.shape[0] == -(-vocab // tp) * tp
    assert torch.count_nonzero(head[vocab:]) == 0, "lm_head padding rows must be zero"
    out["lm_head.weight"] = head[:vocab]
    out["model.norm.weight"] = same_on_all(tp_group(pp - 1, "transformer.ln_f.weight"))

    kv_local = -(-nkv // tp)
    for pp_rank, layers in enumerate(stage_layers(cfg["num_hidden_layers"], pp)):
        for local, g in enumerate(layers):
            pre = f"transformer.layers.{local}."
            hf = f"model.layers.{g}."
            for kind in ("weight", "bias"):
                name = pre + f"attention.qkv.{kind}"
                if name not in ranks[pp_rank * tp]:
                    continue
                pieces = tp_group(pp_rank, name)
                q_rows, kv_rows = nh // tp * hd, kv_local * hd
                qs = [p[:q_rows] for p in pieces]
                ks = [p[q_rows:q_rows + kv_rows] for p in pieces]
                vs = [p[q_rows + kv_rows:] for p in pieces]
                if nkv >= tp:
                    k, v = torch.cat(ks, 0), torch.cat(vs, 0)
                else:  # each KV head duplicated over tp/nkv consecutive ranks
                    reps = tp // nkv
                    k = torch.cat([same_on_all(ks[h * reps:(h + 1) * reps]) for h in range(nkv)], 0)
                    v = torch.cat([same_on_all(vs[h * reps:(h + 1) * reps]) for h in range(nkv)], 0)
                out[hf + f"self_attn.q_proj.{kind}"] = torch.cat(qs, 0)
                out[hf + f"self_attn.k_proj.{kind}"] = k
                out[hf + f"self_attn.v_proj.{kind}"] = v
            dense = (("attention.dense", "self_attn.o_proj", 1),)
            if not cfg.get("moe"):
                dense += (("mlp.fc", "mlp.gate_proj", 0), ("mlp.gate", "mlp.up_proj", 0), ("mlp.proj", "mlp.down_proj", 1))
            for trt, hf_name, dim in dense:
                out[hf + hf_name + ".weight"] = torch.cat(tp_group(pp_rank, pre + trt + ".weight"), dim)
                if pre + trt + ".bias" in ranks[pp_rank * tp]:
                    pieces = tp_group(pp_rank, pre + trt + ".bias")
                    out[hf + hf_name + ".bias"] = same_on_all(pieces) if dim == 1 else torch.cat(pieces, 0)
            out[hf + "input_layernorm.weight"] = same_on_all(tp_group(pp_rank, pre + "input_layernorm.weight"))
            out[hf + "post_attention_layernorm.weight"] = same_on_all(tp_group(pp_rank, pre + "post_layernorm.weight"))
    return out


def reassemble_moe(ckpt: Path) -> dict[str, torch.Tensor]:
    """Mixtral's experts back to HF per-expert names (`block_sparse_moe.experts.{e}.w1/w2/w3`, `gate`). tp rank r
    holds moe_tp rank r // ep and moe_ep rank r % ep: experts [ep_rank * E/ep, ...) and slice moe_tp_rank of each
    expert's inner dimension, with fc = [w3 slice; w1 slice]."""
    cfg = json.loads((ckpt / "config.json").read_text())
    m = cfg["mapping"]
    tp, pp = m["tp_size"], m["pp_size"]
    ep = m.get("moe_ep_size", 1)
    moe_tp = m.get("moe_tp_size", tp)
    experts = cfg["moe"]["num_experts"]
    per_rank = experts // ep
    ranks = {r: load_file(ckpt / f"rank{r}.safetensors") for r in range(tp * pp)}
    out: dict[str, torch.Tensor] = {}
    for pp_rank, layers in enumerate(stage_layers(cfg["num_hidden_layers"], pp)):
        for local, g in enumerate(layers):
            pre, hf = f"transformer.layers.{local}.mlp.", f"model.layers.{g}.block_sparse_moe."
            group = [ranks[pp_rank * tp + t] for t in range(tp)]
            routers = [r[pre + "router.weight"] for r in group]
            assert all(x.dtype == torch.float32 and torch.equal(x, routers[0]) for x in routers)
            out[hf + "gate.weight"] = routers[0]
            for e in range(experts):
                w1, w2, w3 = [], [], []
                for t in range(tp):
                    if t % ep != e // per_rank:
                        continue  # this rank's experts are another block
                    assert t // ep == len(w1)  # moe_tp slices in order
                    fc = group[t][pre + "fc.weight"][e % per_rank]
                    half = fc.shape[0] // 2
                    w3.append(fc[:half])
                    w1.append(fc[half:])
                    w2.append(group[t][pre + "proj.weight"][e % per_rank])
                assert len(w1) == moe_tp
                out[hf + f"experts.{e}.w1.weight"] = torch.cat(w1, 0)
                out[hf + f"experts.{e}.w3.weight"] = torch.cat(w3, 0)
                out[hf + f"experts.{e}.w2.weight"] = torch.cat(w2, 1)
    return out
