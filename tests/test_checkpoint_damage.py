"""A damaged checkpoint never blocks its stage (issue 21: a truncated `model.safetensors`, a truncated
`optimizer.bin` or a garbled `trainer_state.json` failed every rerun, `--force` included).

The checkpoint's manifest (`COMPLETE`: the SHA-256 of every other file) is checked before a resume;
a damaged newest checkpoint is named in a warning and the stage resumes from the previous one, or
from the start, to the weights of an uninterrupted run, bit for bit.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from test_training_support import model_state, sft_config, write_sft_dir
from trlm.stages.sft import train_sft
from trlm.training.checkpoints import CHECKPOINTS, checkpoint_problem, finished_summary, load_checkpoint

SETTINGS = dict(max_steps=6, batch_size=2, grad_accum_steps=2, save_steps=2, save_total_limit=2, neftune_alpha=5.0,
                lr_scheduler="cosine", warmup_ratio=0.2)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(path: Path) -> None:
    path.write_text(path.read_text()[:-40] + "\x00garbage")


# Every kind of file a one-process checkpoint holds, and how each is damaged.
DAMAGE = {
    "model.safetensors": truncate,
    "optimizer.bin": truncate,
    "scheduler.bin": truncate,
    "random_states_0.pkl": truncate,
    "trainer_state.json": garble,
    "COMPLETE": garble,  # the manifest itself
}


class Crash(RuntimeError):
    pass


def run(out: Path, model_dir: Path, data_dir: Path, crash_at: int | None = None) -> list[int]:
    steps: list[int] = []

    def on_log(metrics, step):
        steps.append(step)
        if step == crash_at:
            raise Crash(f"simulated crash at step {step}")

    summary = train_sft(sft_config(**SETTINGS), model_dir=model_dir, data_dir=data_dir, out_dir=out, on_log=on_log)
    assert summary.get("resumed_from_step", 0) == (steps[0] - 1 if steps else 6)  # recorded where training restarted
    return steps


@pytest.fixture(scope="module")
def crashed(tmp_path_factory, tokenizer_dir, tiny_model_dir):
    """An uninterrupted run's weights, and a run killed at step 5 (checkpoints at steps 2 and 4)."""
    root = tmp_path_factory.mktemp("damage")
    data = write_sft_dir(root / "data", tokenizer_dir, n=16, vary=True)
    run(root / "full", tiny_model_dir, data)
    with pytest.raises(Crash):
        run(root / "crashed", tiny_model_dir, data, crash_at=5)
    return root, data, model_state(root / "full" / "model")


def resume_damaged(root: Path, name: str, damaged: dict[str, list[str]], model_dir: Path, data: Path, caplog) -> tuple[list[int], list[str]]:
    out = root / name
    shutil.copytree(root / "crashed", out)
    for step_dir, files in damaged.items():
        for file in files:
            DAMAGE[file](out / CHECKPOINTS / step_dir / file)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trlm.training.checkpoints"):
        steps = run(out, model_dir, data)
    return steps, [r.getMessage() for r in caplog.records]


def test_the_checkpoint_holds_only_the_kinds_tested(crashed):
    root, _, _ = crashed
    for step_dir in ("step-000002", "step-000004"):
        checkpoint = root / "crashed" / CHECKPOINTS / step_dir
        assert sorted(p.name for p in checkpoint.iterdir()) == sorted(DAMAGE)
        assert checkpoint_problem(checkpoint) is None
        assert set(json.loads((checkpoint / "COMPLETE").read_text())["files"]) == set(DAMAGE) - {"COMPLETE"}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_resumes_from_the_previous_one(crashed, tiny_model_dir, caplog, kind):
    root, data, full = crashed
    steps, warnings = resume_damaged(root, f"bad-{kind}", {"step-000004": [kind]}, tiny_model_dir, data, caplog)
    assert steps == [3, 4, 5, 6]  # continued after step 2, not 4
    assert warnings[0].startswith("checkpoint step-000004 is damaged and skipped: ") and kind in warnings[0], warnings
    assert warnings[1].startswith("resuming from ") and warnings[1].endswith("step-000002 instead"), warnings
    resumed = model_state(root / f"bad-{kind}" / "model")
    assert resumed.keys() == full.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


def test_no_sound_checkpoint_starts_over(crashed, tiny_model_dir, caplog):
    root, data, full = crashed
    damaged = {"step-000002": ["optimizer.bin"], "step-000004": ["model.safetensors"]}
    steps, warnings = resume_damaged(root, "all-bad", damaged, tiny_model_dir, data, caplog)
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [w.split(":")[0] for w in warnings[:2]] == ["checkpoint step-000004 is damaged and skipped", "checkpoint step-000002 is damaged and skipped"]
    assert "starts over from step 0" in warnings[2]
    resumed = model_state(root / "all-bad" / "model")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_json_errors_name_the_file(tmp_path):
    (tmp_path / "metrics.json").write_text('{"summary": ')
    (tmp_path / "fingerprint.json").write_text('{"fingerprint": "x", "files": {}}')
    with pytest.raises(ValueError, match=r"metrics\.json is not valid JSON"):
        finished_summary(tmp_path)
    (tmp_path / "trainer_state.json").write_text("{garbled")
    with pytest.raises(ValueError, match=r"trainer_state\.json is not valid JSON"):
        load_checkpoint(None, tmp_path, None, data_fp="")
