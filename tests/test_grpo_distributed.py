"""GRPO in two processes (torchrun, CPU, gloo, DDP): each rank samples its own prompts, and the
per-step loss, reward and final weights equal a one-process run of the same global batch (loss
relative 1e-5, weights 2e-5 absolute: the same sums in another order, as for SFT and DPO in
test_distributed.py). The samples are equal exactly: they are seeded by (step, prompt, sample)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_training_support import model_state, write_prompt_answer_dir

TESTS = Path(__file__).resolve().parent
WORKER = """
import json, os, sys
sys.path.insert(0, {tests!r})
from test_training_support import grpo_config
from trlm.stages import grpo, rewards
rewards.REWARDS["odd_chars"] = lambda completion, answer: float(len(completion) % 2)
run = json.loads(sys.argv[1])
logs = []
grpo.train_grpo(grpo_config(**run["config"]), model_dir=run["model"], data_dir=run["data"], out_dir=run["out"],
                on_log=lambda m, s: logs.append([s, m["loss"], m["reward"], m["grad_norm"]]))
if os.environ.get("RANK", "0") == "0":
    open(run["out"] + ".logs.json", "w").write(json.dumps(logs))
"""


def _launch(root: Path, nproc: int, config: dict, model: Path, data: Path) -> tuple[list, dict]:
    worker = root / "worker.py"
    worker.write_text(WORKER.format(tests=str(TESTS)))
    run = {"config": config, "model": str(model), "data": str(data), "out": str(root / "out")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), str(worker), json.dumps(run)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((root / "out.logs.json").read_text()), model_state(root / "out" / "model")


def test_two_processes_match_one(tmp_path, tiny_model_dir, tokenizer_dir):
    data = write_prompt_answer_dir(tmp_path / "data", tokenizer_dir, n=8)
    common = {"rewards": {"odd_chars": 1.0}, "max_steps": 3, "loss_type": "grpo", "num_generations": 3, "max_completion_length": 5}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    logs1, weights1 = _launch(tmp_path / "one", 1, {**common, "batch_size": 2}, tiny_model_dir, data)
    logs2, weights2 = _launch(tmp_path / "two", 2, {**common, "batch_size": 1}, tiny_model_dir, data)
    assert [s for s, *_ in logs1] == [s for s, *_ in logs2] == [1, 2, 3]
    for (_, loss1, reward1, norm1), (_, loss2, reward2, norm2) in zip(logs1, logs2):
        assert reward1 == reward2  # the same completions
        assert loss2 == pytest.approx(loss1, rel=1e-5, abs=1e-8) and norm2 == pytest.approx(norm1, rel=1e-5)
    assert any(loss != 0 for _, loss, *_ in logs1)
    assert all((weights1[k] - weights2[k]).abs().max().item() <= 2e-5 for k in weights1)
    assert not torch.equal(weights1["model.embed_tokens.weight"], model_state(tiny_model_dir)["model.embed_tokens.weight"])
