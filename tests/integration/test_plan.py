"""`trtllm-pipeline plan` and `dry_run=true`: the preflight plan against what the run then writes and measures, and
a run whose disk need exceeds the free space fails before writing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from pipeline import plan as plan_module
from tests.integration.test_cli import REPO, cli, tiny


def test_plan_equals_what_convert_writes(tiny_models, tmp_path):
    args = tiny(tiny_models["llama_gqa_untied"], tmp_path, "stages=[convert]", "mapping.tp_size=2",
                "mapping.pp_size=2", "dtype=bfloat16")
    proc = cli("plan", *args, f"hydra.run.dir={tmp_path / 'plan'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "cache").exists()  # nothing was run
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert "rank3.safetensors" in proc.stdout and "would run" in proc.stdout
    assert plan["stages"] == [{"stage": "convert", "key": plan["stages"][0]["key"], "reused": False,
                               "disk_bytes": plan["convert"]["checkpoint_bytes"]}]

    run = cli(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    record = json.loads((tmp_path / "run" / "run.json").read_text())["stages"]["convert"]
    assert record["key"] == plan["stages"][0]["key"]
    artifact = Path(record["artifact"])
    for rank in plan["convert"]["ranks"]:
        f = safe_open(str(artifact / rank["file"]), framework="pt")
        sizes = {n: f.get_slice(n).get_shape() for n in f.keys()}
        assert len(sizes) == rank["tensors"]
        data = (artifact / rank["file"]).stat().st_size
        assert rank["bytes"] <= data < rank["bytes"] + 64 * 1024  # tensor bytes + the header

    again = cli(*args, "dry_run=true", f"hydra.run.dir={tmp_path / 'plan2'}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    plan2 = json.loads((tmp_path / "plan2" / "plan.json").read_text())
    assert plan2["stages"][0]["reused"] is True and plan2["disk_need_bytes"] == 0


def test_disk_need_over_free_space_fails_before_writing(tiny_models, tmp_path, monkeypatch):
    args = tiny(tiny_models["llama_mha_tied"], tmp_path, "stages=[convert]")
    # the CLI runs in this process so that the free space can be made small
    monkeypatch.setattr(plan_module, "free_bytes", lambda path: 1000)
    monkeypatch.setattr(sys, "argv", ["trtllm-pipeline", *args, f"hydra.run.dir={tmp_path / 'run'}"])
    from pipeline import cli as cli_module

    with pytest.raises(SystemExit) as e:
        cli_module.main()
    assert e.value.code == 2
    assert not (tmp_path / "cache").exists()


def test_disk_message_names_both_numbers():
    with pytest.raises(Exception, match=r"needs about 2\.0 MiB .* has 1\.0 MiB free"):
        plan_module.check_disk({"disk_need_bytes": 2 << 20, "disk_free_bytes": 1 << 20, "cache_dir": "c"})


@pytest.mark.skipif(shutil.which("time") is None and not Path("/usr/bin/time").exists(), reason="needs /usr/bin/time")
def test_convert_peak_rss_estimate_within_25_percent(tiny_models, tmp_path):
    """The RSS model against /usr/bin/time's maximum resident set of the same conversion (a small model: the fixed
    part dominates; benchmarks/plan_accuracy.py covers three larger sizes)."""
    from pipeline.plan import convert_plan

    config = {"model": {"source": "hf", "path": str(tiny_models["llama_gqa_untied"]), "package": None,
                        "architecture": None},
              "mapping": {"tp_size": 2, "pp_size": 1, "use_parallel_embedding": False, "embedding_sharding_dim": 0},
              "dtype": "float32", "quantization": None}
    estimate = convert_plan(config)["convert_peak_rss_mib"]
    code = ("import sys; from pathlib import Path; from pipeline.convert.converter import convert; "
            "from pipeline.convert.registry import MappingArgs; from pipeline.convert.sources import open_source; "
            "convert(open_source('hf', Path(sys.argv[1])), Path(sys.argv[2]), 'float32', MappingArgs(2), progress=False)")
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-c", code,
                           str(tiny_models["llama_gqa_untied"]), str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, check=True)
    measured = int(proc.stderr.strip().splitlines()[-1]) / 1024
    assert abs(estimate - measured) / measured < 0.25, (estimate, measured)
