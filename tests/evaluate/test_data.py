"""Dataset loading: shipped sets, local files in every format with custom field names, clear errors."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import PipelineError
from pipeline.evaluate.data import SHIPPED_SUMMARIZE, dataset_fingerprint, load_samples, load_text

ROWS = [{"doc": f"Article number {i} about things.", "summ": f"Summary {i}.", "id": f"x{i}"} for i in range(5)]


def write(tmp_path, fmt):
    import pandas as pd

    df = pd.DataFrame(ROWS)
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_local_formats_with_custom_fields(tmp_path, fmt):
    samples = load_samples(str(write(tmp_path, fmt)), "doc", "summ")
    assert [s.input for s in samples] == [r["doc"] for r in ROWS]
    assert [s.reference for s in samples] == [r["summ"] for r in ROWS] and samples[2].id == "x2"


def test_directory_of_files(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    write(d, "jsonl")
    assert len(load_samples(str(d), "doc", "summ")) == 5


def test_shipped_set():
    samples = load_samples(None, "article", "highlights")
    assert len(samples) >= 32 and all(s.input and s.reference for s in samples)
    assert dataset_fingerprint(None, "test")["files"][0]["name"] == SHIPPED_SUMMARIZE.name
    assert len(load_text(None).split()) > 1000


def test_shuffle_is_seeded(tmp_path):
    path = str(write(tmp_path, "jsonl"))
    a = [s.id for s in load_samples(path, "doc", "summ", shuffle_seed=0)]
    assert a == [s.id for s in load_samples(path, "doc", "summ", shuffle_seed=0)] and sorted(a) == [r["id"] for r in ROWS]


@pytest.mark.parametrize("make,message", [
    (lambda p: write(p, "jsonl"), "no field 'article'"),
    (lambda p: (p / "empty.jsonl").write_text("") or p / "empty.jsonl", "no rows|cannot read"),
    (lambda p: p / "missing.jsonl", "does not exist"),
])
def test_bad_datasets_are_clear_errors(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(PipelineError, match=message):
        load_samples(str(path), "article", "highlights")


def test_hub_name_offline_fails_fast_with_a_hint():
    with pytest.raises(PipelineError, match="local copy"):
        load_samples("no-such-org/no-such-dataset-xyz", "article", "highlights")
