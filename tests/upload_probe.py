"""Peak memory of uploading one large stage output through `Tracker.upload_output` (MLflow's
`log_artifacts` to the tracking server, then the completeness check), in a process of its own so
that its RSS is the uploader's alone.

    MLFLOW_TRACKING_URI=http://127.0.0.1:PORT python tests/upload_probe.py --work DIR --size-mb 200

Prints one JSON line: the file size, the RSS just before the upload and its peak during it (psutil,
sampled every 5 ms), in MB; and, as a control that the sampling sees a file held whole, the growth
while the file is read into memory at once. (ru_maxrss would not do: Linux carries it over from the
parent through fork and exec, and pytest's process is large.)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import threading
import time
from pathlib import Path

import psutil

MB = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--size-mb", type=int, default=200)
    args = ap.parse_args()

    from trlm.artifacts import write_fingerprint
    from trlm.runs.tracking import Tracker

    tracker = Tracker(os.environ["MLFLOW_TRACKING_URI"], "upload-probe", Path(args.work))
    run_id = tracker.client.create_run(tracker.experiment_id).info.run_id
    out = tracker.staging_dir(run_id)
    (out / "model").mkdir(parents=True)
    block = os.urandom(MB)  # nothing on the way compresses: one random block, repeated, is as good as all random
    with open(out / "model" / "model.safetensors", "wb") as f:
        for _ in range(args.size_mb):
            f.write(block)
    del block
    (out / "metrics.json").write_text("{}")
    write_fingerprint(out)

    upload = peak_growth(lambda: tracker.upload_output(run_id, out))
    # The control: holding the file whole, as a non-streaming upload would, shows up in the same measure.
    control = peak_growth(lambda: len((out / "model" / "model.safetensors").read_bytes()))
    print(json.dumps({"run_id": run_id, "file_mb": args.size_mb, **upload, "control_growth_mb": control["growth_mb"],
                      "multipart": os.environ.get("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "unset")}))


def peak_growth(fn) -> dict:
    """Run `fn` while sampling this process's RSS every 5 ms: RSS before, peak, growth (MB), seconds."""
    gc.collect()
    proc = psutil.Process()
    before = proc.memory_info().rss
    peak, stop = [before], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        fn()
    finally:
        seconds = time.perf_counter() - t0
        stop.set()
        sampler.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return {"seconds": round(seconds, 2), "rss_before_mb": round(before / MB, 1), "rss_peak_mb": round(peak[0] / MB, 1),
            "growth_mb": round((peak[0] - before) / MB, 1)}


if __name__ == "__main__":
    main()
