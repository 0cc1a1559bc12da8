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
  calibration only for algorithms that use statistics);
- `preflight`: optional, checks that need only the configs and the inputs' shapes (never a stage's work). Every
  stage's preflight runs before the first stage starts, in pipeline order, sharing a `facts` dict (convert records
  the checkpoint config it will write, build reads it to check its limits); it may return an `Estimate` of what the
  stage will write and hold, checked against free disk and `build.max_memory` before anything is written.
Stages named in PIPELINE_ORDER but not registered are slots a later version fills; asking for one is a clear error.
"""

from __future__ import annotations

import contextlib
import copy
import errno
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

from pipeline import faults
from pipeline.cache import DEFAULT_LOCK_TIMEOUT, ArtifactCache, MANIFEST, cache_key, file_sha256
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
# Settings that decide only whether a run may proceed (safety checks, resource limits), never what a stage
# produces: left out of every key, so turning a check off or raising a limit reuses the artifacts.
GATE_KEYS = ("model.check_finite", "build.max_memory")
# Room left beyond a stage's own estimate of what it writes (manifests, tokenizer files, file system overhead).
DISK_HEADROOM = 64 << 20
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
    preflight: Callable[[dict[str, Any], dict[str, Any]], "Estimate | None"] | None = None

    def upstream(self, config: dict[str, Any]) -> tuple[str, ...]:
        """The stages this one consumes for this config."""
        return self.needs + tuple(name for name, wanted in self.optional_needs if wanted(config))


STAGES: dict[str, StageSpec] = {}


def stage(name: str, *, version: int, reads: tuple[str, ...], needs: tuple[str, ...] = (),
          fingerprint: Callable[[dict[str, Any]], Any] | None = None, unkeyed: tuple[str, ...] = (),
          checks: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None,
          view: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
          optional_needs: tuple[tuple[str, Callable[[dict[str, Any]], bool]], ...] = (),
          preflight: Callable[[dict[str, Any], dict[str, Any]], "Estimate | None"] | None = None):
    """Register a stage body. Its return value is a dict of metrics (JSON-able) recorded in manifest and run.json."""
    if name not in PIPELINE_ORDER:
        raise ValueError(f"stage {name!r} is not a slot of the pipeline {PIPELINE_ORDER}")

    def deco(fn: Callable[[StageContext], dict[str, Any]]):
        STAGES[name] = StageSpec(name, version, reads, fn, needs, fingerprint, unkeyed, checks, view, optional_needs,
                                 preflight)
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
class Estimate:
    """What a stage will write (bytes on disk) and hold in memory at its peak, from shapes alone."""

    disk_bytes: int = 0
    memory_bytes: int = 0
    what: str = ""


@dataclass
class PlannedStage:
    spec: StageSpec
    config: dict[str, Any]  # the stage's view of the config
    key: str
    inputs: dict[str, str]  # upstream stage -> key
    external: Any


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


def plan_pipeline(config: dict[str, Any], requested: list[str]) -> list[PlannedStage]:
    """Every needed stage with its keyed config, key and upstream keys: no stage work, only configs and the
    fingerprints of external inputs (which also fail here when those inputs are missing)."""
    keys: dict[str, str] = {}
    planned = []
    for spec in stages_to_run(requested, config):
        stage_config = {k: copy.deepcopy(config[k]) for k in spec.reads}
        if spec.view is not None:
            stage_config = spec.view(stage_config)
        external = spec.fingerprint(stage_config) if spec.fingerprint else None
        inputs = {n: keys[n] for n in spec.upstream(config)}
        key = cache_key(spec.name, spec.version, _drop_keys(stage_config, spec.unkeyed + GATE_KEYS), inputs, external)
        keys[spec.name] = key
        planned.append(PlannedStage(spec, stage_config, key, inputs, external))
    return planned


def forced_stages(planned: list[PlannedStage], force: bool, force_stages: tuple[str, ...]) -> set[str]:
    return {p.spec.name for p in planned if force or p.spec.name in force_stages}


def all_reused(planned: list[PlannedStage], cache: ArtifactCache, forced: set[str]) -> bool:
    """Whether every planned stage is a valid cache entry that will be reused: then the run does no work, and the
    checks that exist to stop work before it starts (preflight, disk) have nothing to stop."""
    return all(p.spec.name not in forced and cache.is_valid(p.spec.name, p.key) for p in planned)


def preflight(planned: list[PlannedStage], cache: ArtifactCache, forced: set[str]) -> None:
    """Run every stage's checks before any stage starts; then check that what will be computed fits the free disk
    under the cache and the memory the recipe allows."""
    facts: dict[str, Any] = {}
    to_write: list[tuple[str, Estimate]] = []
    for p in planned:
        estimate = p.spec.preflight(copy.deepcopy(p.config), facts) if p.spec.preflight else None
        cached = p.spec.name not in forced and (cache.path(p.spec.name, p.key) / MANIFEST).is_file()
        if estimate is not None and not cached:
            to_write.append((p.spec.name, estimate))
    need = sum(e.disk_bytes for _, e in to_write)
    if need:
        free = cache.free_bytes()
        if need + DISK_HEADROOM > free:
            parts = ", ".join(f"{name} ~{_mib(e.disk_bytes)}" for name, e in to_write)
            raise PipelineError(f"cache_dir {cache.root}: {_mib(free)} free, but this run writes about {_mib(need)} "
                                f"({parts}) plus {_mib(DISK_HEADROOM)} headroom; free space or point cache_dir elsewhere")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def run_pipeline(config: dict[str, Any], cache_root: Path, requested: list[str], force: bool = False,
                 force_stages: tuple[str, ...] = (), progress: bool = True,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT, planned: list[PlannedStage] | None = None,
                 reused: bool | None = None) -> RunResult:
    """Run (or reuse) every stage needed for `requested`. `config` is the fully resolved pipeline config.
    Everything that can be checked from configs and input shapes is checked before the first stage starts; a run
    whose every stage is reused skips those checks (they open the source and import torch) and does no work.
    `planned`: this config's `plan_pipeline`, when the caller has it already; `reused`: its `all_reused`, likewise
    (one decision: the caller's disk check and these checks run together or not at all)."""
    cache = ArtifactCache(cache_root)
    planned = planned if planned is not None else plan_pipeline(config, requested)
    forced = forced_stages(planned, force, force_stages)
    if reused is None:
        reused = all_reused(planned, cache, forced)
    if not reused:
        preflight(planned, cache, forced)
    artifacts: dict[str, Path] = {}
    outcomes = []
    # Every artifact this run finds or makes stays leased until the run ends: `cache gc`/`rm` keep what a later
    # stage of this run is about to read.
    with contextlib.ExitStack() as leases:
        for p in planned:
            leases.enter_context(cache.lease(p.spec.name, p.key))
            faults.point(f"{p.spec.name}:start")
            outcome = _resolve(cache, p.spec, p.key, p.config, p.inputs, p.external,
                               {n: artifacts[n] for n in p.inputs}, p.spec.name in forced, progress, lock_timeout)
            if p.spec.checks is not None:
                outcome.checks = p.spec.checks(p.config, outcome.metrics)
            artifacts[p.spec.name] = outcome.artifact
            outcomes.append(outcome)
    return RunResult(outcomes)


def _resolve(cache: ArtifactCache, spec: StageSpec, key: str, stage_config, inputs, external,
             input_dirs: dict[str, Path], forced: bool, progress: bool,
             lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> StageOutcome:
    cache.clean_stale_temps(spec.name)
    if not forced:
        manifest = cache.lookup(spec.name, key)
        if manifest is not None:
            return StageOutcome(spec.name, key, cache.path(spec.name, key), True, 0.0, manifest.get("metrics", {}))
    with cache.lock(spec.name, key, timeout=lock_timeout):
        faults.point(f"{spec.name}:locked")
        if not forced:  # someone may have published it while we waited for the lock
            manifest = cache.lookup(spec.name, key)
            if manifest is not None:
                return StageOutcome(spec.name, key, cache.path(spec.name, key), True, 0.0, manifest.get("metrics", {}))
        log.info("running stage %s (key %s)", spec.name, key[:12])
        try:
            with cache.staging(spec.name, key) as tmp:
                started = time.time()
                t0 = time.perf_counter()
                ctx = StageContext(spec.name, key, copy.deepcopy(stage_config), input_dirs, tmp, progress)
                metrics = spec.run(ctx) or {}
                seconds = time.perf_counter() - t0
                faults.point(f"{spec.name}:outputs")
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
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise PipelineError(
                    f"stage {spec.name}: no space left while writing {e.filename or cache.root / spec.name} "
                    f"({os.strerror(e.errno)}); nothing was published and the cache is unchanged. Free space under "
                    f"{cache.root} or point cache_dir elsewhere") from None
            raise
        faults.point(f"{spec.name}:published")
    return StageOutcome(spec.name, key, artifact, False, seconds, metrics)


def _evict(cache: ArtifactCache, stage: str, key: str) -> None:
    """A forced recompute replaces the published artifact (renamed aside first, so readers never see a half)."""
    cache._evict_dir(cache.path(stage, key))


def output_digests(directory: Path) -> dict[str, dict[str, Any]]:
    digests = {}
    for f in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        digests[str(f.relative_to(directory))] = {"size": f.stat().st_size, "sha256": file_sha256(f)}
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
