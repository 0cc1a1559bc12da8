"""The stage executor: convert -> build -> evaluate, each stage a cached function of its config and inputs.

A stage is registered with `@stage(...)` in its own module (see `pipeline/stages/`) and declares:
- `reads`: the top-level config keys it reads; only these reach it, so its cache key covers all it can see;
- `needs`: upstream stages whose artifacts it consumes (their keys enter its key);
- `version`: bumped on any change of its semantics, which invalidates its artifacts;
- `fingerprint`: optional, the identity of external inputs (source files) given its config;
- `unkeyed`: dotted config keys left out of the key because the fingerprint already covers what they point at
  (the model path: a moved but identical model hits the cache);
- `view`: optional, reduces what it reads to what its result depends on (keyed and passed to the stage), so
  configs that differ elsewhere share its artifact (calibration statistics across quantization algorithms);
- `optional_needs`: upstream stages it consumes only when a predicate of the whole config says so (convert needs
  calibration only for algorithms that use statistics).
Stages named in PIPELINE_ORDER but not registered are slots a later version fills; asking for one is a clear error.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from pipeline.cache import ArtifactCache, MANIFEST, cache_key
from pipeline.errors import PipelineError
from pipeline.schemas import validate

log = logging.getLogger(__name__)

PIPELINE_ORDER = ("calibrate", "convert", "build", "reference", "evaluate")
# Stage name -> module that registers it; imported when a run needs the stage.
STAGE_MODULES = {
    "calibrate": "pipeline.stages.calibrate",
    "convert": "pipeline.stages.convert",
    "build": "pipeline.stages.build",
    "reference": "pipeline.stages.reference",
    "evaluate": "pipeline.stages.evaluate",
}
MANIFEST_VERSION = 1
_VERSIONED_PACKAGES = ("torch", "transformers", "safetensors", "gguf", "numpy", "hydra-core", "trtllm-pipeline")


@dataclass
class StageContext:
    name: str
    key: str
    config: dict[str, Any]  # the resolved subtree the stage declared in `reads`
    inputs: dict[str, Path]  # upstream stage -> its artifact directory
    out_dir: Path  # temp directory to write outputs into; published atomically afterwards
    progress: bool = True


@dataclass(frozen=True)
class StageSpec:
    name: str
    version: int
    reads: tuple[str, ...]
    run: Callable[[StageContext], dict[str, Any]]
    needs: tuple[str, ...] = ()
    fingerprint: Callable[[dict[str, Any]], Any] | None = None
    unkeyed: tuple[str, ...] = ()
    # Judges an outcome (computed or reused) against the current config: {"failed": [...], ...} or {}.
    checks: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None
    view: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    optional_needs: tuple[tuple[str, Callable[[dict[str, Any]], bool]], ...] = ()

    def upstream(self, config: dict[str, Any]) -> tuple[str, ...]:
        """The stages this one consumes for this config."""
        return self.needs + tuple(name for name, wanted in self.optional_needs if wanted(config))


STAGES: dict[str, StageSpec] = {}


def stage(name: str, *, version: int, reads: tuple[str, ...], needs: tuple[str, ...] = (),
          fingerprint: Callable[[dict[str, Any]], Any] | None = None, unkeyed: tuple[str, ...] = (),
          checks: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None,
          view: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
          optional_needs: tuple[tuple[str, Callable[[dict[str, Any]], bool]], ...] = ()):
    """Register a stage body. Its return value is a dict of metrics (JSON-able) recorded in manifest and run.json."""
    if name not in PIPELINE_ORDER:
        raise ValueError(f"stage {name!r} is not a slot of the pipeline {PIPELINE_ORDER}")

    def deco(fn: Callable[[StageContext], dict[str, Any]]):
        STAGES[name] = StageSpec(name, version, reads, fn, needs, fingerprint, unkeyed, checks, view, optional_needs)
        return fn

    return deco


def get_stage(name: str) -> StageSpec:
    if name not in PIPELINE_ORDER:
        raise PipelineError(f"stages: unknown stage {name!r}; the pipeline's stages are {list(PIPELINE_ORDER)}")
    if name not in STAGES and name in STAGE_MODULES:
        importlib.import_module(STAGE_MODULES[name])
    if name not in STAGES:
        available = [s for s in PIPELINE_ORDER if s in STAGE_MODULES or s in STAGES]
        raise PipelineError(f"stage {name!r} is not implemented in this version; available stages: {available}")
    return STAGES[name]


@dataclass
class StageOutcome:
    name: str
    key: str
    artifact: Path
    reused: bool
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    stages: list[StageOutcome]

    def record(self) -> dict[str, Any]:
        """The run.json document."""
        return {
            "stages": {
                o.name: {"artifact": str(o.artifact), "key": o.key, "reused": o.reused, "seconds": round(o.seconds, 3)}
                for o in self.stages
            },
            "metrics": {o.name: o.metrics for o in self.stages if o.metrics},
            "checks": {o.name: o.checks for o in self.stages if o.checks},
        }

    def failed_checks(self) -> list[str]:
        return [f"{o.name}: {msg}" for o in self.stages for msg in o.checks.get("failed", [])]


def stages_to_run(requested: list[str], config: dict[str, Any] | None = None) -> list[StageSpec]:
    """The requested stages plus everything upstream of them (for this config), in pipeline order."""
    wanted: set[str] = set()
    todo = list(requested)
    while todo:
        spec = get_stage(todo.pop())
        if spec.name not in wanted:
            wanted.add(spec.name)
            todo.extend(spec.upstream(config) if config is not None else spec.needs)
    return [get_stage(n) for n in PIPELINE_ORDER if n in wanted]


def _drop_keys(config: dict[str, Any], dotted: tuple[str, ...]) -> dict[str, Any]:
    keyed = copy.deepcopy(config)
    for path in dotted:
        *parents, leaf = path.split(".")
        node = keyed
        for p in parents:
            node = node.get(p, {})
        if isinstance(node, dict):
            node.pop(leaf, None)
    return keyed


def run_pipeline(config: dict[str, Any], cache_root: Path, requested: list[str], force: bool = False,
                 force_stages: tuple[str, ...] = (), progress: bool = True) -> RunResult:
    """Run (or reuse) every stage needed for `requested`. `config` is the fully resolved pipeline config."""
    cache = ArtifactCache(cache_root)
    keys: dict[str, str] = {}
    artifacts: dict[str, Path] = {}
    outcomes = []
    for spec in stages_to_run(requested, config):
        stage_config = {k: copy.deepcopy(config[k]) for k in spec.reads}
        if spec.view is not None:
            stage_config = spec.view(stage_config)
        external = spec.fingerprint(stage_config) if spec.fingerprint else None
        needs = spec.upstream(config)
        inputs = {n: keys[n] for n in needs}
        key = cache_key(spec.name, spec.version, _drop_keys(stage_config, spec.unkeyed), inputs, external)
        forced = force or spec.name in force_stages
        outcome = _resolve(cache, spec, key, stage_config, inputs, external,
                           {n: artifacts[n] for n in needs}, forced, progress)
        if spec.checks is not None:
            outcome.checks = spec.checks(stage_config, outcome.metrics)
        keys[spec.name], artifacts[spec.name] = key, outcome.artifact
        outcomes.append(outcome)
    return RunResult(outcomes)


def _resolve(cache: ArtifactCache, spec: StageSpec, key: str, stage_config, inputs, external,
             input_dirs: dict[str, Path], forced: bool, progress: bool) -> StageOutcome:
    cache.clean_stale_temps(spec.name)
    if not forced:
        manifest = cache.lookup(spec.name, key)
        if manifest is not None:
            return StageOutcome(spec.name, key, cache.path(spec.name, key), True, 0.0, manifest.get("metrics", {}))
    with cache.lock(spec.name, key):
        if not forced:  # someone may have published it while we waited for the lock
            manifest = cache.lookup(spec.name, key)
            if manifest is not None:
                return StageOutcome(spec.name, key, cache.path(spec.name, key), True, 0.0, manifest.get("metrics", {}))
        log.info("running stage %s (key %s)", spec.name, key[:12])
        with cache.staging(spec.name, key) as tmp:
            started = time.time()
            t0 = time.perf_counter()
            ctx = StageContext(spec.name, key, copy.deepcopy(stage_config), input_dirs, tmp, progress)
            metrics = spec.run(ctx) or {}
            seconds = time.perf_counter() - t0
            manifest = {
                "manifest_version": MANIFEST_VERSION,
                "stage": spec.name,
                "stage_version": spec.version,
                "key": key,
                "config": stage_config,
                "inputs": inputs,
                "external": external,
                "versions": library_versions(),
                "outputs": output_digests(tmp),
                "timings": {"seconds": round(seconds, 3), "started_unix": round(started, 3)},
                "metrics": metrics,
            }
            if forced:
                _evict(cache, spec.name, key)
            artifact = cache.publish(tmp, spec.name, key, manifest)
    return StageOutcome(spec.name, key, artifact, False, seconds, metrics)


def _evict(cache: ArtifactCache, stage: str, key: str) -> None:
    """A forced recompute replaces the published artifact (renamed aside first, so readers never see a half)."""
    import shutil

    target = cache.path(stage, key)
    if target.exists():
        aside = target.with_name(f".evicted-{key[:16]}-{os.getpid()}")
        os.rename(target, aside)
        shutil.rmtree(aside, ignore_errors=True)


def output_digests(directory: Path) -> dict[str, dict[str, Any]]:
    digests = {}
    for f in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        digests[str(f.relative_to(directory))] = {"size": f.stat().st_size, "sha256": h.hexdigest()}
    return digests


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for pkg in _VERSIONED_PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_run_record(result: RunResult, run_dir: Path) -> Path:
    record = result.record()
    validate(record, "run", what="run.json")
    path = Path(run_dir) / "run.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def summary_lines(result: RunResult, record_path: Path | None) -> list[str]:
    lines = [f"{'stage':<10} {'status':<9} {'seconds':>8}  artifact"]
    for o in result.stages:
        status = "reused" if o.reused else "computed"
        lines.append(f"{o.name:<10} {status:<9} {o.seconds:>8.2f}  {o.artifact}")
    for o in result.stages:
        headline = {k: v for k, v in o.metrics.items() if not isinstance(v, (dict, list))}
        if headline:
            lines.append(f"{o.name} metrics: " + ", ".join(f"{k}={v}" for k, v in headline.items()))
    for o in result.stages:
        if o.checks:
            if "failed" not in o.checks:  # verdicts only: no gate asked for
                lines.append(f"{o.name} verdicts: " + ", ".join(f"{k}: {v}" for k, v in o.checks.get("verdicts", {}).items()))
                continue
            verdict = "FAILED: " + "; ".join(o.checks["failed"]) if o.checks["failed"] else "passed"
            limits = {k: v for k, v in o.checks.items() if k != "failed"}
            lines.append(f"{o.name} accuracy check {verdict} ({', '.join(f'{k}={v}' for k, v in limits.items())})")
    if record_path is not None:
        lines.append(f"run record: {record_path}")
    return lines
