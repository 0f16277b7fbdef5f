"""Several processes doing the first-time steps at the same moment on a fresh work dir.

Each process imports everything first, then waits at a file barrier, so all of them enter each step
(within milliseconds) together: the MLflow SQLite store + experiment (`Tracker`), the base-model
conversion, the evaluation mirror and the punkt files. All must succeed, the base model must be
converted once, and every artifact must be complete and identical for all of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from trlm.artifacts import is_leftover_name, read_fingerprint, verify_fingerprint

N_PROCESSES = 4

WORKER = textwrap.dedent(r'''
    import hashlib, json, os, sys, time, traceback
    from pathlib import Path

    work, barrier, index, n, model_src, data_root, out = sys.argv[1:8]
    index, n, work, barrier = int(index), int(n), Path(work), Path(barrier)

    import trlm.base_model as bm
    from trlm.eval.mirror import build_mirror
    from trlm.eval.punkt import ensure_punkt_tab
    from trlm.runs.tracking import Tracker
    from trlm.recipe import BaseModelConfig
    import transformers, mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (imports outside the race)

    def wait_for_all(step):
        (barrier / f"{step}-{index}").touch()
        deadline = time.time() + 600
        while len(list(barrier.glob(f"{step}-*"))) < n:
            if time.time() > deadline:
                raise TimeoutError(f"barrier {step}")
            time.sleep(0.001)

    built = barrier / f"built-{index}"
    original_load = bm._load  # loading the source is the start of a conversion
    def counting_load(*args, **kwargs):
        built.touch()
        return original_load(*args, **kwargs)
    bm._load = counting_load

    def mirror_digest(root):
        h = hashlib.sha256()
        for p in sorted(root.rglob("*")):
            if p.name.startswith(".tmp-"):  # another worker's link or README in flight
                continue
            rel = p.relative_to(root).as_posix()
            h.update(rel.encode() + (os.readlink(p).encode() if p.is_symlink() else p.read_bytes() if p.is_file() else b"/"))
        return h.hexdigest()

    steps = {
        "tracker": lambda: Tracker(f"sqlite:///{work / 'mlflow.db'}", "trlm", work).experiment_id,
        "base": lambda: str(bm.materialize_base_model(BaseModelConfig(source=model_src), work)),
        "mirror": lambda: mirror_digest(build_mirror(data_root, work)),
        "punkt": lambda: ensure_punkt_tab(work).get("sha256"),
    }
    results = {}
    for step, fn in steps.items():
        wait_for_all(step)
        try:
            results[step] = {"ok": True, "value": fn()}
        except BaseException:
            results[step] = {"ok": False, "error": traceback.format_exc()[-3000:]}
    Path(out).write_text(json.dumps(results))
''')


def run_first_time_steps(tmp_path: Path, model_src: Path, data_root: Path, n: int, extra_env: dict | None = None) -> tuple[Path, list[dict], list[str]]:
    """Start `n` workers at once on a fresh work dir; return it, their results and their stderr."""
    work, barrier = tmp_path / "work", tmp_path / "barrier"
    work.mkdir()
    barrier.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "NLTK_DATA"}  # each worker must set punkt up itself
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(extra_env or {})})
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(work), str(barrier), str(i), str(n), str(model_src), str(data_root),
                          str(tmp_path / f"result-{i}.json")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in range(n)
    ]
    errors = [p.communicate(timeout=900)[1] for p in procs]
    results = []
    for i, p in enumerate(procs):
        path = tmp_path / f"result-{i}.json"
        results.append(json.loads(path.read_text()) if p.returncode == 0 and path.is_file() else {"exit": p.returncode})
    return work, results, errors


def test_concurrent_first_runs_all_succeed_with_complete_artifacts(tiny_model_dir, shared_data, tmp_path):
    work, results, errors = run_first_time_steps(tmp_path, tiny_model_dir, shared_data, N_PROCESSES)
    failures = {i: (r, errors[i][-3000:]) for i, r in enumerate(results) if "exit" in r or not all(s["ok"] for s in r.values())}
    assert not failures, json.dumps(failures, indent=1)[:8000]

    for step in ("tracker", "base", "mirror", "punkt"):
        values = {json.dumps(r[step]["value"], sort_keys=True) for r in results}
        assert len(values) == 1, (step, values)  # one experiment, one model directory, one mirror, one punkt
    # the base model was converted once; the others waited for it and reused it
    assert len(list((tmp_path / "barrier").glob("built-*"))) == 1
    base = Path(results[0]["base"]["value"])
    assert read_fingerprint(base) and verify_fingerprint(base)
    assert [p.name for p in base.parent.iterdir()] == [base.name]
    # the punkt files are the four complete tables
    punkt = results[0]["punkt"]["value"]
    lang = work / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    assert punkt and {f: hashlib.sha256((lang / f).read_bytes()).hexdigest() for f in punkt} == punkt
    # every mirror link points at its data file, and nothing temporary is left anywhere
    links = [p for p in (work / "hf_mirror").rglob("*") if p.is_symlink()]
    assert len(links) > 100 and all(p.resolve().is_file() for p in links)
    assert [p for p in work.rglob("*") if is_leftover_name(p.name)] == []
