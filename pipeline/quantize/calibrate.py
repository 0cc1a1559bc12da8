"""Calibration: run the float model over a calibration text set one decoder layer at a time and record, for every
linear layer's input, the per-channel ranges (max and mean |x|), optionally the Hessian sum x x^T, the range of the
layer's output, and the per-layer K and V ranges as the KV cache stores them.

The model is our own fp32 CPU engine (the fp32 checkpoint's tensors computed from the source as the engine asks for
them, one layer at a time, without writing a checkpoint or an engine), so calibration covers every architecture the
runtime runs, and the statistics are named by TensorRT-LLM module (`attention.qkv`, `mlp.fc`, ...) exactly as the
quantizing converter looks them up. Memory: the hidden states of the calibration set ([samples, tokens, hidden] fp32)
plus one layer's weights and statistics at a time.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from pipeline.engine.cpu import CheckpointRank
from pipeline.errors import PipelineError
from pipeline.quantize.stats import META_FILE, module_prefix, pack_lower, stats_file
from pipeline.runtime.kernels import OneDnnKernel, TorchKernel, onednn_available
from pipeline.runtime.kv_cache import KVCache
from pipeline.runtime.model import EngineModel, ModelArgs
from pipeline.runtime.parallel import Dist

SHIPPED_CALIBRATION = Path(__file__).resolve().parent.parent / "datasets" / "calib_text.jsonl"
# Runtime linear weight attribute -> the TensorRT-LLM module whose input it sees (fc and gate share one input).
STATS_KEYS = {"qkv_weight": "attention.qkv", "dense_weight": "attention.dense", "fc_gate_weight": "mlp.fc",
              "fc_weight": "mlp.fc", "proj_weight": "mlp.proj"}


TOKENIZE_BATCH = 256  # calibration texts per tokenizer call

# Column blocks of the Hessian's lower triangle: (blocks + 1) / (2 blocks) of the full x^T x product's work.
HESSIAN_BLOCKS = 4


class _Accumulator:
    def __init__(self, width: int, hessian: bool):
        self.absmax = torch.zeros(width, dtype=torch.float32)
        self.abssum = torch.zeros(width, dtype=torch.float64)
        self.hessian = torch.zeros(width, width, dtype=torch.float64) if hessian else None
        bounds = [width * i // HESSIAN_BLOCKS for i in range(HESSIAN_BLOCKS + 1)]
        self.blocks = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
        self.output_absmax = 0.0
        self.tokens = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).float()
        mag = rows.abs()
        torch.maximum(self.absmax, mag.amax(dim=0), out=self.absmax)
        self.abssum += mag.sum(dim=0, dtype=torch.float64)
        if self.hessian is not None:
            # x^T x is symmetric: only the blocks on and below the diagonal are computed (float32 GEMMs, summed
            # across batches in float64); `tensors` keeps the lower triangle.
            for a, b in self.blocks:
                self.hessian[a:, a:b] += rows[:, a:].t() @ rows[:, a:b]
        low, high = torch.aminmax(y)  # max |y| without a temporary |y|
        self.output_absmax = max(self.output_absmax, -float(low), float(high))
        self.tokens += rows.shape[0]

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.absmax": self.absmax, f"{prefix}.absmean": (self.abssum / max(self.tokens, 1)).float(),
               f"{prefix}.output_absmax": torch.tensor(self.output_absmax)}
        if self.hessian is not None:
            # the lower triangle `add` filled, rounded to float32 once (the reader mirrors it: exactly symmetric)
            out[f"{prefix}.hessian"] = pack_lower(self.hessian).float()
        return out


class RecordingKernel(TorchKernel):
    """An fp32 linear that records each named weight's input and output statistics. The products are oneDNN's GEMM
    on weights packed once per layer where torch has oneDNN (`OneDnnKernel`), else F.linear (MKL's GEMM): on the
    calibration's shapes (1024 rows) the packed GEMM ran 1.1-1.5x as fast (2-core AMD EPYC Zen 4), and a layer's
    weights serve every batch. The two differ only in float32 rounding."""

    def __init__(self, hessian: bool, gemm: TorchKernel | None = None):
        self.hessian = hessian
        self.gemm = gemm or (OneDnnKernel() if onednn_available() else TorchKernel())
        self.names: dict[int, str] = {}
        self.acc: dict[str, _Accumulator] = {}

    def prepare(self, w: torch.Tensor) -> torch.Tensor:
        return self.gemm.prepare(w)

    def __call__(self, x, w, b=None):
        y = self.gemm(x, w, b)
        name = self.names.get(id(w))
        if name is not None:
            if name not in self.acc:
                self.acc[name] = _Accumulator(x.shape[-1], self.hessian)
            self.acc[name].add(x, y)
        return y


class RecordingKVCache(KVCache):
    """A KV cache that records the ranges of the keys and values written to it."""

    k_absmax = 0.0
    v_absmax = 0.0

    def update(self, input_pos, k, v, kv_len, *args):
        self.k_absmax = max(self.k_absmax, float(k.abs().max()))
        self.v_absmax = max(self.v_absmax, float(v.abs().max()))
        return super().update(input_pos, k, v, kv_len, *args)


def calibration_texts(cfg: Mapping[str, Any]) -> list[str]:
    """The non-empty texts of the calibration set's text field (a missing file, no rows or no such field is an
    error naming the setting)."""
    from pipeline.evaluate.data import load_rows

    path = cfg.get("dataset") or str(SHIPPED_CALIBRATION)
    rows = load_rows(path, cfg.get("dataset_split", "train"), None, key="quantization.calibration.dataset")
    field = cfg.get("text_field", "text")
    if field not in rows.column_names:
        raise PipelineError(f"quantization.calibration.dataset {path}: no field {field!r}; fields are "
                            f"{rows.column_names} (set quantization.calibration.text_field)")
    texts = [str(t) for t in rows[field] if str(t).strip()]
    if not texts:
        raise PipelineError(f"quantization.calibration.dataset {path}: field {field!r} holds no text")
    return texts


def calibration_tokens(tokenizer, cfg: Mapping[str, Any]) -> torch.Tensor:
    """[calib_size, calib_max_seq_length] token windows: the texts, shuffled with the seed, tokenized, joined by the
    EOS token into one stream and cut into consecutive windows (no padding, so every token is real)."""
    path = cfg.get("dataset") or str(SHIPPED_CALIBRATION)
    texts = calibration_texts(cfg)
    random.Random(cfg.get("seed", 0)).shuffle(texts)
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    n, length = int(cfg["calib_size"]), int(cfg["calib_max_seq_length"])
    stream: list[int] = []
    # in batches (the fast tokenizer's threads), until the windows are filled: the stream's prefix is all they take
    for start in range(0, len(texts), TOKENIZE_BATCH):
        for ids in tokenizer(texts[start:start + TOKENIZE_BATCH], add_special_tokens=False)["input_ids"]:
            stream += ids + sep
        if len(stream) >= n * length:
            break
    if len(stream) < n * length:
        raise PipelineError(f"quantization.calibration: the calibration text {path} has {len(stream)} tokens, fewer "
                            f"than calib_size x calib_max_seq_length = {n} x {length}; lower one of them or give a "
                            "larger quantization.calibration.dataset")
    return torch.tensor(stream[: n * length]).view(n, length)


def _stage_model(args: ModelArgs, layers: list[int], role: str, batch: int, seq: int, kernel) -> EngineModel:
    """An EngineModel holding `layers` as a first (embedding), middle or last (final norm) pipeline stage."""
    ranks = {"first": (0, 2), "middle": (1, 3), "last": (1, 2)}
    rank, pp = ranks[role]
    return EngineModel(replace(args, layers=layers), Dist(rank=rank, tp_size=1, pp_size=pp), batch, seq, kernel)


def _load(model: EngineModel, f, names: list[str], rename: tuple[str, str] | None = None) -> None:
    tensors = ((n.replace(*rename, 1) if rename else n, f.get_tensor(n)) for n in names)
    model.load_weights(tensors)


def collect(f: CheckpointRank, tokens: torch.Tensor, hessian: bool, batch_size: int, out_dir: Path,
            progress: bool = True) -> dict[str, Any]:
    """Run the float engine's layers (read from its checkpoint by `f`) over `tokens` one layer at a time, writing one
    statistics file per layer."""
    args = f.args
    n, seq = tokens.shape
    batches = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    pos = torch.arange(seq).unsqueeze(0)
    with torch.no_grad():
        names = f.keys()
        first = _stage_model(args, [], "first", batch_size, seq, TorchKernel())
        _load(first, f, [k for k in names if k.startswith(("embed.", "pos_embed."))])
        hidden = torch.cat([first.step(tokens[b], pos.expand(b.stop - b.start, -1), seq) for b in batches])
        del first
        for layer in tqdm(args.layers, desc="calibrate", unit="layer", disable=not progress):
            kernel = RecordingKernel(hessian)
            model = _stage_model(args, [layer], "middle", batch_size, seq, kernel)
            cache = RecordingKVCache(batch_size, args.local_kv_heads, seq, args.head_size, torch.float32)
            model.caches[0] = cache
            _load(model, f, [k for k in names if k.startswith(f"layers.{layer}.")], (f"layers.{layer}.", "layers.0."))
            kernel.names = {id(getattr(m, a)): STATS_KEYS[a] for _, m in model.named_modules()
                            for a in getattr(m, "linear_weights", ()) if a in STATS_KEYS and hasattr(m, a)}
            hidden = torch.cat([model.step(hidden[b], pos.expand(b.stop - b.start, -1), seq) for b in batches])
            stats = {k: v for key, acc in kernel.acc.items() for k, v in acc.tensors(module_prefix(layer, key)).items()}
            prefix = module_prefix(layer, "attention")
            stats[f"{prefix}.k_absmax"] = torch.tensor(cache.k_absmax)
            stats[f"{prefix}.v_absmax"] = torch.tensor(cache.v_absmax)
            save_file(stats, str(out_dir / stats_file(layer)))
            del model, cache, kernel
        last = _stage_model(args, [], "last", batch_size, seq, TorchKernel())
        _load(last, f, [k for k in names if k.startswith("final_norm.")])
        head = _Accumulator(args.hidden_size, hessian)
        for b in batches:
            x = last.final_norm(hidden[b])
            head.add(x, x[..., :1])
        save_file(head.tensors("lm_head"), str(out_dir / stats_file(None)))
    return {"samples": n, "tokens": n * seq, "layers": len(args.layers), "hessian": hessian}


def calibrate(source, out_dir: Path, cfg: Mapping[str, Any], hessian: bool, architecture: str | None,
              progress: bool = True) -> dict[str, Any]:
    """Tokenize the calibration set and collect statistics into `out_dir`, running the source's fp32 tp1 checkpoint
    as the cpu engine would: its tensors are computed from the source layer by layer as the engine asks for them
    (no checkpoint or engine is written). Returns what `calibration.json` records."""
    from pipeline.convert.converter import FloatCheckpointView

    tokenizer = source.tokenizer()
    if tokenizer is None:
        raise PipelineError("calibration needs the source model's tokenizer, and the source carries none")
    tokens = calibration_tokens(tokenizer, cfg)
    seq = tokens.shape[1]
    view = FloatCheckpointView(source, "float32", architecture)
    build = {"max_batch_size": int(cfg["batch_size"]), "max_input_len": seq, "max_seq_len": seq,
             "max_num_tokens": None, "max_beam_width": 1, "gather_context_logits": False,
             "gather_generation_logits": False, "logits_dtype": "float32"}
    where = getattr(source, "config_path", None) or "the source model"
    with CheckpointRank(view.config, view, build, where) as f:
        record = collect(f, tokens, hessian, int(cfg["batch_size"]), out_dir, progress)
    record.update(dataset=cfg.get("dataset") or SHIPPED_CALIBRATION.name, seed=cfg.get("seed", 0))
    (out_dir / META_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


__all__ = ["calibrate", "calibration_tokens", "collect"]
