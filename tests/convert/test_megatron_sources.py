"""Distributed checkpoints (NeMo 2, mcore .nemo, Megatron-LM torch_dist), Megatron-LM and DeepSpeed checkpoints
against their HF twins, and the security and bad-input refusals of all Megatron-family sources."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest
import torch
import yaml

from pipeline.convert.sources import open_source
from pipeline.errors import PipelineError
from tests.convert import megatron_samples as ms
from tests.conftest import REPO
from tests.convert.test_nemo import assert_same_checkpoint, convert_both, megatron_dict


def stacked_mcore(glob: dict, prefix: str) -> dict:
    """A global Megatron dict in mcore's distributed-checkpoint form: layers stacked on dim 0, mcore names."""
    per_layer: dict[str, list] = {}
    out = {}
    for name, t in ms.with_prefix(glob, "", mcore=True).items():
        if name.endswith("_extra_state"):
            continue
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            per_layer.setdefault(".".join(parts[3:]), []).append((int(parts[2]), t))
        else:
            out[prefix + name] = t
    for rest, items in per_layer.items():
        out[f"{prefix}decoder.layers.{rest}"] = torch.stack([t for _, t in sorted(items, key=lambda x: x[0])])
    return out


def save_dcp(state: dict, directory) -> None:
    import torch.distributed.checkpoint as dcp

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(directory))
    (directory / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))


def nemo2_dir(tmp_path, tiny_models):
    hf_cfg, glob = megatron_dict("llama", tiny_models)
    root = tmp_path / "nemo2"
    (root / "context").mkdir(parents=True)
    (root / "weights").mkdir()
    save_dcp(stacked_mcore(ms.pad_vocab(glob, 112), "module."), root / "weights")
    cfg = {"num_layers": hf_cfg["num_hidden_layers"], "hidden_size": 64, "ffn_hidden_size": 96,
           "num_attention_heads": 8, "num_query_groups": 2, "kv_channels": None, "normalization": "RMSNorm",
           "layernorm_epsilon": hf_cfg["rms_norm_eps"], "rotary_base": 5000.0, "rotary_percent": 1.0,
           "seq_length": 128, "position_embedding_type": "rope", "share_embeddings_and_output_weights": False,
           "add_bias_linear": False, "gated_linear_unit": True, "tensor_model_parallel_size": 2,
           "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False},
           "_target_": "nemo.collections.llm.gpt.model.llama.Llama32Config1B"}
    (root / "context" / "model.yaml").write_text(yaml.safe_dump(
        {"_target_": "nemo.collections.llm.gpt.model.llama.LlamaModel", "config": cfg}))
    (root / "context" / "io.json").write_text("{}")
    tok = root / "context" / "nemo_tokenizer"
    tok.mkdir()
    from pipeline.convert.sources.nemo import gpt2_bpe_tokenizer

    files = ms.bpe_tokenizer_files(hf_cfg["vocab_size"])
    for n, d in files.items():
        (tmp_path / n).write_bytes(d)
    gpt2_bpe_tokenizer(tmp_path / "vocab.json", tmp_path / "merges.txt").save_pretrained(tok)
    return root


@pytest.mark.parametrize("target", [(1, 1), (2, 2)])
def test_nemo2_distributed_checkpoint_equals_hf_twin(target, tiny_models, tmp_path):
    root = nemo2_dir(tmp_path, tiny_models)
    a, b = convert_both("llama", ("nemo", root), tiny_models, tmp_path, target)
    assert_same_checkpoint(a, b)


