"""Stage `grpo`: online RL with verifiable rewards (Group Relative Policy Optimization) on the DPO model.

The algorithm, one optimizer step (`train_grpo`):

1. take this process's `train.batch_size` prompts per micro-batch (data kind `prompt_answer`: a
   prompt and its reference answer; the same seeded row order as SFT and DPO);
2. for each prompt sample a group of G = `num_generations` completions from the current policy
   with the KV cache (`trlm/training/sampling.py`: the prompt runs through the model once per
   group), sample g of prompt row r at step s from the seed (train.seed, s, r, g): a resumed or
   multi-process run samples exactly the same completions;
3. score each completion with the recipe's rewards (`stages/rewards.py`, a weighted sum) and take
   group-relative advantages A = r - mean(group), divided by the group's std when
   `scale_rewards: group` (DeepSeekMath, arXiv:2402.03300, section 4.1);
4. pack the samples padding-free, each group's prompt once (`share_prompt`), compute the completion tokens' log-probs and minimise
   the clipped surrogate with an optional KL penalty (`trlm/training/policy_gradient.py`), over
   `num_iterations` updates of the same samples (the ratio to the sampling policy is clipped to
   [1 - epsilon, 1 + epsilon] from the second update on).

The options, and TRL's `GRPOConfig` option of the same name (same meaning):
- `loss_type`: `grpo` = each completion's token mean, averaged over completions (DeepSeekMath);
  `dr_grpo` = token sum over (completions x max_completion_length), a constant normaliser that
  removes the length bias (Dr. GRPO, "Understanding R1-Zero-Like Training", arXiv:2503.20783);
  `dapo` = token sum over all completion tokens of the step (DAPO, arXiv:2503.14476, its
  token-level loss). Normalisers are global over micro-batches and processes.
- `beta`: KL penalty to the starting model (k3 estimator, as TRL); 0 (default) loads no reference model.
- `epsilon`, `num_iterations`: the clip range, and how many updates reuse one batch of samples.
- `num_generations`, `max_completion_length`, `temperature`, `top_p`: the sampling.
- `scale_rewards`: `group` (TRL's default, divide by the group std) or `none` (Dr. GRPO).
- `drop_zero_variance_groups`: groups whose samples all got the same reward give no gradient;
  their fraction is always logged, and with this option they also leave the normalisers.

Metrics per logged step: reward (mean total), reward/<name> per function, pass_at_1 (pass@1: the fraction of
samples that pass the first listed reward, i.e. score it 1) and pass_at_g (pass@G: groups with one passing
sample), completion_length, truncated (fraction cut at max_completion_length), zero_variance
(fraction of groups), clipped (fraction of tokens), kl (when beta > 0). `samples/step-*.jsonl`
holds prompt, completion, rewards and advantage of this process's samples for the first
`sample_steps` steps.

Usage: `trlm run --only grpo`, or `python -m trlm.stages.grpo --recipe trlm-135m-grpo --model-dir M
--data-dir DATA/grpo --out-dir OUT` (also under torchrun, like SFT and DPO).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator

from trlm.recipe import Bool, Int, MixtureConfig, NonNegativeFloat, PositiveFloat, PositiveInt, Strict
from trlm.stage import IGNORE_INDEX, MODEL, Stage, StageContext, section_without_mixture, train_launch, training_check
from trlm.stages.rewards import REWARDS, score
from trlm.training.batching import collate, micro_batch_rows, shared_prefix_layout, to_device
from trlm.training.checkpoints import finished_summary
from trlm.training.config import TrainConfig
from trlm.training.distributed import gradient_sync, one_writer
from trlm.training.entry import stage_main
from trlm.training.loop import (LogWindow, OnLog, check_finite, due, finish, log_metrics, maybe_resume, optimizer_step, prepare_training,
                                progress_bar, reduce_sums, save_if_due, setup_training)
from trlm.training.losses import chunked_token_logps
from trlm.training.optim import clip_gradients
from trlm.training.policy_gradient import clipped_policy_loss, group_advantages
from trlm.training.sampling import sample_groups

NORMALISE = {"grpo": "sequence", "dr_grpo": "constant", "dapo": "token"}


class GRPOStageConfig(Strict):
    data: MixtureConfig
    train: TrainConfig = Field(description="batch_size: prompts per micro-batch per process (each gives num_generations samples)")
    rewards: dict[str, PositiveFloat] = Field(default_factory=lambda: {"gsm8k_correct": 1.0, "think_format": 0.2},
                                              description="reward functions (stages/rewards.py) and their weights; the first is pass@k's verifier")
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "dapo"
    beta: NonNegativeFloat = 0.0
    epsilon: PositiveFloat = 0.2
    num_iterations: PositiveInt = 1
    num_generations: Int = Field(8, ge=2, description="G: completions sampled per prompt")
    max_completion_length: PositiveInt = 256
    temperature: PositiveFloat = 1.0
    top_p: float = Field(1.0, gt=0, le=1)
    scale_rewards: Literal["group", "none"] = "group"
    drop_zero_variance_groups: Bool = False
    share_prompt: Bool = Field(True, description="the loss forward holds each group's prompt once (padding-free packed_sdpa only); "
                               "changes no value beyond float rounding")
    sample_threads: PositiveInt | None = Field(None, description="CPU intra-op threads while sampling (1 is far faster on a busy "
                                               "shared CPU); None keeps the process setting. Changes no output")
    sample_workers: PositiveInt = Field(1, description="prompts whose groups are sampled at once, each in a thread of its own with one "
                                        "intra-op thread (on a CPU: one core each; sample_threads then does not apply). Changes no output")
    sample_steps: Int = Field(3, ge=0, description="write samples/step-N.jsonl for the first N steps")

    @field_validator("rewards")
    @classmethod
    def _known_rewards(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = [name for name in value if name not in REWARDS]
        if unknown or not value:
            raise ValueError(f"unknown reward {unknown[0]!r}; known: {', '.join(REWARDS)}" if unknown else "give at least one reward")
        return value


# --- one micro-batch of prompts: sample, score, build the packed sequences ---------------------------


def sample_seed(seed: int, step: int, row: int, sample: int) -> int:
    """The seed of sample `sample` of prompt row `row` at optimizer step `step` (0-based)."""
    return (((seed * 1_000_003 + step) * 1_000_003 + row) * 1_000_003 + sample) % (2**63)


def _sample_micro_batch(cfg, setup, policy, rows, step: int, weights: dict[str, float]) -> dict:
    tok, data, g = setup.tokenizer, setup.data, cfg.num_generations
    sequences, shares, texts, totals, each, lengths, truncated = [], [], [], [], [], [], 0
    prompts = [[int(x) for x in data["prompt_input_ids"][row]] for row in rows]
    seeds = [[sample_seed(cfg.train.seed, step, int(row), k) for k in range(g)] for row in rows]
    groups = sample_groups(policy, prompts, seeds=seeds, max_new_tokens=cfg.max_completion_length, eos_id=setup.pad_id,
                           temperature=cfg.temperature, top_p=cfg.top_p, num_threads=cfg.sample_threads, workers=cfg.sample_workers)
    for row, prompt, completions in zip(rows, prompts, groups):
        first = len(sequences)  # the group's first sample: the others share its prompt
        answer = data["answer"][row]
        for completion in completions:
            ended = completion[-1] == setup.pad_id
            truncated += not ended
            text = tok.decode(completion[:-1] if ended else completion, skip_special_tokens=False)
            total, scores = score(text, answer, weights)
            shares.append((first, len(prompt)) if len(sequences) > first else None)
            sequences.append((prompt + completion, [IGNORE_INDEX] * len(prompt) + completion))
            texts.append((tok.decode(prompt, skip_special_tokens=False), text))
            totals.append(total)
            each.append(scores)
            lengths.append(len(completion))
    rewards = torch.tensor(totals, dtype=torch.float32).reshape(len(rows), g)
    advantages, zero_variance = group_advantages(rewards, cfg.scale_rewards)
    keep = (~zero_variance).repeat_interleave(g) if cfg.drop_zero_variance_groups else torch.ones(len(totals), dtype=torch.bool)
    return {"sequences": sequences, "shares": shares, "texts": texts, "rewards": rewards, "each": each, "advantages": advantages.flatten(), "keep": keep,
            "zero_variance": zero_variance, "lengths": lengths, "truncated": truncated}


def _token_grid(flat: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat per-token values (completion after completion) -> ([B, T_max] padded with 0, mask [B, T_max])."""
    width = max(lengths)
    mask = torch.arange(width, device=flat.device)[None, :] < torch.tensor(lengths, device=flat.device)[:, None]
    grid = flat.new_zeros(len(lengths), width).masked_scatter(mask, flat)
    return grid, mask


