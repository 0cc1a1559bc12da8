"""Gemma 1 and 2 from JAX: Orbax checkpoints written by orbax-checkpoint itself (and Flax msgpack files) from an HF
twin's weights convert to the same checkpoint as the twin, byte for byte, and the engine's greedy tokens equal
transformers'. The reader itself imports neither jax nor orbax (checked in a fresh interpreter)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.convert.converter import convert
from pipeline.convert.registry import MappingArgs
from pipeline.convert.sources import open_source
from pipeline.errors import PipelineError

pytest.importorskip("tensorstore", reason="needs tensorstore: pip install 'trtllm-pipeline[jax]'")
REPO = Path(__file__).resolve().parents[2]


def jax_tree(hf_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """The HF twin's weights in the Gemma FLAT layout the official Flax checkpoints use (written independently of
    the reader: einsum shapes from the gemma library's modules)."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    w = {k: v.float().numpy() for k, v in load_file(hf_dir / "model.safetensors").items()}
    nh, nkv, d, h = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["hidden_size"]
    gemma2 = "Gemma2" in cfg["architectures"][0]
    tree = {"transformer/embedder": {"input_embedding": w["model.embed_tokens.weight"]},
            "transformer/final_norm": {"scale": w["model.norm.weight"]}}
    for i in range(cfg["num_hidden_layers"]):
        p, t = f"model.layers.{i}.", f"transformer/layer_{i}/"
        heads = lambda name, n: w[p + name].reshape(n, d, h).transpose(0, 2, 1)  # (n*D, H) -> [n, H, D]
        tree[t + "attn/q_einsum"] = {"w": heads("self_attn.q_proj.weight", nh)}
        tree[t + "attn/kv_einsum"] = {"w": np.stack([heads("self_attn.k_proj.weight", nkv),
                                                     heads("self_attn.v_proj.weight", nkv)])}
        tree[t + "attn/attn_vec_einsum"] = {"w": w[p + "self_attn.o_proj.weight"].T.reshape(nh, d, h)}
        tree[t + "mlp/gating_einsum"] = {"w": np.stack([w[p + "mlp.gate_proj.weight"].T, w[p + "mlp.up_proj.weight"].T])}
        tree[t + "mlp/linear"] = {"w": w[p + "mlp.down_proj.weight"].T}
        tree[t + "pre_attention_norm"] = {"scale": w[p + "input_layernorm.weight"]}
        if gemma2:
            tree[t + "post_attention_norm"] = {"scale": w[p + "post_attention_layernorm.weight"]}
            tree[t + "pre_ffw_norm"] = {"scale": w[p + "pre_feedforward_layernorm.weight"]}
            tree[t + "post_ffw_norm"] = {"scale": w[p + "post_feedforward_layernorm.weight"]}
        else:
            tree[t + "pre_ffw_norm"] = {"scale": w[p + "post_attention_layernorm.weight"]}
    return tree


def save_orbax(tree, out: Path) -> Path:
    ocp = pytest.importorskip("orbax.checkpoint", reason="needs orbax-checkpoint: pip install 'trtllm-pipeline[jax-test]'")
    ocp.PyTreeCheckpointer().save(out.resolve(), tree)
    return out


def save_msgpack(tree, out: Path) -> Path:
    """flax.serialization.to_bytes' format: nested dicts, arrays as ext type 1 of msgpack((shape, dtype, bytes))."""
    import msgpack

    def nest(flat):
        root: dict = {}
        for key, leaves in flat.items():
            node = root
            for part in key.split("/"):
                node = node.setdefault(part, {})
            node.update(leaves)
        return root

    def default(obj):
        if isinstance(obj, np.ndarray):
            return msgpack.ExtType(1, msgpack.packb((obj.shape, obj.dtype.name, obj.tobytes())))
        raise TypeError(obj)

    out.write_bytes(msgpack.packb(nest(tree), default=default))
    return out


def run(kind, path, out, tp=1):
    src = open_source(kind, path)
    try:
        return convert(src, out, "float32", MappingArgs(tp), progress=False)
    finally:
        src.close()


