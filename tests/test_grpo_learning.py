"""GRPO learns: the real SmolLM2-135M-Instruct and a reward it can learn in a few steps.

The reward is `contains_seven` on three questions whose answer is 7, asked with a terse system
prompt, at temperature 0.7 and 10 completion tokens: the base model says "7" in about a third of
its samples (per prompt 0.2 to 0.55), so groups have reward variance from the first step and the
first update already has a gradient. Each step samples G = 8 completions of every prompt.

Start = the mean reward of step 1 (samples of the starting model), end = that of the last step
(samples of the model after STEPS - 1 updates), per training seed. The noise is measured on the
start: the spread of the start reward across seeds (their sample std) and the binomial standard
error of one step's mean; the rise must exceed 3 times the larger of the two, for every seed.

Measured (2026-12-02, this project's 2-core CPU shared with other jobs, torch 2.13.0):
seed 1: 0.417 -> 1.000 (steps 0.417 0.583 1.000); seed 2: 0.292 -> 1.000 (steps 0.292 0.750 1.000).
Start 0.354; noise 0.098 (binomial SE of 24 samples; the seeds' std is 0.088): rises of 0.646 > 0.29.
Wall time 14 min 17 s under a load of 6-7 from other jobs, 5 min 19 s of CPU (user), GGUF conversion
included; not yet timed on a quiet machine.

Uses the real model: marked `slow`. Alone: `pytest -q tests/test_grpo_learning.py -s`.
"""

from __future__ import annotations

import math
import statistics

import pyarrow as pa
import pytest

from test_training_support import _finish, grpo_config, make_tokenizer

PROMPTS = ["How many days are in a week?", "What is 3 + 4?", "How many continents are there?"]
SYSTEM = "Answer in a few words."  # terser answers, and a shorter prompt than the template's default system prompt
TRAIN_SEEDS = (1, 2)
STEPS, LEARNING_RATE, G = 3, 5e-5, 8  # at 5e-5 the reward reached 1.0 after 2 updates for both seeds (6-step runs)


def _prompt_dir(out, model_dir):
    tok = make_tokenizer(model_dir)
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}] for p in PROMPTS]
    ids = [tok(tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"] for c in chats]
    table = pa.table({"prompt_input_ids": pa.array(ids, pa.list_(pa.int32())), "answer": pa.array(["7"] * len(ids), pa.string())})
    return _finish(out, table, tok, {"rows_out": len(ids)})


@pytest.fixture(scope="module")
def real_model(tmp_path_factory):
    from trlm.base_model import DEFAULT_GGUF, materialize_base_model
    from trlm.recipe import BaseModelConfig

    return materialize_base_model(BaseModelConfig(source=DEFAULT_GGUF), tmp_path_factory.mktemp("work"))


@pytest.mark.slow
def test_mean_reward_rises_beyond_noise(tmp_path, real_model):
    from trlm.stages.grpo import train_grpo

    data = _prompt_dir(tmp_path / "data", real_model)
    curves = {}
    for seed in TRAIN_SEEDS:
        cfg = grpo_config(rewards={"contains_seven": 1.0}, num_generations=G, max_completion_length=10, temperature=0.7, batch_size=len(PROMPTS),
                          max_steps=STEPS, learning_rate=LEARNING_RATE, seed=seed, loss_type="dapo", sample_steps=0, sample_threads=1)
        curves[seed] = []
        train_grpo(cfg, model_dir=real_model, data_dir=data, out_dir=tmp_path / f"out-{seed}", on_log=lambda m, s, c=curves[seed]: c.append(m["reward"]))
        assert len(curves[seed]) == STEPS
    starts = [c[0] for c in curves.values()]
    start = statistics.mean(starts)
    noise = max(statistics.stdev(starts), math.sqrt(start * (1 - start) / (G * len(PROMPTS))))
    for seed, curve in curves.items():
        print(f"seed {seed}: mean reward {curve[0]:.3f} -> {curve[-1]:.3f} (steps: {' '.join(f'{r:.3f}' for r in curve)}); noise {noise:.3f}")
    for seed, curve in curves.items():
        assert curve[-1] - start > 3 * noise, (seed, curve, start, noise)
