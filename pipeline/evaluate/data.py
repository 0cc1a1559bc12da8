"""Evaluation datasets: the shipped offline sets, local files (jsonl, json, csv, parquet, or a directory of them),
or a HuggingFace dataset name loaded with `datasets` (from its local cache, or the hub when it is reachable)."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.convert.sources.files import file_sha256
from pipeline.errors import PipelineError

SHIPPED = Path(__file__).resolve().parent.parent / "datasets"
SHIPPED_SUMMARIZE = SHIPPED / "summarize_small.jsonl"
SHIPPED_PPL_TEXT = SHIPPED / "ppl_text.txt"
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Sample:
    id: str
    input: str
    reference: str


def dataset_path(name: str | None) -> Path | None:
    """The local file or directory a dataset name points at, or None for a hub name."""
    if name is None:
        return SHIPPED_SUMMARIZE
    path = Path(name).expanduser()
    return path.resolve() if path.exists() or path.suffix in LOCAL_FORMATS else None


def dataset_fingerprint(name: str | None, split: str) -> dict[str, Any]:
    path = dataset_path(name)
    if path is None:
        return {"hub": name, "split": split}
    files = _local_files(path)
    return {"files": [{"name": f.name, "sha256": file_sha256(f)} for f in files]}


def _local_files(path: Path, key: str = "evaluate.dataset") -> list[Path]:
    if not path.exists():
        raise PipelineError(f"{key}: {path} does not exist")
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix in LOCAL_FORMATS)
        if not files:
            raise PipelineError(f"{key}: {path} holds no {', '.join(LOCAL_FORMATS)} files")
        if len({f.suffix for f in files}) > 1:
            raise PipelineError(f"{key}: {path} mixes file formats; keep one of {sorted(LOCAL_FORMATS)}")
        return files
    if path.suffix not in LOCAL_FORMATS:
        raise PipelineError(f"{key}: {path} is not one of {sorted(LOCAL_FORMATS)}")
    if path.stat().st_size == 0:
        raise PipelineError(f"{key}: {path} is empty (no rows)")
    return [path]


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_rows(name: str | None, split: str, config_name: str | None, key: str = "evaluate.dataset"):
    """A dataset's rows (a `datasets.Dataset`): local files, or a hub name (from the local cache first)."""
    import datasets

    datasets.disable_progress_bars()
    path = dataset_path(name)
    if path is not None:
        files = _local_files(path, key)
        try:
            return datasets.load_dataset(LOCAL_FORMATS[files[0].suffix], data_files=[str(f) for f in files], split="train")
        except Exception as e:
            raise PipelineError(f"{key}: cannot read {path}: {_first_line(e)}") from None
    hint = ("point evaluate.dataset at a local copy (a .jsonl, .json, .csv or .parquet file, or a directory of them) "
            "and set evaluate.input_field / evaluate.reference_field")
    try:  # the local datasets cache first: no network needed when the set was downloaded before
        return datasets.load_dataset(name, config_name, split=split, download_mode="reuse_cache_if_exists")
    except Exception as cached_error:
        if not _hub_reachable():
            raise PipelineError(f"evaluate.dataset={name!r} is not in the local datasets cache and the HuggingFace hub "
                                f"is unreachable; {hint}") from None
        raise PipelineError(f"evaluate.dataset={name!r} could not be loaded ({_first_line(cached_error)}); "
                            f"{hint}") from None


def load_samples(name: str | None, input_field: str, reference_field: str, split: str = "test",
                 config_name: str | None = None, shuffle_seed: int | None = None) -> list[Sample]:
    """Rows as samples, in file order (or shuffled with `shuffle_seed`, as summarize.py shuffles with its seed)."""
    rows = load_rows(name, split, config_name)
    if len(rows) == 0:
        raise PipelineError(f"evaluate.dataset {name or SHIPPED_SUMMARIZE}: no rows")
    for field in (input_field, reference_field):
        if field not in rows.column_names:
            raise PipelineError(f"evaluate.dataset {name or SHIPPED_SUMMARIZE}: no field {field!r}; fields are "
                                f"{rows.column_names} (set evaluate.input_field / evaluate.reference_field)")
    if shuffle_seed is not None:
        rows = rows.shuffle(seed=shuffle_seed)
    ids = rows["id"] if "id" in rows.column_names else [str(i) for i in range(len(rows))]
    return [Sample(str(i), str(a), str(r)) for i, a, r in zip(ids, rows[input_field], rows[reference_field])]


def load_text(path: str | None) -> str:
    p = Path(path).expanduser() if path else SHIPPED_PPL_TEXT
    if not p.is_file():
        raise PipelineError(f"evaluate.ppl_dataset: {p} is not a file")
    text = p.read_text()
    if not text.strip():
        raise PipelineError(f"evaluate.ppl_dataset: {p} is empty")
    return text
