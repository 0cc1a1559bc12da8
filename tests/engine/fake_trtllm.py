"""A fake TensorRT-LLM for contract tests: a `trtllm-build` executable that records its arguments and writes a
minimal engine directory, and a `tensorrt_llm` package (with dist-info, so its version is visible) whose
`runtime.ModelRunner` records how it was loaded and generates a fixed, checkable continuation."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

TRTLLM_BUILD = '''#!{python}
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
with open(os.environ["FAKE_TRTLLM_RECORD"], "a") as f:
    f.write(json.dumps({{"argv": args}}) + "\\n")
print("fake trtllm-build: building", flush=True)
if os.environ.get("FAKE_TRTLLM_FAIL"):
    print("[E] fake failure: out of memory", flush=True)
    sys.exit(3)
opt = {{args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}}
ckpt = json.loads((Path(opt["--checkpoint_dir"]) / "config.json").read_text())
out = Path(opt["--output_dir"])
out.mkdir(parents=True, exist_ok=True)
(out / "config.json").write_text(json.dumps({{"version": "fake", "pretrained_config": ckpt, "build_config": {{}}}}))
for r in range(ckpt["mapping"]["world_size"]):
    (out / f"rank{{r}}.engine").write_bytes(b"plan")
'''

RUNTIME = '''import json, os
import torch


class ModelRunner:
    @classmethod
    def from_dir(cls, engine_dir, rank=0, **kwargs):
        with open(os.environ["FAKE_TRTLLM_RUN_RECORD"], "a") as f:
            f.write(json.dumps({"engine_dir": engine_dir, "rank": rank}) + "\\n")
        self = cls()
        self.engine_dir = engine_dir
        return self

    def generate(self, batch_input_ids, max_new_tokens, end_id, pad_id, return_dict=False, streaming=False,
                 **kwargs):
        # continuation: each next token is (previous + 1) mod 50
        width = max(len(x) for x in batch_input_ids) + max_new_tokens
        out = torch.full((len(batch_input_ids), 1, width), end_id, dtype=torch.int32)
        lengths = torch.zeros(len(batch_input_ids), 1, dtype=torch.int32)
        for i, x in enumerate(batch_input_ids):
            seq = x.tolist()
            for _ in range(max_new_tokens):
                seq.append((seq[-1] + 1) % 50)
            out[i, 0, : len(seq)] = torch.tensor(seq)
            lengths[i, 0] = len(seq)
        result = {"output_ids": out, "sequence_lengths": lengths, "kwargs": sorted(kwargs)}
        return iter([result]) if streaming else result
'''


def install_fake_trtllm(root: Path, version: str = "0.17.0") -> Path:
    """Write the fakes under `root`: `root/bin/trtllm-build` and the package under `root/site`; returns root."""
    bin_dir, site = root / "bin", root / "site"
    (site / "tensorrt_llm" / "runtime").mkdir(parents=True, exist_ok=True)
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "trtllm-build"
    exe.write_text(TRTLLM_BUILD.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    (site / "tensorrt_llm" / "__init__.py").write_text(f"__version__ = {version!r}\n")
    (site / "tensorrt_llm" / "runtime" / "__init__.py").write_text(RUNTIME)
    set_fake_version(root, version)
    return root


def set_fake_version(root: Path, version: str) -> None:
    site = root / "site"
    for old in site.glob("tensorrt_llm-*.dist-info"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    info = site / f"tensorrt_llm-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tensorrt_llm\nVersion: {version}\n")


def activate(monkeypatch, root: Path) -> None:
    """PATH, sys.path and PYTHONPATH (for subprocesses) see the fakes; records go beside them."""
    import importlib

    monkeypatch.setenv("PATH", f"{root / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.syspath_prepend(str(root / "site"))
    repo = str(Path(__file__).resolve().parents[2])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root / "site"), repo, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_TRTLLM_RECORD", str(root / "build_calls.jsonl"))
    monkeypatch.setenv("FAKE_TRTLLM_RUN_RECORD", str(root / "run_calls.jsonl"))
    for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
        monkeypatch.delitem(sys.modules, name)
    importlib.invalidate_caches()
