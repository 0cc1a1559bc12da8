"""NeMo sources against their HF twins: the same weights, sharded differently at the source, must convert to the
same TensorRT-LLM checkpoint tensor for tensor (and the same config)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.convert.converter import convert
from pipeline.convert.registry import MappingArgs
from pipeline.convert.sources import open_source
from tests.convert import megatron_samples as ms


def convert_both(kind: str, src, tiny_models, tmp_path, target: tuple[int, int]):
    twin = tiny_models["llama_gqa_untied" if kind == "llama" else "gpt2"]
    a, b = tmp_path / "from_hf", tmp_path / "from_source"
    convert(open_source("hf", twin), a, "float32", MappingArgs(*target), progress=False)
    source = open_source(*src) if isinstance(src, tuple) else src
    try:
        convert(source, b, "float32", MappingArgs(*target), progress=False)
    finally:
        source.close()
    return a, b


def assert_same_checkpoint(a, b):
    cfg_a, cfg_b = (json.loads((d / "config.json").read_text()) for d in (a, b))
    assert cfg_a == cfg_b
    ranks = cfg_a["mapping"]["world_size"]
    for r in range(ranks):
        x, y = load_file(a / f"rank{r}.safetensors"), load_file(b / f"rank{r}.safetensors")
        assert list(x) == list(y)
        for name in x:
            assert torch.equal(x[name], y[name]), name


def megatron_dict(kind, tiny_models, **kw):
    twin = tiny_models["llama_gqa_untied" if kind == "llama" else "gpt2"]
    hf_cfg = json.loads((twin / "config.json").read_text())
    sd = ms.hf_state(twin)
    glob = ms.llama_to_megatron(sd, hf_cfg, **kw) if kind == "llama" else ms.gpt2_to_megatron(sd, hf_cfg)
    return hf_cfg, glob


# (source tp, source pp) -> (target tp, target pp): every source layout to a different target.
CASES = [((2, 2), (1, 1)), ((1, 1), (4, 1)), ((2, 1), (1, 2)), ((1, 2), (2, 1))]


@pytest.mark.parametrize("kind", ["llama", "gpt"])
@pytest.mark.parametrize("source_mapping,target", CASES)
def test_nemo_archive_equals_hf_twin(kind, source_mapping, target, tiny_models, tmp_path):
    hf_cfg, glob = megatron_dict(kind, tiny_models)
    vocab = hf_cfg["vocab_size"]
    tp, pp = source_mapping
    padded = -(-vocab // (8 * tp)) * 8 * tp
    shards = ms.shard(ms.pad_vocab(glob, padded), tp, pp, gated=kind == "llama")
    nemo = ms.write_nemo(tmp_path / "model.nemo", shards, ms.nemo_config(kind, hf_cfg, tp, pp),
                         tokenizer=ms.bpe_tokenizer_files(vocab))
    a, b = convert_both(kind, ("nemo", nemo), tiny_models, tmp_path, target)
    assert_same_checkpoint(a, b)


@pytest.mark.parametrize("variant", ["gzip", "directory", "amp_o2", "mcore_names", "layernorm1p"])
def test_nemo_container_variants(variant, tiny_models, tmp_path):
    """gzip archives (NeMo before 1.7), extracted directories, megatron_amp_O2's `model.module.` prefix, mcore key
    spellings with TE-fused norms, and layernorm1p (stored as w - 1) all read as the same model."""
    hf_cfg, glob = megatron_dict("llama", tiny_models, layernorm1p=variant == "layernorm1p")
    extra = {"normalization": "layernorm1p"} if variant == "layernorm1p" else {}
    shards = ms.shard(ms.pad_vocab(glob, 112), 2, 1, gated=True)
    cfg = ms.nemo_config("llama", hf_cfg, 2, 1, megatron_amp_O2=variant == "amp_o2")
    cfg.update(extra)
    prefix = {"amp_o2": "model.module.language_model.", "mcore_names": "model."}.get(variant, "model.language_model.")
    path = ms.write_nemo(tmp_path / ("model" if variant == "directory" else "model.nemo"), shards, cfg, prefix=prefix,
                         mcore=variant == "mcore_names", tokenizer=ms.bpe_tokenizer_files(hf_cfg["vocab_size"]),
                         mode="w:gz" if variant == "gzip" else "w:", directory=variant == "directory")
    if variant == "layernorm1p":  # rmsnorm + 1p is not a real combination: the converter refuses it
        from pipeline.errors import PipelineError

        with pytest.raises(PipelineError, match="normalization=layernorm1p"):
            open_source("nemo", path)
        return
    a, b = convert_both("llama", ("nemo", path), tiny_models, tmp_path, (2, 1))
    assert_same_checkpoint(a, b)


def test_layernorm1p_gpt(tiny_models, tmp_path):
    hf_cfg, glob = megatron_dict("gpt", tiny_models)
    for name in list(glob):
        if "layernorm.weight" in name:
            glob[name] = glob[name] - 1.0
    shards = ms.shard(glob, 1, 1, gated=False)
    path = ms.write_nemo(tmp_path / "m.nemo", shards, ms.nemo_config("gpt", hf_cfg, 1, 1, normalization="layernorm1p"))
    twin = tiny_models["gpt2"]
    source = open_source("nemo", path)
    try:
        want = ms.hf_state(twin)
        for name in ("transformer.h.1.ln_2.weight", "transformer.ln_f.weight"):
            assert torch.allclose(source.read(name), want[name], atol=1e-6)
    finally:
        source.close()


def test_tokenizer_saved_and_vocab_padding_removed(tiny_models, tmp_path):
    from pipeline.stages.convert import save_tokenizer

    hf_cfg, glob = megatron_dict("gpt", tiny_models)
    shards = ms.shard(ms.pad_vocab(glob, 104), 1, 1, gated=False)
    path = ms.write_nemo(tmp_path / "m.nemo", shards, ms.nemo_config("gpt", hf_cfg, 1, 1),
                         tokenizer=ms.bpe_tokenizer_files(97))
    source = open_source("nemo", path)
    try:
        assert source.hf_config["vocab_size"] == 97 and source.shape("transformer.wte.weight") == (97, 64)
        assert save_tokenizer(source, tmp_path / "tok")
    finally:
        source.close()
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(tmp_path / "tok")) == 97


@pytest.mark.parametrize("kind", ["llama", "gpt"])
def test_nemo_engine_gives_transformers_greedy_tokens(kind, tiny_models, tmp_path):
    """End to end: a tp2-sharded .nemo -> checkpoint -> cpu engine; greedy tokens equal transformers' on the twin."""
    from pipeline.runtime import ModelRunner
    from tests.runtime.engines import build_engine
    from tests.runtime.test_parity import PROMPTS, hf_greedy, hf_model

    hf_cfg, glob = megatron_dict(kind, tiny_models)
    vocab = hf_cfg["vocab_size"]
    shards = ms.shard(ms.pad_vocab(glob, -(-vocab // 16) * 16), 2, 1, gated=kind == "llama")
    nemo = ms.write_nemo(tmp_path / "m.nemo", shards, ms.nemo_config(kind, hf_cfg, 2, 1),
                         tokenizer=ms.bpe_tokenizer_files(vocab))
    engine = build_engine(nemo, tmp_path / "e", source="nemo")
    runner = ModelRunner.from_dir(engine)
    ref = hf_model(tiny_models["llama_gqa_untied" if kind == "llama" else "gpt2"])
    out = runner.generate([torch.tensor(p) for p in PROMPTS], max_new_tokens=10, end_id=-1, pad_id=0,
                          return_dict=True)
    for i, prompt in enumerate(PROMPTS):
        tokens = out["output_ids"][i, 0, len(prompt): out["sequence_lengths"][i, 0]].tolist()
        assert tokens == hf_greedy(ref, prompt, 10), f"{kind} prompt {i}"


def test_sentencepiece_tokenizer_artifact(tiny_models, tmp_path):
    """A `nemo:` sentencepiece artifact (trained here, offline) sets the vocabulary and is saved for the engine."""
    spm = pytest.importorskip("sentencepiece")
    from pipeline.stages.convert import save_tokenizer

    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"the quick brown fox jumps over the lazy dog {i} times" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                   model_type="bpe", minloglevel=2)
    hf_cfg, glob = megatron_dict("gpt", tiny_models)
    shards = ms.shard(glob, 1, 1, gated=False)
    cfg = ms.nemo_config("gpt", hf_cfg, 1, 1)
    cfg["tokenizer"] = {"library": "sentencepiece", "model": "nemo:a1b2_tokenizer.model"}
    path = ms.write_nemo(tmp_path / "m.nemo", shards, cfg)
    import tarfile, io as _io  # noqa: E401

    with tarfile.open(path, "a:") as tar:
        data = (tmp_path / "sp.model").read_bytes()
        info = tarfile.TarInfo("./a1b2_tokenizer.model")
        info.size = len(data)
        tar.addfile(info, _io.BytesIO(data))
    source = open_source("nemo", path)
    try:
        assert source.hf_config["vocab_size"] == 60
        assert save_tokenizer(source, tmp_path / "tok")
    finally:
        source.close()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert tok.encode("the fox", add_special_tokens=False) == spm.SentencePieceProcessor(
        model_file=str(tmp_path / "sp.model")).encode("the fox")


def test_alibi_gpt_converts_without_a_position_table(tiny_models, tmp_path):
    """ALiBi GPT: the same tensors as the learned-position twin minus the position table; position type alibi."""
    hf_cfg, glob = megatron_dict("gpt", tiny_models)
    del glob["embedding.position_embeddings.weight"]
    cfg = ms.nemo_config("gpt", hf_cfg, 2, 1, position_embedding_type="alibi")
    nemo = ms.write_nemo(tmp_path / "m.nemo", ms.shard(glob, 2, 1, gated=False), cfg)
    a, b = convert_both("gpt", ("nemo", nemo), tiny_models, tmp_path, (2, 1))
    cfg_a, cfg_b = (json.loads((d / "config.json").read_text()) for d in (a, b))
    assert cfg_b["position_embedding_type"] == "alibi"
    assert {k: v for k, v in cfg_a.items() if k != "position_embedding_type"} == \
        {k: v for k, v in cfg_b.items() if k != "position_embedding_type"}
    for r in range(2):
        x, y = load_file(a / f"rank{r}.safetensors"), load_file(b / f"rank{r}.safetensors")
        assert set(x) - set(y) == {"transformer.position_embedding.weight"} and set(y) <= set(x)
        assert all(torch.equal(x[n], y[n]) for n in y)
    from pipeline.checkpoint.validate import validate_checkpoint

    assert validate_checkpoint(b) == []
