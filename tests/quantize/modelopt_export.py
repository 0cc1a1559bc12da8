"""Writes genuine ModelOpt exports of a tiny HF model, on CPU: for each algorithm, `mtq.quantize` (fake-quant
calibration on a few random batches), then ModelOpt's unified `export_hf_checkpoint` and its legacy
`export_tensorrt_llm_checkpoint` of the same quantized model.

Run in its own process (ModelOpt patches modules and takes long to import):
    python -m tests.quantize.modelopt_export MODEL_DIR OUT_DIR ALGO [ALGO ...]
ALGO is a key of CONFIGS. Each lands in OUT_DIR/<ALGO>/{unified,legacy}; a failure of one exporter is recorded in
OUT_DIR/<ALGO>/<exporter>.error instead of stopping the others.
"""

from __future__ import annotations

import copy
import sys
import traceback
import warnings
from pathlib import Path

CONFIGS = {
    "fp8": ("FP8_DEFAULT_CFG", None),
    "fp8_kv": ("FP8_DEFAULT_CFG", "FP8_KV_CFG"),
    "int4_awq": ("INT4_AWQ_CFG", None),
    "w4a8_awq": ("W4A8_AWQ_BETA_CFG", None),
    "int8_sq": ("INT8_SMOOTHQUANT_CFG", None),
}


def quantized_model(model_dir: Path, algo: str):
    import torch
    import transformers

    import modelopt.torch.quantization as mtq

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg_name, kv_name = CONFIGS[algo]
    cfg = copy.deepcopy(getattr(mtq, cfg_name))
    if kv_name:
        kv = copy.deepcopy(getattr(mtq, kv_name)["quant_cfg"])
        if isinstance(cfg["quant_cfg"], dict):  # older ModelOpt: a dict of patterns
            cfg["quant_cfg"].update(kv)
        else:  # a list of {quantizer_name, cfg} entries, later ones win
            cfg["quant_cfg"] = [*cfg["quant_cfg"], *kv]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (2, 32), generator=gen) for _ in range(4)]

    def forward(m):
        with torch.no_grad():
            for b in batches:
                m(b)

    return mtq.quantize(model, cfg, forward)


def main(model_dir: str, out_dir: str, *algos: str) -> None:
    import torch

    from modelopt.torch.export import export_hf_checkpoint, export_tensorrt_llm_checkpoint

    warnings.filterwarnings("ignore")
    for algo in algos:
        out = Path(out_dir) / algo
        out.mkdir(parents=True, exist_ok=True)
        model = quantized_model(Path(model_dir), algo)
        for name, export in (("legacy", lambda: export_tensorrt_llm_checkpoint(
                model, "llama", torch.float32, export_dir=out / "legacy", inference_tensor_parallel=1)),
                             ("unified", lambda: export_hf_checkpoint(model, export_dir=out / "unified"))):
            try:
                export()
            except Exception:
                (out / f"{name}.error").write_text(traceback.format_exc())


if __name__ == "__main__":
    main(*sys.argv[1:])
