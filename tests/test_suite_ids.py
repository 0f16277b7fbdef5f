"""The suite's test ids are the same in every process that collects them.

pytest-xdist compares the ids each worker collected and refuses to run when they differ, so an id
built from a value that changes with time or chance (a gzip header's mtime, a random seed) fails CI
only when two workers happen to collect in different seconds.
"""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO_ROOT


def test_a_second_collection_gives_the_same_ids(request):
    ids = {item.nodeid for item in request.session.items}
    files = sorted({nodeid.split("::")[0] for nodeid in ids})
    # The session collected at least a second before this runs: the subprocess's own start takes longer.
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    again = {line for line in out.stdout.splitlines() if "::" in line}
    assert ids - again == set(), f"ids that a second collection did not produce: {sorted(ids - again)[:10]}"
