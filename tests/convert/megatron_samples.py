"""Megatron-family test samples built from an HF twin through the inverse of the documented fused layouts.

NeMo and DeepSpeed's engine are too heavy to run here, so their containers are hand-built exactly as the format
reference describes (NeMo's `./`-prefixed tar members and `nemo:` artifacts, Megatron's per-rank directories,
DeepSpeed's `global_stepN` files); the tensors inside are written with `torch.save`, the training arguments as a
real `argparse.Namespace`, distributed checkpoints with `torch.distributed.checkpoint.save` itself.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from pipeline.convert.sources.megatron_weights import ROW, REPLICATED, _LAYER, rule_of


def hf_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(hf_dir / "model.safetensors")


def _interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """[q; k; v] -> Megatron's per-KV-group rows [q heads of the group; k; v]."""
    d = q.shape[0] // heads
    rest = q.shape[1:]
    qg = q.reshape(groups, heads // groups, d, *rest)
    kg, vg = k.reshape(groups, 1, d, *rest), v.reshape(groups, 1, d, *rest)
    return torch.cat([qg, kg, vg], 1).reshape(-1, *rest)


def llama_to_megatron(sd: dict[str, torch.Tensor], cfg: dict[str, Any], layernorm1p: bool = False) -> dict:
    heads, groups = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    norm = (lambda t: t - 1.0) if layernorm1p else (lambda t: t)
    out = {"embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "encoder.final_layernorm.weight": norm(sd["model.norm.weight"])}
    if "lm_head.weight" in sd and not cfg.get("tie_word_embeddings"):
        out["output_layer.weight"] = sd["lm_head.weight"]
    for i in range(cfg["num_hidden_layers"]):
        hf, m = f"model.layers.{i}.", f"encoder.layers.{i}."
        a = hf + "self_attn."
        out[m + "input_layernorm.weight"] = norm(sd[hf + "input_layernorm.weight"])
        out[m + "post_attention_layernorm.weight"] = norm(sd[hf + "post_attention_layernorm.weight"])
        out[m + "self_attention.query_key_value.weight"] = _interleave_qkv(
            sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"], heads, groups)
        out[m + "self_attention.dense.weight"] = sd[a + "o_proj.weight"]
        out[m + "mlp.dense_h_to_4h.weight"] = torch.cat([sd[hf + "mlp.gate_proj.weight"], sd[hf + "mlp.up_proj.weight"]])
        out[m + "mlp.dense_4h_to_h.weight"] = sd[hf + "mlp.down_proj.weight"]
    return out


def mixtral_to_megatron(sd: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict:
    """Llama attention plus mcore's MoE: router [E, H]; per expert fc1 = [w1 (gate); w3 (up)], fc2 = w2."""
    dense = {k: v for k, v in sd.items() if ".block_sparse_moe." not in k}
    for i in range(cfg["num_hidden_layers"]):  # llama_to_megatron wants a dense MLP: give it placeholders
        for n in ("gate_proj", "up_proj", "down_proj"):
            dense[f"model.layers.{i}.mlp.{n}.weight"] = torch.empty(0)
    out = {k: v for k, v in llama_to_megatron(dense, cfg).items() if ".mlp.dense_" not in k}
    for i in range(cfg["num_hidden_layers"]):
        moe, m = f"model.layers.{i}.block_sparse_moe.", f"encoder.layers.{i}.mlp."
        out[m + "router.weight"] = sd[moe + "gate.weight"]
        for e in range(cfg["num_local_experts"]):
            ex = f"{moe}experts.{e}."
            out[f"{m}experts.local_experts.{e}.dense_h_to_4h.weight"] = torch.cat([sd[ex + "w1.weight"],
                                                                                  sd[ex + "w3.weight"]])
            out[f"{m}experts.local_experts.{e}.dense_4h_to_h.weight"] = sd[ex + "w2.weight"]
    return out


def gpt2_to_megatron(sd: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict:
    heads, h = cfg["n_head"], cfg["n_embd"]
    out = {"embedding.word_embeddings.weight": sd["transformer.wte.weight"],
           "embedding.position_embeddings.weight": sd["transformer.wpe.weight"],
           "encoder.final_layernorm.weight": sd["transformer.ln_f.weight"],
           "encoder.final_layernorm.bias": sd["transformer.ln_f.bias"]}
    for i in range(cfg["n_layer"]):
        hf, m = f"transformer.h.{i}.", f"encoder.layers.{i}."
        w = sd[hf + "attn.c_attn.weight"].t()
        b = sd[hf + "attn.c_attn.bias"]
        out[m + "self_attention.query_key_value.weight"] = _interleave_qkv(w[:h], w[h:2 * h], w[2 * h:], heads, heads)
        out[m + "self_attention.query_key_value.bias"] = _interleave_qkv(b[:h], b[h:2 * h], b[2 * h:], heads, heads)
        for ln, name in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
            out[f"{m}{name}.weight"], out[f"{m}{name}.bias"] = sd[f"{hf}{ln}.weight"], sd[f"{hf}{ln}.bias"]
        out[m + "self_attention.dense.weight"] = sd[hf + "attn.c_proj.weight"].t()
        out[m + "self_attention.dense.bias"] = sd[hf + "attn.c_proj.bias"]
        out[m + "mlp.dense_h_to_4h.weight"] = sd[hf + "mlp.c_fc.weight"].t()
        out[m + "mlp.dense_h_to_4h.bias"] = sd[hf + "mlp.c_fc.bias"]
        out[m + "mlp.dense_4h_to_h.weight"] = sd[hf + "mlp.c_proj.weight"].t()
        out[m + "mlp.dense_4h_to_h.bias"] = sd[hf + "mlp.c_proj.bias"]
    return out


def pad_vocab(megatron: dict, rows: int) -> dict:
    """Megatron pads the vocabulary (to a multiple of make_vocab_size_divisible_by x TP) with extra rows."""
    out = dict(megatron)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in out:
            t = out[name]
            out[name] = torch.cat([t, torch.randn(rows - t.shape[0], t.shape[1]) * 0.02])
    return out


def shard(megatron: dict, tp: int, pp: int, gated: bool) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """Split a global Megatron dict the way training with (tp, pp) saves it: column tensors by rows (a gated fc1 as
    [gate_r; up_r] per rank), row tensors by columns, the rest replicated; pipeline stages with local layer
    indices, the embedding on the first stage and the final norm / output layer on the last."""
    layers = 1 + max(int(m.group(1)) for n in megatron if (m := _LAYER.match(n)))
    stages = [t.tolist() for t in torch.tensor_split(torch.arange(layers), pp)]
    out: dict[tuple[int, int], dict[str, torch.Tensor]] = {(t, p): {} for t in range(tp) for p in range(pp)}
    for name, tensor in megatron.items():
        m = _LAYER.match(name)
        suffix = m.group(2) if m else name
        if m:
            p = next(i for i, s in enumerate(stages) if int(m.group(1)) in s)
            local = f"encoder.layers.{stages[p].index(int(m.group(1)))}.{suffix}"
        else:
            p = 0 if name.startswith("embedding.") else pp - 1
            local = name
        rule = rule_of(suffix)
        if rule == REPLICATED:
            pieces = [tensor] * tp
        elif rule == ROW:
            pieces = list(tensor.chunk(tp, tensor.dim() - 1))
        elif gated and suffix.startswith("mlp.dense_h_to_4h"):
            gate, up = tensor.chunk(2, 0)
            pieces = [torch.cat([g, u]) for g, u in zip(gate.chunk(tp, 0), up.chunk(tp, 0))]
        else:
            pieces = list(tensor.chunk(tp, 0))
        for t in range(tp):
            out[(t, p)][local] = pieces[t].clone()
    return out


def with_prefix(shard_sd: dict[str, torch.Tensor], prefix: str, mcore: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in shard_sd.items():
        if mcore:
            for old, new in (("encoder.final_layernorm", "decoder.final_layernorm"), ("encoder.", "decoder."),
                             ("self_attention.query_key_value", "self_attention.linear_qkv"),
                             ("self_attention.dense", "self_attention.linear_proj"),
                             (".dense_h_to_4h", ".linear_fc1"), (".dense_4h_to_h", ".linear_fc2"),
                             ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
                             ("post_attention_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")):
                name = name.replace(old, new)
        out[prefix + name] = t
    if mcore:
        out[prefix + "decoder.layers.0.self_attention.core_attention._extra_state"] = torch.tensor([])
    return out


def torch_bytes(obj: Any) -> bytes:
    b = io.BytesIO()
    torch.save(obj, b)
    return b.getvalue()


def bpe_tokenizer_files(vocab: int) -> dict[str, bytes]:
    """A GPT-2 style vocab.json + merges.txt with exactly `vocab` entries (printable byte tokens)."""
    chars = [chr(c) for c in range(ord("!"), ord("!") + vocab - 1)] + ["<|endoftext|>"]
    return {"vocab.json": json.dumps({c: i for i, c in enumerate(chars)}).encode(),
            "merges.txt": b"#version: 0.2\n"}


def nemo_config(kind: str, hf_cfg: dict[str, Any], tp: int, pp: int, **extra) -> dict[str, Any]:
    if kind == "llama":
        cfg = dict(num_layers=hf_cfg["num_hidden_layers"], hidden_size=hf_cfg["hidden_size"],
                   ffn_hidden_size=hf_cfg["intermediate_size"], num_attention_heads=hf_cfg["num_attention_heads"],
                   num_query_groups=hf_cfg["num_key_value_heads"], kv_channels=None,
                   max_position_embeddings=hf_cfg["max_position_embeddings"], normalization="rmsnorm",
                   layernorm_epsilon=hf_cfg["rms_norm_eps"], activation="fast-swiglu", bias=False,
                   position_embedding_type="rope",
                   rotary_base=float((hf_cfg.get("rope_parameters") or {}).get("rope_theta")
                                     or hf_cfg.get("rope_theta", 10000.0)),
                   share_embeddings_and_output_weights=bool(hf_cfg.get("tie_word_embeddings")), mcore_gpt=False)
    else:
        cfg = dict(num_layers=hf_cfg["n_layer"], hidden_size=hf_cfg["n_embd"], ffn_hidden_size=4 * hf_cfg["n_embd"],
                   num_attention_heads=hf_cfg["n_head"], max_position_embeddings=hf_cfg["n_positions"],
                   encoder_seq_length=hf_cfg["n_positions"], normalization="layernorm",
                   layernorm_epsilon=hf_cfg["layer_norm_epsilon"], activation="openai-gelu", bias=True,
                   position_embedding_type="learned_absolute", share_embeddings_and_output_weights=True)
    cfg.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, precision=32,
               make_vocab_size_divisible_by=8, **extra)
    return cfg


def write_nemo(out: Path, shards: dict, config: dict, *, prefix: str = "model.language_model.", mcore: bool = False,
               tokenizer: dict[str, bytes] | None = None, mode: str = "w:", directory: bool = False) -> Path:
    """A `.nemo` archive (members `./model_config.yaml`, `./mp_rank_XX/model_weights.ckpt`, ... and tokenizer
    artifacts `./<32 hex>_<name>` referenced as `nemo:...`) or the same tree as a directory."""
    members: dict[str, bytes] = {}
    config = dict(config)
    if tokenizer:
        refs = {name: f"{i:032x}_{name}" for i, name in enumerate(tokenizer, start=0xabc)}
        members.update({refs[n]: data for n, data in tokenizer.items()})
        config["tokenizer"] = {"library": "megatron", "type": "GPT2BPETokenizer", "model": None,
                               "vocab_file": f"nemo:{refs['vocab.json']}", "merge_file": f"nemo:{refs['merges.txt']}"}
    members["model_config.yaml"] = yaml.safe_dump(config).encode()
    tp = config["tensor_model_parallel_size"]
    pp = config["pipeline_model_parallel_size"]
    for (t, p), sd in shards.items():
        folder = "" if tp * pp == 1 else f"mp_rank_{t:02d}/" if pp == 1 else f"tp_rank_{t:02d}_pp_rank_{p:03d}/"
        members[f"{folder}model_weights.ckpt"] = torch_bytes(with_prefix(sd, prefix, mcore))
    if directory:
        out.mkdir(parents=True)
        for name, data in members.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data)
        return out
    with tarfile.open(out, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def megatron_namespace(kind: str, hf_cfg: dict[str, Any], tp: int, pp: int, padded_vocab: int, **extra) -> argparse.Namespace:
    """Megatron-LM training arguments as `argparse.Namespace` (the object its checkpoints pickle)."""
    if kind == "llama":
        a = dict(num_layers=hf_cfg["num_hidden_layers"], hidden_size=hf_cfg["hidden_size"],
                 ffn_hidden_size=hf_cfg["intermediate_size"], num_attention_heads=hf_cfg["num_attention_heads"],
                 group_query_attention=True, num_query_groups=hf_cfg["num_key_value_heads"], kv_channels=None,
                 max_position_embeddings=hf_cfg["max_position_embeddings"], seq_length=32, normalization="RMSNorm",
                 norm_epsilon=hf_cfg["rms_norm_eps"], swiglu=True, add_bias_linear=False,
                 position_embedding_type="rope",
                 rotary_base=float((hf_cfg.get("rope_parameters") or {}).get("rope_theta")
                                   or hf_cfg.get("rope_theta", 10000.0)), rotary_percent=1.0,
                 untie_embeddings_and_output_weights=not hf_cfg.get("tie_word_embeddings"))
    else:
        a = dict(num_layers=hf_cfg["n_layer"], hidden_size=hf_cfg["n_embd"], ffn_hidden_size=4 * hf_cfg["n_embd"],
                 num_attention_heads=hf_cfg["n_head"], group_query_attention=False, num_query_groups=1,
                 max_position_embeddings=hf_cfg["n_positions"], seq_length=32, normalization="LayerNorm",
                 norm_epsilon=hf_cfg["layer_norm_epsilon"], swiglu=False, openai_gelu=True, add_bias_linear=True,
                 position_embedding_type="learned_absolute", untie_embeddings_and_output_weights=False)
    a.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, padded_vocab_size=padded_vocab,
             make_vocab_size_divisible_by=8, **extra)
    return argparse.Namespace(**a)
