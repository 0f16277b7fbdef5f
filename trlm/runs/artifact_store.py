"""Stage outputs in a remote artifact store: what lets machines share nothing but the MLflow server URL.

With `mlflow server --serve-artifacts` (destination a directory or an S3 bucket), a run's artifacts
are `mlflow-artifacts:` URIs and every byte goes through the server. Three rules hold here:

* **Uploads are checked before a run may be FINISHED** (`upload_output`): after `log_artifacts`, the
  uploaded listing must hold every file of the local `fingerprint.json` with the local size, and
  the uploaded `fingerprint.json` must equal the local one. A half-done or silently short upload, or
  a listing that gives no size, raises `UploadError`, so the run is marked FAILED, never FINISHED
  with an incomplete artifact.
* **Downloads are atomic and verified** (`download_verified`): into a temporary sibling, re-hashed
  against its `fingerprint.json` and the run's output-fingerprint tags, then renamed into place. A
  killed or corrupted download is never taken for a cached copy.
* **A failure the server could not hear about is not lost** (`record_pending_failure`): when the
  server is gone while a stage fails, the reason is kept in the work dir and written to the run,
  which is marked FAILED, as soon as the server answers again (`flush_pending_failures`).

Nothing here reads a whole file into memory: MLflow streams each upload (a single proxied PUT, or
presigned parts of `MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE` for files over
`MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE`) and each download; sizes come from `stat`, hashes are
computed in 1 MB chunks.
"""

from __future__ import annotations

import json
import logging
import posixpath
import shutil
import tempfile
from pathlib import Path

from trlm.artifacts import (
    FINGERPRINT_FILE,
    TMP_PREFIX,
    atomic_directory,
    atomic_write_text,
    mask_secrets,
    part_fingerprint,
    read_fingerprint,
    verify_fingerprint,
)

log = logging.getLogger(__name__)
PENDING_DIR = "pending-failures"
# A server whose destination is S3 advertises presigned multipart transfers, and MLflow clients then
# move files over 500 MB (the 135M fp32 checkpoint is 538 MB) straight to and from the bucket: the
# worker would have to reach it too. Unless set otherwise, every byte goes through the tracking
# server, streamed, so its URL is all a machine needs. Set both to true where workers can reach the
# bucket (parallel parts; memory ~ threads x MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE). `Tracker` applies them.
PROXY_TRANSFER_DEFAULTS = {"MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false", "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false"}


class UploadError(RuntimeError):
    """The artifact store does not hold the complete output (the run must not be FINISHED)."""


def upload_output(client, run_id: str, out: Path, artifact_path: str) -> None:
    """Upload the directory `out` as the run's `artifact_path` and check the upload is complete."""
    files = sum(1 for p in out.rglob("*") if p.is_file())
    try:
        client.log_artifacts(run_id, str(out), artifact_path)
    except Exception as exc:  # noqa: BLE001 - re-raised with what was being done
        raise UploadError(f"upload of {files} file(s) from {out} to the artifact store failed: {type(exc).__name__}: {exc}") from exc
    problem = upload_problem(client, run_id, out, artifact_path)
    if problem is not None:
        raise UploadError(f"the artifact store does not hold the complete output of run {run_id}: {problem}")


def listed_sizes(client, run_id: str, path: str) -> dict[str, int | None]:
    """Every file under the run's artifact `path`, relative to it -> its size (None if not given)."""
    sizes: dict[str, int | None] = {}
    pending = [path]
    while pending:
        here = pending.pop()
        for info in client.list_artifacts(run_id, here):
            if info.is_dir:
                pending.append(info.path)
            else:
                sizes[posixpath.relpath(info.path, path)] = info.file_size
    return sizes