def save_zarr(state: dict, directory) -> None:
    """mcore's zarr backend by hand (its writer needs megatron-core): one zarr v2 array per key, no compressor,
    C order, chunks of half the rows (as two tensor-parallel ranks write them) and one layer of stacked arrays."""
    import itertools

    directory.mkdir(parents=True, exist_ok=True)
    for key, t in state.items():
        t = t.contiguous().float()
        chunks = [1, *t.shape[1:]] if key.split(".")[1:3] == ["decoder", "layers"] or ".decoder.layers." in key \
            else list(t.shape)
        if t.dim() >= 2:
            chunks[-2] = max(1, -(-t.shape[-2] // 2))
        d = directory / key
        d.mkdir()
        (d / ".zarray").write_text(json.dumps({"zarr_format": 2, "shape": list(t.shape), "chunks": chunks,
                                               "dtype": "<f4", "compressor": None, "fill_value": None,
                                               "order": "C", "filters": None}))
        for index in itertools.product(*[range(-(-s // c)) for s, c in zip(t.shape, chunks)]):
            block = torch.zeros(chunks)
            src = t
            for dim, (i, c) in enumerate(zip(index, chunks)):
                src = src.narrow(dim, i * c, min(c, t.shape[dim] - i * c))
            block[tuple(slice(0, n) for n in src.shape)] = src
            (d / ".".join(map(str, index))).write_bytes(block.numpy().tobytes())
    (directory / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr", "sharded_backend_version": 1}))


def test_zarr_backend_equals_hf_twin(tiny_models, tmp_path):
    root = nemo2_dir(tmp_path, tiny_models)
    hf_cfg, glob = megatron_dict("llama", tiny_models)
    import shutil

    shutil.rmtree(root / "weights")
    save_zarr(stacked_mcore(ms.pad_vocab(glob, 112), "module."), root / "weights")
    a, b = convert_both("llama", ("nemo", root), tiny_models, tmp_path, (2, 1))
    assert_same_checkpoint(a, b)


def test_mcore_nemo_archive_with_distributed_weights(tiny_models, tmp_path):
    """An mcore .nemo: model_config.yaml + model_weights/ (torch_dist), read from inside the tar."""
    hf_cfg, glob = megatron_dict("llama", tiny_models)
    weights = tmp_path / "w"
    weights.mkdir()
    save_dcp(stacked_mcore(ms.pad_vocab(glob, 112), "model."), weights)
    cfg = ms.nemo_config("llama", hf_cfg, 2, 1, mcore_gpt=True)
    cfg["tokenizer"] = {"library": "megatron", "vocab_file": "nemo:0123_vocab.json", "merge_file": "nemo:0123_merges.txt"}
    path = tmp_path / "m.nemo"
    with tarfile.open(path, "w:") as tar:
        for n, data in ms.bpe_tokenizer_files(hf_cfg["vocab_size"]).items():
            info = tarfile.TarInfo(f"./0123_{n}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        data = yaml.safe_dump(cfg).encode()
        info = tarfile.TarInfo("./model_config.yaml")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for f in sorted(weights.iterdir()):
            tar.add(f, arcname=f"./model_weights/{f.name}")
    a, b = convert_both("llama", ("nemo", path), tiny_models, tmp_path, (1, 2))
    assert_same_checkpoint(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="megatron-core's torch_dist writer calls "
                    "torch.cuda.synchronize (filesystem_async.preload_tensors): it needs a GPU")
def test_megatron_core_own_writer(tiny_models, tmp_path):
    """A checkpoint written by megatron-core's dist_checkpointing.save itself (optional extra `megatron`)."""
    pytest.importorskip("megatron.core.dist_checkpointing")
    import warnings

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    hf_cfg, glob = megatron_dict("llama", tiny_models)
    state = stacked_mcore(ms.pad_vocab(glob, 112), "module.")
    sharded = {k: ShardedTensor.from_rank_offsets(k, v.contiguous(), replica_id=0) for k, v in state.items()}
    root = nemo2_dir(tmp_path, tiny_models)
    for f in (root / "weights").iterdir():
        f.unlink()
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dist_checkpointing.save(sharded, str(root / "weights"))
    finally:
        dist.destroy_process_group()
    assert json.loads((root / "weights" / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    a, b = convert_both("llama", ("nemo", root), tiny_models, tmp_path, (2, 1))
    assert_same_checkpoint(a, b)


def test_nemo2_mixtral_equals_hf_twin(tiny_models, tmp_path):
    """A Mixtral-style NeMo 2 checkpoint (mcore MoE: router, local experts) against the HF Mixtral twin."""
    twin = tiny_models["mixtral_4e_top2"]
    hf_cfg = json.loads((twin / "config.json").read_text())
    glob = ms.mixtral_to_megatron(ms.hf_state(twin), hf_cfg)
    root = tmp_path / "nemo2"
    (root / "context").mkdir(parents=True)
    (root / "weights").mkdir()
    save_dcp(stacked_mcore(glob, "module."), root / "weights")
    cfg = {"num_layers": 3, "hidden_size": 64, "ffn_hidden_size": 48, "num_attention_heads": 4,
           "num_query_groups": 2, "normalization": "RMSNorm", "layernorm_epsilon": hf_cfg["rms_norm_eps"],
           "rotary_base": float((hf_cfg.get("rope_parameters") or {}).get("rope_theta") or hf_cfg.get("rope_theta")),
           "seq_length": 128, "position_embedding_type": "rope", "share_embeddings_and_output_weights": False,
           "add_bias_linear": False, "gated_linear_unit": True, "num_moe_experts": 4, "moe_router_topk": 2,
           "activation_func": {"_target_": "torch.nn.functional.silu"}}
    (root / "context" / "model.yaml").write_text(yaml.safe_dump(
        {"_target_": "nemo.collections.llm.gpt.model.mixtral.MixtralModel", "config": cfg}))
    a, b = tmp_path / "a", tmp_path / "b"
    from pipeline.convert.converter import convert
    from pipeline.convert.registry import MappingArgs

    for src, out in ((open_source("hf", twin), a), (open_source("nemo", root), b)):
        try:
            convert(src, out, "float32", MappingArgs(2, 1), progress=False)
        finally:
            src.close()
    assert_same_checkpoint(a, b)


def rng_state() -> dict:
    """Megatron's saved RNG states: python's, numpy's (a tuple with an ndarray) and torch's."""
    import random

    import numpy as np

    return {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state()}


def megatron_lm_dir(tmp_path, tiny_models, kind, tp, pp, nested=False):
    hf_cfg, glob = megatron_dict(kind, tiny_models)
    vocab = hf_cfg["vocab_size"]
    padded = -(-vocab // (8 * tp)) * 8 * tp
    shards = ms.shard(ms.pad_vocab(glob, padded), tp, pp, gated=kind == "llama")
    ns = ms.megatron_namespace(kind, hf_cfg, tp, pp, padded)
    ns.vocab_file, ns.merge_file = "/train/data/vocab.json", "/train/data/merges.txt"
    files = ms.bpe_tokenizer_files(vocab)
    root = tmp_path / "megatron"
    it = root / "iter_0000200"
    for (t, p), sd in shards.items():
        d = it / (f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else ""))
        d.mkdir(parents=True)
        model = ms.with_prefix(sd, "language_model.")
        torch.save({"args": ns, "checkpoint_version": 3.0, "iteration": 200, "model": model,
                    "rng_state": [rng_state()]}, d / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text("200")
    for n, d in files.items():
        (it / n).write_bytes(d)
    return root


@pytest.mark.parametrize("kind,source_mapping,target", [("llama", (2, 2), (1, 1)), ("gpt", (1, 1), (2, 1))])
def test_megatron_lm_equals_hf_twin(kind, source_mapping, target, tiny_models, tmp_path):
    root = megatron_lm_dir(tmp_path, tiny_models, kind, *source_mapping)
    a, b = convert_both(kind, ("megatron", root), tiny_models, tmp_path, target)
    assert_same_checkpoint(a, b)


def test_megatron_lm_torch_dist_equals_hf_twin(tiny_models, tmp_path):
    """Megatron-LM with --ckpt-format torch_dist: iter dir = distributed checkpoint + common.pt holding the args."""
    hf_cfg, glob = megatron_dict("llama", tiny_models)
    root = tmp_path / "mlm"
    it = root / "iter_0000050"
    it.mkdir(parents=True)
    save_dcp(stacked_mcore(ms.pad_vocab(glob, 112), ""), it)
    ns = ms.megatron_namespace("llama", hf_cfg, 2, 1, 112)
    ns.vocab_file, ns.merge_file = "vocab.json", "merges.txt"
    torch.save({"args": ns, "checkpoint_version": 3.0, "iteration": 50}, it / "common.pt")
    for n, d in ms.bpe_tokenizer_files(hf_cfg["vocab_size"]).items():
        (it / n).write_bytes(d)
    (root / "latest_checkpointed_iteration.txt").write_text("50")
    a, b = convert_both("llama", ("megatron", root), tiny_models, tmp_path, (1, 2))
    assert_same_checkpoint(a, b)


def deepspeed_dir(tmp_path, tiny_models, kind, tp, pipeline_files):
    hf_cfg, glob = megatron_dict(kind, tiny_models)
    padded = -(-hf_cfg["vocab_size"] // (8 * tp)) * 8 * tp
    shards = ms.shard(ms.pad_vocab(glob, padded), tp, 1, gated=kind == "llama")
    ns = ms.megatron_namespace(kind, hf_cfg, tp, 1, padded)
    step = tmp_path / "ds" / "global_step7"
    step.mkdir(parents=True)
    (tmp_path / "ds" / "latest").write_text("global_step7")
    for (t, _), sd in shards.items():
        module = {} if pipeline_files else ms.with_prefix(sd, "language_model.")
        torch.save({"module": module, "args": ns, "checkpoint_version": 3.0, "iteration": 7, "mp_world_size": tp,
                    "dp_world_size": 1, "ds_version": "0.14.0", "random_rng_state": rng_state()},
                   step / f"mp_rank_{t:02d}_model_states.pt")
        if pipeline_files:
            n_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
            torch.save({"word_embeddings.weight": sd["embedding.word_embeddings.weight"]},
                       step / f"layer_01-model_{t:02d}-model_states.pt")
            for i in range(n_layers):
                pre = f"encoder.layers.{i}."
                torch.save({k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)},
                           step / f"layer_{i + 3:02d}-model_{t:02d}-model_states.pt")
            torch.save({"weight": sd["encoder.final_layernorm.weight"]},
                       step / f"layer_{n_layers + 4:02d}-model_{t:02d}-model_states.pt")
            torch.save({"weight": sd["output_layer.weight"]}, step / f"layer_{n_layers + 5:02d}-model_{t:02d}-model_states.pt")
    return tmp_path / "ds"


@pytest.mark.parametrize("pipeline_files", [False, True])
def test_deepspeed_equals_hf_twin(pipeline_files, tiny_models, tmp_path):
    root = deepspeed_dir(tmp_path, tiny_models, "llama", 2, pipeline_files)
    hf_cfg = json.loads((tiny_models["llama_gqa_untied"] / "config.json").read_text())
    src = open_source("deepspeed", root)
    assert src.hf_config["vocab_size"] == 112  # no tokenizer files: the padded vocabulary stays
    src.close()
    # With the padded rows the checkpoint is the twin's plus padding; compare the twin's vocabulary part.
    from safetensors.torch import load_file

    a, b = convert_both("llama", ("deepspeed", root), tiny_models, tmp_path, (1, 1))
    x, y = load_file(a / "rank0.safetensors"), load_file(b / "rank0.safetensors")
    assert list(x) == list(y)
    for name in x:
        want, got = x[name], y[name]
        if name in ("transformer.vocab_embedding.weight", "lm_head.weight"):
            got = got[: hf_cfg["vocab_size"]]
        assert torch.equal(want, got), name


def test_deepspeed_zero_only_names_zero_to_fp32(tmp_path):
    step = tmp_path / "global_step3"
    step.mkdir()
    (tmp_path / "latest").write_text("global_step3")
    torch.save({"optimizer_state_dict": {}}, step / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(PipelineError, match="zero_to_fp32.py"):
        open_source("deepspeed", tmp_path)


# -- security and bad input -------------------------------------------------------------------------------------

def small_nemo(tmp_path, tiny_models, **kw):
    hf_cfg, glob = megatron_dict("gpt", tiny_models)
    return ms.write_nemo(tmp_path / "m.nemo", ms.shard(glob, 2, 1, gated=False), ms.nemo_config("gpt", hf_cfg, 2, 1), **kw)


def _add(path, info: tarfile.TarInfo, data: bytes = b"") -> None:
    with tarfile.open(path, "a:") as tar:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data) if data else None)


@pytest.mark.parametrize("kind", ["traversal", "absolute", "symlink", "hardlink", "device"])
def test_hostile_tar_members_refused(kind, tiny_models, tmp_path):
    path = small_nemo(tmp_path, tiny_models)
    info = tarfile.TarInfo({"traversal": "./../evil.txt", "absolute": "/etc/evil"}.get(kind, "./link"))
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, "model_config.yaml"
    elif kind == "device":
        info.type = tarfile.CHRTYPE
    _add(path, info, b"x" if kind in ("traversal", "absolute") else b"")
    before = set(os.listdir(tmp_path)) | set(os.listdir(tmp_path.parent))
    with pytest.raises(PipelineError, match=r"member '(\./\.\./evil\.txt|/etc/evil|\./link)'"):
        open_source("nemo", path)
    assert set(os.listdir(tmp_path)) | set(os.listdir(tmp_path.parent)) == before


def test_truncated_tar(tiny_models, tmp_path):
    path = small_nemo(tmp_path, tiny_models)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(PipelineError, match="truncated"):
        open_source("nemo", path)


def test_missing_shard_and_wrong_tp(tiny_models, tmp_path):
    hf_cfg, glob = megatron_dict("gpt", tiny_models)
    shards = ms.shard(glob, 2, 1, gated=False)
    missing = ms.write_nemo(tmp_path / "a.nemo", {(0, 0): shards[(0, 0)]}, ms.nemo_config("gpt", hf_cfg, 2, 1))
    with pytest.raises(PipelineError, match="mp_rank_01/model_weights.ckpt is missing"):
        open_source("nemo", missing)
    tp4 = ms.shard(glob, 4, 1, gated=False)
    wrong = ms.write_nemo(tmp_path / "b.nemo", {(0, 0): tp4[(0, 0)], (1, 0): tp4[(1, 0)]},
                          ms.nemo_config("gpt", hf_cfg, 2, 1))
    with pytest.raises(PipelineError, match="another tensor-parallel size"):
        open_source("nemo", wrong)


def test_forbidden_pickle_global(tiny_models, tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    hf_cfg, glob = megatron_dict("gpt", tiny_models)
    sd = ms.with_prefix(ms.shard(glob, 1, 1, gated=False)[(0, 0)], "model.language_model.")
    sd["evil"] = Evil()
    directory = tmp_path / "d"
    directory.mkdir()
    (directory / "model_config.yaml").write_text(yaml.safe_dump(ms.nemo_config("gpt", hf_cfg, 1, 1)))
    torch.save(sd, directory / "model_weights.ckpt")
    with pytest.raises(PipelineError, match="refusing to unpickle posix.system"):
        open_source("nemo", directory)
    # Megatron-LM args: argparse.Namespace is admitted, anything else is not.
    root = megatron_lm_dir(tmp_path, tiny_models, "gpt", 1, 1)
    f = root / "iter_0000200" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(f, weights_only=False)
    state["args"].hook = Evil()
    torch.save(state, f)
    with pytest.raises(PipelineError, match="refusing to unpickle posix.system"):
        open_source("megatron", root)


def test_distributed_metadata_restricted_unpickler(tiny_models, tmp_path):
    import pickle

    root = nemo2_dir(tmp_path, tiny_models)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (root / "weights" / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(PipelineError, match=r"\.metadata: refusing to unpickle posix.system"):
        open_source("nemo", root)


def test_nothing_in_cache_after_bad_input(tiny_models, tmp_path):
    """Through the CLI: one error line, exit code 2, no convert artifact."""
    import subprocess
    import sys

    path = small_nemo(tmp_path, tiny_models)
    _add(path, tarfile.TarInfo("./../evil.txt"), b"x")
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "model=nemo_local", f"model.path={path}",
                           f"cache_dir={cache}", "stages=[convert]", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "evil.txt" in errors[0] and "Traceback" not in proc.stderr
    assert not (cache / "convert").exists() or not any(p.is_dir() for p in (cache / "convert").iterdir())


def test_calibrated_quantization_from_nemo_equals_hf_twin(tiny_models, tmp_path):
    """The calibrate stage and AWQ run from a NeMo source as from HF: the same quantized checkpoint as the HF twin
    (given the same tokenizer)."""
    import shutil
    import subprocess
    import sys

    from safetensors.torch import load_file

    hf_cfg, glob = megatron_dict("llama", tiny_models)
    vocab = hf_cfg["vocab_size"]
    tok = ms.bpe_tokenizer_files(vocab)
    nemo = ms.write_nemo(tmp_path / "m.nemo", ms.shard(ms.pad_vocab(glob, 112), 2, 1, gated=True),
                         ms.nemo_config("llama", hf_cfg, 2, 1), tokenizer=tok)
    twin = tmp_path / "twin"
    shutil.copytree(tiny_models["llama_gqa_untied"], twin)
    for n, d in tok.items():
        (tmp_path / n).write_bytes(d)
    from pipeline.convert.sources.nemo import gpt2_bpe_tokenizer

    gpt2_bpe_tokenizer(tmp_path / "vocab.json", tmp_path / "merges.txt").save_pretrained(twin)
    dirs = []
    for recipe, path in (("nemo_local", nemo), ("hf_local", twin)):
        cache = tmp_path / f"cache_{recipe}"
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", f"model={recipe}", f"model.path={path}",
                               "quantization=w4a16_awq", "quantization.group_size=32",
                               "quantization.calibration.calib_size=2", "quantization.awq_grid=2",
                               "quantization.calibration.calib_max_seq_length=16", "dtype=float32",
                               f"cache_dir={cache}", "stages=[convert]", f"hydra.run.dir={tmp_path / recipe}"],
                              capture_output=True, text=True, cwd=REPO, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        dirs.append(next(p for p in (cache / "convert").iterdir() if p.is_dir()))
    a, b = dirs[1], dirs[0]
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    x, y = load_file(a / "rank0.safetensors"), load_file(b / "rank0.safetensors")
    assert list(x) == list(y) and all(torch.equal(x[n], y[n]) for n in x)
