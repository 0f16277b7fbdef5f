"""Only transient errors are retried: a connection or I/O hiccup (`OSError`) runs the task again, an
error a retry would only repeat (a missing file, a bad value, a non-finite loss) fails at once.
Checked on Prefect's own engine, with the condition the pipeline's tasks use."""

from __future__ import annotations

import errno
from types import SimpleNamespace

import pytest

from trlm.flows.pipeline import _retry_transient, base_model_task, stage_task
from trlm.recipe import RecipeError
from trlm.training.loop import NonFiniteError

TRANSIENT = [ConnectionResetError("reset by peer"), TimeoutError("timed out"), OSError(errno.EIO, "I/O error"), BrokenPipeError()]
DETERMINISTIC = [FileNotFoundError(errno.ENOENT, "no such file"), PermissionError(errno.EACCES, "denied"), ValueError("bad"),
                 RecipeError("unknown key"), NonFiniteError("loss nan"), RuntimeError("boom")]


@pytest.mark.parametrize("exc", TRANSIENT + DETERMINISTIC, ids=lambda e: type(e).__name__)
def test_the_condition(exc):
    assert _retry_transient(None, None, SimpleNamespace(data=exc)) is (exc in TRANSIENT)


def test_the_pipeline_tasks_use_it():
    for task in (stage_task, base_model_task):
        assert task.retries == 1 and task.retry_condition_fn is _retry_transient


@pytest.mark.parametrize("first", [TRANSIENT[0], TRANSIENT[2], DETERMINISTIC[0], DETERMINISTIC[2]], ids=lambda e: type(e).__name__)
def test_prefect_retries_only_a_transient_error(prefect_env, first):
    from prefect import flow, task

    calls = []

    @task(retries=1, retry_delay_seconds=0, retry_condition_fn=_retry_transient)
    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise first
        return "done"

    @flow
    def probe() -> str:
        return flaky()

    if first in TRANSIENT:
        assert probe() == "done" and len(calls) == 2
    else:
        with pytest.raises(type(first)):
            probe()
        assert len(calls) == 1