def upload_problem(client, run_id: str, out: Path, artifact_path: str) -> str | None:
    """What the store lacks of the local `out` (None when every fingerprinted file is there)."""
    record = json.loads((out / FINGERPRINT_FILE).read_text())
    expected = {rel: (out / rel).stat().st_size for rel in [*record["files"], FINGERPRINT_FILE]}
    listed = listed_sizes(client, run_id, artifact_path)
    missing = sorted(set(expected) - set(listed))
    # A listing without a size proves nothing about the bytes stored: refused like a wrong size.
    unsized = sorted(k for k in expected if k in listed and listed[k] is None)
    wrong = sorted(k for k in expected if k in listed and listed[k] is not None and listed[k] != expected[k])
    if missing or wrong or unsized:
        parts = [f"{len(missing)} of {len(expected)} file(s) missing ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''})"] if missing else []
        parts += [f"{len(wrong)} file(s) of another size ({', '.join(wrong[:3])})"] if wrong else []
        parts += [f"{len(unsized)} file(s) listed without a size, so unchecked ({', '.join(unsized[:3])})"] if unsized else []
        return "; ".join(parts)
    with tempfile.TemporaryDirectory(prefix="trlm-check-") as tmp:
        uploaded = Path(client.download_artifacts(run_id, f"{artifact_path}/{FINGERPRINT_FILE}", tmp))
        if uploaded.read_bytes() != (out / FINGERPRINT_FILE).read_bytes():
            return f"the uploaded {FINGERPRINT_FILE} differs from the local one"
    return None


def download_problem(directory: Path, fingerprints: dict[str, str]) -> str | None:
    """Why a downloaded (or locally kept) output cannot be used; None when it is complete and the
    run's recorded output fingerprints (`all`, or a part such as `model`) match it."""
    if not (directory / FINGERPRINT_FILE).is_file():
        return f"{FINGERPRINT_FILE} is missing"
    if not verify_fingerprint(directory):
        return f"its files do not match its {FINGERPRINT_FILE} (incomplete or damaged)"
    for part, expected in fingerprints.items():
        if part == "all":
            got = read_fingerprint(directory)
        elif (directory / part).is_dir():
            got = part_fingerprint(directory, part)
        else:
            continue
        if got != expected:
            return f"the fingerprint of {part!r} is not the one the run recorded"
    return None


def download_verified(tracking_uri: str, run_id: str, artifact_path: str, final: Path, fingerprints: dict[str, str] | None) -> Path:
    """Download the run's `artifact_path` directory to `final`: atomically, and (when `fingerprints`
    is given: a stage output) verified before it is renamed into place."""
    import mlflow

    with atomic_directory(final) as tmp:
        scratch = tmp / f"{TMP_PREFIX}download"  # a leftover name: never content
        scratch.mkdir()
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/{artifact_path}", dst_path=str(scratch), tracking_uri=tracking_uri))
        if not got.is_dir():
            raise RuntimeError(f"runs:/{run_id}/{artifact_path} is not a directory")
        for child in got.iterdir():
            child.rename(tmp / child.name)
        shutil.rmtree(scratch)
        if fingerprints is not None and (problem := download_problem(tmp, fingerprints)) is not None:
            raise RuntimeError(f"the download of runs:/{run_id}/{artifact_path} is not usable: {problem}")
    log.info("downloaded runs:/%s/%s to %s", run_id, artifact_path, final)
    return final


# --- failures the server did not hear about ----------------------------------------------------


def record_pending_failure(work_dir: Path, run_id: str, status: str, error: str, why: BaseException) -> Path:
    """Keep a run's failure in the work dir when the tracking server cannot take it now."""
    path = Path(work_dir) / PENDING_DIR / f"{run_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"run_id": run_id, "status": status, "error": error,
                                        "unrecorded_because": mask_secrets(f"{type(why).__name__}: {why}")[-1000:]}))
    log.warning("could not mark run %s %s on the tracking server (%s); kept in %s, recorded when the server answers",
                run_id, status, type(why).__name__, path)
    return path


def flush_pending_failures(client, work_dir: Path) -> list[str]:
    """Write the kept failures to their runs (still RUNNING ones only); returns the run ids done.
    A server still unreachable leaves them for the next call."""
    done = []
    for path in sorted((Path(work_dir) / PENDING_DIR).glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        try:
            run = client.get_run(rec["run_id"])
            if run.info.status == "RUNNING":
                client.set_tag(rec["run_id"], "trlm.error", rec["error"])
                client.set_terminated(rec["run_id"], rec["status"])
                log.warning("marked run %s %s (the failure happened while the server was unreachable)", rec["run_id"], rec["status"])
                done.append(rec["run_id"])
        except Exception as exc:  # noqa: BLE001 - still unreachable: keep it (unless the run is gone)
            if getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                path.unlink(missing_ok=True)
                continue
            log.info("pending failure of run %s not recorded yet: %s", rec.get("run_id"), type(exc).__name__)
            continue
        path.unlink(missing_ok=True)
    return done
