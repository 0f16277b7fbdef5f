"""The evaluation settings (the recipe's `eval:` section): which tasks, how many items, how to prompt."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from trlm.recipe import Bool, Int, PositiveInt, Strict


class EvalConfig(Strict):
    profile: Literal["smoke", "full"] = "smoke"
    tasks: list[str] = Field(
        default_factory=lambda: ["arc_challenge", "arc_easy", "boolq", "piqa", "mmlu", "gsm8k", "bbh", "ifeval"]
    )
    limit: PositiveInt | None = Field(None, description="the first N items of each task (lm-eval's --limit)")
    sample: PositiveInt | None = Field(None, description="a seeded random subset of N items per task (the smoke profile's default)")
    max_gen_toks: PositiveInt | None = Field(None, description="cap on generated tokens; None keeps each task's default")
    batch_size: PositiveInt = 8
    backend: Literal["trlm", "hf"] = Field(
        "trlm",
        description="the model side of lm-eval: trlm (eval/backend.py: each shared context scored once, logits only where "
        "scored; per-request log-likelihoods equal to hf's to 1e-4) or hf (lm-eval's HFLM, the reference)",
    )
    gen_batch_size: PositiveInt | None = Field(
        32, description="trlm backend: rows per decode batch (prompts are still encoded in HFLM's batches of batch_size); "
        "None = batch_size. A decode step reads every weight once whatever the batch, and finished rows leave it: on the "
        "2-core CPU at 1 thread, 20 IFEval items took 31.7 s at 8 and 18.7 s at 32, 20 GSM8K items 113.8 s and 109.5 s"
    )
    gen_workers: PositiveInt = Field(
        1, description="trlm backend: decode batches run side by side, each in a thread with one intra-op thread (the rows "
        "dealt out in turn). On a CPU a small model's decode step is bound by one core's latency, not the memory bus: "
        "135M model, 106 ms a step alone, 109 and 112 ms two at once. No effect on the texts"
    )
    seed: Int = 1234
    apply_chat_template: Bool = True
    fewshot_as_multiturn: Bool = True
    num_threads: PositiveInt | None = Field(
        None,
        description="torch intra-op threads during evaluation (restored afterwards); None keeps the process setting. "
        "On a CPU shared with other busy processes, 1 thread decodes far faster than 2 (measured 12 vs 0.6 steps/s)",
    )

    @model_validator(mode="after")
    def _one_way_to_subset(self) -> "EvalConfig":
        if self.limit is not None and self.sample is not None:
            raise ValueError("give limit (the first N items) or sample (a seeded subset of N), not both")
        return self
