"""Stage keys and plans: what a stage's output depends on, and what is cached, stale or missing.

A stage's key hashes its code version, its resolved config and the fingerprints of its inputs
(never paths, timestamps or run ids). The code version is computed, not listed: the source of
every module of this package that the stage's module imports, transitively (`trlm.runs.import_graph`),
plus the versions of the libraries the stage declares. A training stage hands on the fingerprint of
its `model/` directory alone, so a forced rerun that reproduces the weights keeps downstream keys.

A stale stage says why it will rerun: config, code, input or library version.

No Prefect here: the CLI's `status` and the flow both use this module.
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from trlm.artifacts import hash_json, stage_key
from trlm.runs.import_graph import import_closure, source_hash
from trlm.recipe import Recipe, output_config
from trlm.stage import BASE, MODEL, Stage, split_ref
from trlm.runs.tracking import OUTPUT, TAG_CODE, TAG_LIBRARIES, Tracker, flatten, run_outputs

@dataclass(frozen=True)
class CodeVersion:
    """What a stage's code is: the source of its import closure and the libraries that shape its output."""

    modules: dict[str, str]  # module -> SHA-256 of its source (first 16 hex digits)
    libraries: dict[str, str]  # distribution -> installed version

    @property
    def digest(self) -> str:
        return hash_json({"modules": self.modules, "libraries": self.libraries})


def _code_version(module: str, libraries: tuple[str, ...]) -> CodeVersion:
    modules = {name: source_hash([name])[:16] for name in import_closure(module)}
    return CodeVersion(modules, {dist: _version(dist) for dist in libraries})


def code_version(stage: Stage, module: str | None = None) -> CodeVersion:
    """Computed, not listed: the import closure of the stage's module (or of `module`, for a sub-step).

    Read afresh each time (a few milliseconds): a long-lived process (`trlm serve`) sees edits."""
    return _code_version(module or stage.module, tuple(sorted(stage.libraries)))


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def stage_config(recipe: Recipe, stage: Stage) -> Any:
    """The part of the recipe a stage's output depends on."""
    if stage.key_config is not None:
        return stage.key_config(recipe)
    section = stage.config_of(recipe)
    return output_config(section) if section is not None else {}


@dataclass
class StagePlan:
    stage: str
    key: str | None
    state: str  # done | stale | missing
    run_id: str | None = None
    artifact_uri: str | None = None
    artifact_path: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)  # output fingerprints
    note: str = ""  # for a stale stage: why it will rerun

    def as_dict(self) -> dict:
        return asdict(self)


def base_fingerprint(recipe: Recipe) -> str:
    from trlm.base_model import source_fingerprint

    return source_fingerprint(recipe.base_model)


def stage_inputs(recipe: Recipe, stage: Stage, upstream: dict[str, dict[str, str]], base_fp: str) -> dict[str, str] | None:
    """Input fingerprints of a stage: each declared input from the recorded outputs of its upstream
    stage, plus the fingerprints of files it reads directly (None while an upstream is unknown)."""
    fingerprints = {}
    for name, ref in stage.inputs(recipe).items():
        source, part = split_ref(ref)
        outputs = {MODEL: base_fp} if source == BASE else upstream.get(source, {})
        if part not in outputs:
            return None
        fingerprints[name] = outputs[part]
    if stage.external_inputs is not None:
        fingerprints |= {f"file:{k}": v for k, v in stage.external_inputs(recipe).items()}
    return fingerprints


def compute_key(recipe: Recipe, stage: Stage, inputs: dict[str, str]) -> str:
    return stage_key(stage.name, code_version(stage).digest, stage_config(recipe, stage), inputs)


def why_stale(recipe: Recipe, stage: Stage, inputs: dict[str, str], previous) -> str:
    """What differs from the latest finished run of the stage: config, code, input or library version."""
    tags, reasons = previous.data.tags, []
    params = flatten("", stage_config(recipe, stage), {})
    changed = sorted(k for k in set(params) | set(previous.data.params) if params.get(k, "")[:6000] != previous.data.params.get(k, "")[:6000])
    if changed:
        reasons.append("config: " + ", ".join(changed[:4]) + (" ..." if len(changed) > 4 else ""))
    code = code_version(stage)
    before = json.loads(tags.get(TAG_CODE, "{}"))
    edited = sorted(m for m in set(code.modules) | set(before) if code.modules.get(m) != before.get(m))
    if edited and before:
        reasons.append("code: " + ", ".join(edited[:4]) + (" ..." if len(edited) > 4 else ""))
    libs = json.loads(tags.get(TAG_LIBRARIES, "{}"))
    moved = [f"{d} {libs.get(d)} -> {v}" for d, v in code.libraries.items() if libs and libs.get(d) != v]
    if moved:
        reasons.append("library version: " + ", ".join(moved))
    old_inputs = {k.removeprefix("trlm.input."): v for k, v in tags.items() if k.startswith("trlm.input.")}
    new_inputs = sorted(k for k in set(inputs) | set(old_inputs) if inputs.get(k) != old_inputs.get(k))
    if new_inputs:
        reasons.append("input: " + ", ".join(new_inputs[:4]) + (" ..." if len(new_inputs) > 4 else ""))
    return "; ".join(reasons) or "key changed"


def plan(recipe: Recipe, tracker: "Tracker", pipeline: tuple[Stage, ...]) -> list[StagePlan]:
    """State of every stage: done (cached), stale (done before, for another key: says why), missing."""
    base_fp = base_fingerprint(recipe)
    upstream: dict[str, dict[str, str]] = {}
    plans = []
    for stage in pipeline:
        inputs = stage_inputs(recipe, stage, upstream, base_fp)
        previous = tracker.latest_done(stage.name, recipe.name)
        if inputs is None:
            waits = [split_ref(ref)[0] for ref in stage.inputs(recipe).values() if split_ref(ref)[0] not in upstream and split_ref(ref)[0] != BASE]
            plans.append(StagePlan(stage.name, None, "stale" if previous else "missing", note=f"input: waits for {', '.join(dict.fromkeys(waits))}"))
            continue
        key = compute_key(recipe, stage, inputs)
        run = tracker.find_done(stage.name, key)
        if run is not None:
            upstream[stage.name] = run_outputs(run)
            local = tracker.local_artifact_dir(run)
            plans.append(StagePlan(stage.name, key, "done", run.info.run_id, tracker.artifact_uri(run), str(local / OUTPUT) if local else None, upstream[stage.name]))
            continue
        note = "; ".join(filter(None, [why_stale(recipe, stage, inputs, previous) if previous else "", resume_note(tracker, stage.name, key)]))
        plans.append(StagePlan(stage.name, key, "stale" if previous else "missing", note=note))
    return plans

def resume_note(tracker: "Tracker", stage: str, key: str) -> str:
    """Where an unfinished run of this key resumes, and which of its checkpoints are damaged ("" if none)."""
    from trlm.training.checkpoints import survey_checkpoints

    run = tracker.find_resumable(stage, key)
    if run is None:
        return ""
    sound, damaged = survey_checkpoints(tracker.output_dir_for_writing(run))
    where = f" from {sound.name}" if sound else " from the start" if damaged else ""
    bad = "".join(f"; {path.name} is damaged: {why}" for path, why in damaged)
    return f"unfinished run {run.info.run_id[:8]} resumes{where}{bad}"


def short_hash(obj: Any) -> str:
    return hash_json(obj)[:8]