def shares_prompt(cfg: GRPOStageConfig) -> bool:
    """Prompt sharing needs a packed row and the attention kernel that understands the layout."""
    return cfg.share_prompt and cfg.train.padding_free and cfg.train.attn_implementation == "packed_sdpa"


def loss_batch(batch: dict, *, padding_free: bool, pad_id: int, share_prompt: bool) -> dict:
    """The sampled sequences packed for the loss forward; with share_prompt each group's prompt once."""
    mb = collate(batch["sequences"], padding_free=padding_free, pad_id=pad_id)
    if share_prompt:
        layout = shared_prefix_layout(mb["seq_lengths"], batch["shares"])
        mb |= layout | {"input_ids": mb["input_ids"][:, layout["to_real"]], "position_ids": mb["position_ids"][:, layout["to_real"]]}
    return mb


def _token_logps(model, mb: dict) -> torch.Tensor:
    head = partial(chunked_token_logps, labels=mb["labels"])
    shared = (mb["to_virtual"], mb["to_real"]) if "to_virtual" in mb else None
    return model(mb["input_ids"], head=head, position_ids=mb["position_ids"], attention_mask=mb["attention_mask"],
                 packed_lengths=mb["packed_lengths"], shared_prefix=shared)


def _write_samples(out_dir: Path, step: int, batches: list[dict], weights: dict[str, float]) -> None:
    rows = [{"prompt": prompt, "completion": completion, "reward": float(b["rewards"].flatten()[i]), "rewards": b["each"][i],
             "advantage": float(b["advantages"][i])} for b in batches for i, (prompt, completion) in enumerate(b["texts"])]
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    (out_dir / "samples" / f"step-{step:06d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@one_writer
def train_grpo(cfg: GRPOStageConfig, *, model_dir: Path, data_dir: Path, out_dir: Path, on_log: OnLog | None = None) -> dict:
    """Run (or resume, or skip if finished) the GRPO stage; return the summary of final metrics."""
    model_dir, data_dir, out_dir = Path(model_dir), Path(data_dir), Path(out_dir)
    if (done := finished_summary(out_dir)) is not None:
        return done
    setup = setup_training(cfg, "grpo", model_dir=model_dir, data_dir=data_dir, out_dir=out_dir, columns=["prompt_input_ids"])
    import pyarrow.parquet as pq

    setup.data["answer"] = pq.read_table(data_dir / "train.parquet", columns=["answer"]).column("answer").to_pylist()
    accelerator, plan, train, weights = setup.accelerator, setup.plan, cfg.train, dict(cfg.rewards)
    reference = _reference_model(setup, model_dir) if cfg.beta > 0 else None
    share_prompt = shares_prompt(cfg)
    model, optimizer, scheduler = prepare_training(setup)
    policy = accelerator.unwrap_model(model)
    step, progress = maybe_resume(setup)
    verifier = next(iter(weights))
    keys = ("loss", "steps", "samples", "reward", "pass", "groups", "pass_groups", "length", "truncated", "zero_variance", "clipped", "kl",
            "loss_tokens", *(f"reward/{name}" for name in weights))
    window = LogWindow(keys, rates=("samples",))
    bar = progress_bar(setup, step)
    try:
        while step < plan.total_steps:
            batches = []
            for m in range(step * train.grad_accum_steps, (step + 1) * train.grad_accum_steps):
                rows = micro_batch_rows(plan, setup.n_rows, train.batch_size, train.seed, m, accelerator.process_index, accelerator.num_processes)
                batch = _sample_micro_batch(cfg, setup, policy, rows, step, weights)
                batch["mb"] = to_device(loss_batch(batch, padding_free=train.padding_free, pad_id=setup.pad_id, share_prompt=share_prompt),
                                        accelerator.device)
                with torch.no_grad():  # one update per batch: the ratio's denominator is logps.detach(), no forward needed
                    batch["old"] = _token_grid(_token_logps(model, batch["mb"]).float(), batch["lengths"])[0] if cfg.num_iterations > 1 else None
                    batch["ref"] = _token_grid(_token_logps(reference, batch["mb"]).float(), batch["lengths"])[0] if reference is not None else None
                batches.append(batch)
            counts = reduce_sums(accelerator, {"seqs": sum(int(b["keep"].sum()) for b in batches),
                                               "tokens": sum(sum(n for n, k in zip(b["lengths"], b["keep"]) if k) for b in batches)})
            if setup.is_main and step < cfg.sample_steps:
                _write_samples(out_dir, step + 1, batches, weights)
            for iteration in range(cfg.num_iterations):
                step_loss, stats = 0.0, {"clipped": 0.0, "kl": 0.0, "tokens": 0.0}
                for i, b in enumerate(batches):
                    with gradient_sync(accelerator, model, last=i == len(batches) - 1):
                        logps, mask = _token_grid(_token_logps(model, b["mb"]), b["lengths"])
                        mask = mask & b["keep"].to(mask.device)[:, None]
                        old = b["old"] if b["old"] is not None else logps.detach()
                        loss, sums = clipped_policy_loss(logps, old, b["advantages"].to(logps.device), mask, normalise=NORMALISE[cfg.loss_type],
                                                         num_sequences=counts["seqs"], num_tokens=counts["tokens"], max_length=cfg.max_completion_length,
                                                         epsilon=cfg.epsilon, beta=cfg.beta, ref_logps=b["ref"])
                        accelerator.backward(loss * accelerator.num_processes)
                    step_loss += float(loss.detach())
                    stats = {k: stats[k] + float(v) for k, v in sums.items()}
                if iteration < cfg.num_iterations - 1:  # an update that reuses the samples; the schedule moves once per step
                    grad_norm = clip_gradients(model, train.max_grad_norm)
                    check_finite(setup, step=step + 1, loss=step_loss, grad_norm=grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            grad_norm, learning_rate = optimizer_step(setup, model, optimizer, scheduler, step=step + 1, loss=step_loss)
            step += 1
            window.end_step(grad_norm)
            bar.update(1)
            window.add(_step_sums(batches, weights, verifier, cfg.num_generations, step_loss, stats, accelerator.is_main_process))

            if due(step, train.logging_steps, plan.total_steps):
                sums, shared = window.flush(setup, progress, step, learning_rate)
                metrics = _metrics(sums, weights, cfg.beta) | shared
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", pass1=f"{metrics['pass_at_1']:.2f}")
                log_metrics(setup, progress, step, metrics, on_log)
            save_if_due(setup, step, progress, window.watch)
    finally:
        bar.close()
    return finish(setup, model, progress, {"rows": setup.n_rows})


def _reference_model(setup, model_dir: Path):
    """The frozen starting model for the KL penalty (only when beta > 0)."""
    from trlm.training.attention import install_head_forward
    from trlm.training.modeling import load_model, resize_for_tokenizer

    reference = load_model(model_dir, next(setup.model.parameters()).dtype, setup.train.attn_implementation)
    resize_for_tokenizer(reference, setup.tokenizer)
    install_head_forward(reference)
    return reference.to(setup.accelerator.device).eval().requires_grad_(False)


def _step_sums(batches, weights, verifier: str, g: int, loss: float, stats: dict, main: bool) -> dict[str, float]:
    each = [scores for b in batches for scores in b["each"]]
    passed = torch.tensor([s[verifier] >= 1.0 for s in each], dtype=torch.float32)
    return {
        "loss": loss, "steps": float(main), "samples": len(each), "reward": float(sum(float(b["rewards"].sum()) for b in batches)),
        "pass": float(passed.sum()), "groups": len(each) // g, "pass_groups": float((passed.reshape(-1, g).amax(dim=1)).sum()),
        "length": float(sum(sum(b["lengths"]) for b in batches)), "truncated": float(sum(b["truncated"] for b in batches)),
        "zero_variance": float(sum(int(b["zero_variance"].sum()) for b in batches)), "clipped": stats["clipped"], "kl": stats["kl"],
        "loss_tokens": stats["tokens"], "tokens": stats["tokens"], **{f"reward/{n}": float(sum(s[n] for s in each)) for n in weights},
    }


def _metrics(sums: dict[str, float], weights: dict[str, float], beta: float) -> dict[str, float]:
    n, groups, tokens = max(sums["samples"], 1.0), max(sums["groups"], 1.0), max(sums["loss_tokens"], 1.0)
    metrics = {
        "loss": sums["loss"] / max(sums["steps"], 1.0), "reward": sums["reward"] / n, **{f"reward/{k}": sums[f"reward/{k}"] / n for k in weights},
        "pass_at_1": sums["pass"] / n, "pass_at_g": sums["pass_groups"] / groups, "completion_length": sums["length"] / n,
        "truncated": sums["truncated"] / n, "zero_variance": sums["zero_variance"] / groups, "clipped": sums["clipped"] / tokens,
    }
    if beta > 0:
        metrics["kl"] = sums["kl"] / tokens
    return metrics


# --- the stage declaration -----------------------------------------------------------------------

TRAINING_LIBRARIES = ("torch", "transformers", "tokenizers", "accelerate", "einops")


def _run(ctx: StageContext) -> dict:
    return train_grpo(ctx.config, model_dir=ctx.inputs["model"], data_dir=ctx.inputs["data"], out_dir=ctx.out, on_log=ctx.on_log)


def _question(prompt: str) -> str:
    """The last user turn of a ChatML prompt (the whole prompt in any other template)."""
    turn = prompt.rsplit("<|im_start|>user\n", 1)[-1]
    return turn.split("<|im_end|>", 1)[0].strip()


def _tables(out: Path) -> dict[str, list[dict]]:
    """The sample completions of the first `sample_steps` steps, one table per step."""
    tables = {}
    for path in sorted((out / "samples").glob("step-*.jsonl")):
        step = int(path.stem.split("-")[1])
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        tables[f"samples-step-{step}"] = [{"step": step, "prompt": _question(r["prompt"]), "completion": r["completion"], "reward": r["reward"],
                                           "advantage": r["advantage"], **{f"reward/{k}": v for k, v in r["rewards"].items()}} for r in rows]
    return tables


def _headline(out: Path) -> dict[str, float]:
    metrics = out / "metrics.json"
    summary = json.loads(metrics.read_text()).get("summary", {}) if metrics.is_file() else {}
    return {k: summary[k] for k in ("reward", "pass_at_1", "pass_at_g", "completion_length") if k in summary}


STAGE = Stage(
    name="grpo",
    section="grpo",
    config=GRPOStageConfig,
    key_config=section_without_mixture("grpo"),
    check=training_check("grpo", "prompt_answer"),
    hands_on=MODEL,
    run=_run,
    headline=_headline,
    tables=_tables,
    launch_inputs=("model", "data"),
    launch=train_launch,
    libraries=TRAINING_LIBRARIES,
    description="GRPO: online RL with verifiable rewards (GSM8K correctness, <think> format)",
)


def main(argv: list[str] | None = None) -> None:
    stage_main(argv, train_grpo, "GRPO stage: online RL with verifiable rewards.", (STAGE.name,), GRPOStageConfig, inputs=STAGE.launch_inputs)


if __name__ == "__main__":
    main()