def same_checkpoint(a: Path, b: Path) -> None:
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    for f in sorted(b.glob("rank*.safetensors")):
        assert (a / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.fixture(scope="module")
def orbax_gemmas(tiny_models, tmp_path_factory):
    """Kaggle's layout: <dir>/<variant>/ (the Orbax checkpoint) with config.json beside (the twin's)."""
    out = {}
    for model in ("gemma", "gemma2_softcap"):
        root = tmp_path_factory.mktemp(f"jax_{model}")
        save_orbax(jax_tree(tiny_models[model]), root / "tiny-it")
        shutil.copy(tiny_models[model] / "config.json", root / "config.json")
        out[model] = root
    return out


@pytest.mark.parametrize("model", ["gemma", "gemma2_softcap"])
@pytest.mark.parametrize("tp", [1, 2])
def test_orbax_equals_hf_twin(tiny_models, orbax_gemmas, tmp_path, model, tp):
    run("jax", orbax_gemmas[model], tmp_path / "jax", tp)
    run("hf", tiny_models[model], tmp_path / "hf", tp)
    same_checkpoint(tmp_path / "jax", tmp_path / "hf")


@pytest.mark.parametrize("model", ["gemma", "gemma2_no_softcap"])
def test_msgpack_equals_hf_twin(tiny_models, tmp_path, model):
    (tmp_path / "ckpt").mkdir()
    save_msgpack(jax_tree(tiny_models[model]), tmp_path / "ckpt" / "params.msgpack")
    shutil.copy(tiny_models[model] / "config.json", tmp_path / "ckpt" / "config.json")
    run("jax", tmp_path / "ckpt", tmp_path / "jax")
    run("hf", tiny_models[model], tmp_path / "hf")
    same_checkpoint(tmp_path / "jax", tmp_path / "hf")


def test_config_inferred_without_config_json(tiny_models, orbax_gemmas, tmp_path):
    """Without config.json the shapes give the dimensions (Gemma defaults for the rest); tensors are unchanged."""
    ckpt = shutil.copytree(orbax_gemmas["gemma"] / "tiny-it", tmp_path / "alone" / "tiny-it")
    run("jax", ckpt, tmp_path / "jax")
    run("hf", tiny_models["gemma"], tmp_path / "hf")
    cfg = json.loads((tmp_path / "jax" / "config.json").read_text())
    assert cfg["architecture"] == "GemmaForCausalLM" and cfg["num_key_value_heads"] == 1 and cfg["head_size"] == 32
    assert cfg["max_position_embeddings"] == 8192
    for f in sorted((tmp_path / "hf").glob("rank*.safetensors")):
        assert (tmp_path / "jax" / f.name).read_bytes() == f.read_bytes()


@pytest.mark.parametrize("model", ["gemma", "gemma2_softcap"])
def test_greedy_tokens_equal_transformers(tiny_models, orbax_gemmas, tmp_path, model):
    from pipeline.engine.cpu import BACKEND
    from pipeline.runtime import ModelRunner
    from tests.runtime.engines import BUILD
    from tests.runtime.test_parity import PROMPTS, hf_greedy, hf_model

    run("jax", orbax_gemmas[model], tmp_path / "ckpt")
    BACKEND.build(tmp_path / "ckpt", tmp_path / "engine", BUILD)
    runner = ModelRunner.from_dir(tmp_path / "engine")
    ref = hf_model(tiny_models[model])
    out = runner.generate([torch.tensor(p) for p in PROMPTS], max_new_tokens=8, end_id=-1, pad_id=0, return_dict=True)
    for i, prompt in enumerate(PROMPTS):
        tokens = out["output_ids"][i, 0, len(prompt): out["sequence_lengths"][i, 0]].tolist()
        assert tokens == hf_greedy(ref, prompt, 8), f"{model} prompt {i}"


def test_reader_imports_no_jax(orbax_gemmas):
    code = ("import sys; from pathlib import Path; from pipeline.convert.sources import open_source; "
            f"s = open_source('jax', Path({str(orbax_gemmas['gemma'])!r})); "
            "[s.read(n) for n in sorted(s.names())]; "
            "bad = [m for m in ('jax', 'jaxlib', 'flax', 'orbax') if m in sys.modules]; print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True)


def test_missing_array_is_one_error(orbax_gemmas, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(orbax_gemmas["gemma"] / "tiny-it", ckpt)
    meta = json.loads((ckpt / "_METADATA").read_text())
    key = "('transformer/layer_1/mlp/linear', 'w')"
    meta["tree_metadata"][key.replace("layer_1", "layer_9")] = meta["tree_metadata"][key]
    (ckpt / "_METADATA").write_text(json.dumps(meta))
    with pytest.raises(PipelineError, match=r"layer_9/mlp/linear.w .* cannot be opened"):
        open_source("jax", ckpt)


def test_unknown_parameter_is_one_error(tiny_models, tmp_path):
    tree = jax_tree(tiny_models["gemma"])
    tree["transformer/layer_0/attn/mystery"] = {"w": np.zeros(3, np.float32)}
    save_msgpack(tree, tmp_path / "params.msgpack")
    with pytest.raises(PipelineError, match="layer_0/attn/mystery is not a Gemma parameter"):
        open_source("jax", tmp_path / "params.msgpack")
