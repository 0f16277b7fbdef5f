"""A work dir owns its state: its servers' records, its artifact locations, and artifacts that do not
depend on how a command was started (offline switches, the work dir's path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trlm.servers import live_port, record_server


def test_a_saved_tokenizer_does_not_record_how_it_was_loaded(tokenizer_dir, tmp_path):
    """HF_HUB_OFFLINE=1 loads with local_files_only=True, which transformers writes into
    tokenizer_config.json: data-prep's output (and every key downstream) changed with the switch."""
    from transformers import AutoTokenizer

    from trlm.artifacts import save_tokenizer

    saved = []
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    for offline in (True, False):
        tok.init_kwargs["local_files_only"] = offline  # what HF_HUB_OFFLINE=1 / unset leave there
        save_tokenizer(tok, tmp_path / str(offline))
        saved.append({f.name: f.read_bytes() for f in sorted((tmp_path / str(offline)).iterdir())})
        assert tok.init_kwargs.get("local_files_only") is offline, "the tokenizer object itself is left as it was"
    assert saved[0] == saved[1]
    assert b"local_files_only" not in saved[0]["tokenizer_config.json"]


def test_a_copied_server_record_does_not_make_the_originals_servers_the_copys(tmp_path):
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        original, copy = tmp_path / "original", tmp_path / "copy"
        (original / "servers").mkdir(parents=True)
        record_server(original / "servers" / "mlflow.pid", proc.pid, ["sleep", "30"], port=15123, work_dir=original)
        (copy / "servers").mkdir(parents=True)
        (copy / "servers" / "mlflow.pid").write_bytes((original / "servers" / "mlflow.pid").read_bytes())
        assert live_port(original, "mlflow") == 15123
        assert live_port(copy, "mlflow") is None
    finally:
        proc.kill()
        proc.wait()


def test_a_store_that_points_at_another_work_dirs_artifacts_is_refused(tmp_path):
    from mlflow import MlflowClient

    from trlm.runs.tracking import Tracker, WorkDirMoved

    old, new = tmp_path / "old", tmp_path / "new"
    new.mkdir()
    client = MlflowClient(f"sqlite:///{new / 'mlflow.db'}")
    client.create_experiment("trlm", artifact_location=(old / "mlartifacts").as_uri())  # as stores made before 0.2 did
    with pytest.raises(WorkDirMoved, match=f"keeps its artifacts in {old / 'mlartifacts'}.*copied or moved from {old}"):
        Tracker(f"sqlite:///{new / 'mlflow.db'}", "trlm", new)


def test_new_stores_hold_relative_artifact_locations(tmp_path):
    from trlm.runs.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "trlm", tmp_path)
    assert tracker.client.get_experiment(tracker.experiment_id).artifact_location == "mlflow-artifacts:/trlm"
    run = tracker.client.create_run(tracker.experiment_id)
    assert tracker.local_artifact_dir(run) == tmp_path / "mlartifacts" / "trlm" / run.info.run_id / "artifacts"


SETTINGS_PROBE = """
import os, sys
from pathlib import Path
from trlm.servers import record_server, use_work_dir_servers, prefect_target
work = Path(sys.argv[1]); (work / "servers").mkdir(parents=True, exist_ok=True)
record_server(work / "servers" / "prefect.pid", int(sys.argv[2]), ["sleep", "30"], port=14999, work_dir=work)
if sys.argv[3] == "late":
    import prefect  # as `trlm run` did: the flow module imported before the setting was made
use_work_dir_servers(work)
assert os.environ["PREFECT_SERVER_DATABASE_CONNECTION_URL"].endswith(str(work / "prefect" / "prefect.db"))
print(prefect_target())
"""


@pytest.mark.parametrize("order", ["early", "late"])
def test_prefect_reports_to_the_work_dirs_server_or_refuses(tmp_path, order):
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    try:
        out = subprocess.run([sys.executable, "-c", SETTINGS_PROBE, str(tmp_path), str(proc.pid), order], env=env,
                             capture_output=True, text=True, timeout=120)
    finally:
        proc.kill()
        proc.wait()
    if order == "early":
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "http://127.0.0.1:14999 (the server `trlm up` started for this work dir)"
    else:  # never a silent temporary server when the work dir has one
        assert out.returncode != 0 and "it was imported before the setting was made" in out.stderr
    assert not (tmp_path / "prefect").exists(), "nothing is written before a flow starts"
