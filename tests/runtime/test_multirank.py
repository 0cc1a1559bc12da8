"""TP, PP and TPxPP engines under mpirun reproduce the single-rank engine: same tokens, logits within 1e-5."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.errors import PipelineError
from tests.conftest import mpi_launcher, needs_mpirun
from tests.runtime.engines import build_engine

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [[5, 17, 3, 9, 22, 41, 7], [11, 2], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 12]]

pytestmark = needs_mpirun


def mpirun(n: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([mpi_launcher(), "-n", str(n), sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def generate_on_ranks(engine: Path, out: Path, world: int, kernel: str = "auto", *beam_args: str) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    proc = mpirun(world, "-m", "tests.runtime.mpi_generate", str(engine), str(out), kernel, *beam_args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def reference(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    engine = build_engine(tiny_models["llama_gqa_untied"], tmp)
    return generate_on_ranks(engine, tmp / "out", 1)[0]


@pytest.mark.parametrize("tp,pp,extra", [(2, 1, {}), (1, 2, {}), (2, 2, {}), (4, 1, {})],
                         ids=["tp2", "pp2", "tp2pp2", "tp4_kv_duplicated"])
def test_multirank_equals_single_rank(tiny_models, tmp_path, reference, tp, pp, extra):
    engine = build_engine(tiny_models["llama_gqa_untied"], tmp_path, tp=tp, pp=pp)
    results = generate_on_ranks(engine, tmp_path / "out", tp * pp)
    for rank, got in enumerate(results):
        assert torch.equal(got["output_ids"], reference["output_ids"]), f"rank {rank}"
        assert torch.equal(got["sequence_lengths"], reference["sequence_lengths"])
        for key in ("context_logits", "generation_logits"):
            assert (got[key] - reference[key]).abs().max().item() < 1e-5, (rank, key)


def test_parallel_embedding_under_tp(tiny_models, tmp_path, reference):
    from pipeline.convert.converter import convert
    from pipeline.convert.registry import MappingArgs
    from pipeline.convert.sources import open_source
    from pipeline.engine.cpu import BACKEND
    from tests.runtime.engines import BUILD

    for dim in (0, 1):
        ckpt, engine = tmp_path / f"ckpt{dim}", tmp_path / f"engine{dim}"
        convert(open_source("hf", tiny_models["llama_gqa_untied"]), ckpt, "float32",
                MappingArgs(2, 1, use_parallel_embedding=True, embedding_sharding_dim=dim), progress=False)
        BACKEND.build(ckpt, engine, BUILD)
        got = generate_on_ranks(engine, tmp_path / f"out{dim}", 2)[0]
        assert torch.equal(got["output_ids"], reference["output_ids"])
        assert (got["context_logits"] - reference["context_logits"]).abs().max().item() < 1e-5


def test_world_size_mismatch_is_a_clear_error(tiny_models, tmp_path):
    engine = build_engine(tiny_models["llama_gqa_untied"], tmp_path, tp=2)
    proc = mpirun(3, "-m", "pipeline.run", "--engine_dir", str(engine), "--input_ids", "1,2,3")
    assert proc.returncode != 0
    assert "world_size=2" in proc.stderr and "3 rank(s)" in proc.stderr


def test_run_command_relaunches_under_mpirun(tiny_models, tmp_path):
    engine = build_engine(tiny_models["llama_gqa_untied"], tmp_path, tp=2)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", "--engine_dir", str(engine), "--input_ids",
                           "5,17,3,9,22,41,7", "--max_new_tokens", "10", "--json"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    import json

    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and lines[0]["rank"] == 0  # only rank 0 prints


def test_single_process_loading_a_multirank_engine_names_both_sizes(tiny_models, tmp_path):
    from pipeline.runtime import ModelRunner

    engine = build_engine(tiny_models["llama_gqa_untied"], tmp_path, tp=2)
    with pytest.raises(PipelineError, match=r"world_size=2 .* 1 rank\(s\)"):
        ModelRunner.from_dir(engine)


@pytest.mark.parametrize("model,mappings", [("gpt2", ((2, 1), (1, 2))), ("gpt_bigcode_mqa", ((2, 1), (1, 2))),
                                            ("gpt_neox", ((2, 1),)), ("phi", ((2, 1),)), ("gptj", ((2, 1),)),
                                            ("gemma", ((2, 1), (1, 2), (2, 2))),
                                            ("gemma2_softcap", ((2, 1), (1, 2))), ("gemma2_no_softcap", ((2, 2),)),
                                            ("gemma3", ((2, 1), (1, 2))), ("opt_pre_norm", ((2, 1),)),
                                            ("opt_post_norm", ((2, 1),)), ("opt_proj", ((2, 1),)), ("falcon_mha_sequential", ((2, 1), (1, 2))),
                                            ("falcon_mqa_parallel", ((2, 1), (2, 2))),
                                            ("falcon_new_arch", ((2, 1), (1, 2)))])
def test_other_families_multirank_equal_single_rank(tiny_models, tmp_path, model, mappings):
    """Learned positions, LayerNorm, plain MLP, parallel residuals, partial rotary, lm_head bias, and (BigCode) one
    KV head duplicated over tp ranks. GPT-NeoX and Phi have no pipeline parallelism in TensorRT-LLM."""
    single = generate_on_ranks(build_engine(tiny_models[model], tmp_path / "tp1"), tmp_path / "o1", 1)[0]
    for tp, pp in mappings:
        engine = build_engine(tiny_models[model], tmp_path / f"tp{tp}pp{pp}", tp=tp, pp=pp,
                              **({"max_seq_len": 64} if pp == 1 else {}))
        got = generate_on_ranks(engine, tmp_path / f"o{tp}{pp}", tp * pp)
        for rank_result in got:
            assert torch.equal(rank_result["output_ids"], single["output_ids"]), (model, tp, pp)
            assert (rank_result["context_logits"] - single["context_logits"]).abs().max().item() < 1e-5


@pytest.mark.parametrize("model,mappings", [
    ("mixtral_4e_top2", ((2, 1, None), (2, 1, 2), (1, 2, None), (4, 1, 2))),
    ("mixtral_8e_top1_mqa", ((2, 1, 2), (2, 2, None))),
])
def test_moe_multirank_equal_single_rank(tiny_models, tmp_path, model, mappings):
    """Mixture of experts over tp ranks: each expert's inner size split (moe_tp), whole experts per rank (moe_ep),
    both (tp4 = moe_tp 2 x moe_ep 2, with KV heads duplicated), and pipeline stages."""
    single = generate_on_ranks(build_engine(tiny_models[model], tmp_path / "tp1"), tmp_path / "o1", 1)[0]
    for tp, pp, ep in mappings:
        engine = build_engine(tiny_models[model], tmp_path / f"tp{tp}pp{pp}ep{ep}", tp=tp, pp=pp, moe_ep_size=ep)
        got = generate_on_ranks(engine, tmp_path / f"o{tp}{pp}{ep}", tp * pp)
        for rank_result in got:
            assert torch.equal(rank_result["output_ids"], single["output_ids"]), (model, tp, pp, ep)
            for key in ("context_logits", "generation_logits"):
                assert (rank_result[key] - single[key]).abs().max().item() < 1e-5, (model, tp, pp, ep, key)


@pytest.mark.parametrize("model,tp,pp,ep", [("llama_gqa_untied", 2, 1, None), ("llama_gqa_untied", 1, 2, None),
                                            ("mixtral_4e_top2", 2, 1, 2)])
def test_beam_search_multirank_equals_single_rank(tiny_models, tmp_path, model, tp, pp, ep):
    """Beam search on every rank (logits are shared, so every rank selects the same beams and reorders its own KV
    cache rows the same way): beams, lengths and log probabilities equal the single-rank engine's."""
    beam_args = ("auto", "4", "4")  # 4 beams, end id 4 (ends some beams of these prompts)
    single = generate_on_ranks(build_engine(tiny_models[model], tmp_path / "tp1", max_beam_width=4), tmp_path / "o1", 1,
                               *beam_args)[0]
    engine = build_engine(tiny_models[model], tmp_path / "multi", tp=tp, pp=pp, moe_ep_size=ep, max_beam_width=4)
    for rank_result in generate_on_ranks(engine, tmp_path / "om", tp * pp, *beam_args):
        assert torch.equal(rank_result["output_ids"], single["output_ids"]), (model, tp, pp)
        assert torch.equal(rank_result["sequence_lengths"], single["sequence_lengths"])
        for key in ("cum_log_probs", "log_probs"):
            assert (rank_result[key] - single[key]).abs().max().item() < 1e-4, key
