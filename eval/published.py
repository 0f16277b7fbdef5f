"""What the report compares against, as data: the published figures with a note on how each was
produced, the report's rows (exact metric per row), derived rows, and the full split sizes and
baselines of the published benchmarks. No code beyond the `Row` record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Sources: Shekswess/tiny-reasoning-language-model README (TRLM-135M, its "SmolLM2-135M-Instruct" column
# copied from the SmolLM2 model card); the SmolLM2-135M-Instruct model card (lighteval). See
# shared/notes/trlm-recipe.md section 3 for how each was produced.

PUBLISHED_COLUMNS = ("SmolLM2-135M-Instruct (published)", "TRLM-135M (published)")

# Full evaluated split sizes and baselines of the published benchmarks (computed from the data files:
# ARC-Challenge test answer positions 266/311/310/285 of 1172, 4-choice except 7 items; BoolQ
# validation 2033 "yes" of 3270; PIQA validation label 1 = 928 of 1838; MMLU test answers
# A/B/C/D = 3222/3462/3582/3776 of 14042). Used to flag published figures (binomial standard error).
FULL_SPLITS: dict[str, dict[str, Any]] = {
    "arc_challenge": {"n": 1172, "chance": 0.2502, "majority": 311 / 1172},
    "arc_easy": {"n": 2376, "chance": 0.2502, "majority": 633 / 2376},
    "arc_average": {"n": 3548, "chance": 0.2502, "majority": None},
    "boolq": {"n": 3270, "chance": 0.5, "majority": 2033 / 3270},
    "piqa": {"n": 1838, "chance": 0.5, "majority": 928 / 1838},
    "mmlu": {"n": 14042, "chance": 0.25, "majority": 3776 / 14042},
    "gsm8k": {"n": 1319, "chance": None, "majority": None},
    "bbh": {"n": 6511, "chance": None, "majority": None},
    "ifeval": {"n": 541, "chance": None, "majority": None},
    "ifeval_mean4": {"n": 541, "chance": None, "majority": None},
}


@dataclass(frozen=True)
class Row:
    benchmark: str  # display name
    task: str  # task/group key in the results (or a derived key)
    metric: str  # metric key in the results document
    label: str  # exact metric description shown


ROWS: tuple[Row, ...] = (
    Row("ARC-Challenge", "arc_challenge", "acc", "acc (0-shot, lm-eval arc_challenge)"),
    Row("ARC-Challenge", "arc_challenge", "acc_norm", "acc_norm (0-shot)"),
    Row("ARC-Easy", "arc_easy", "acc", "acc (0-shot, lm-eval arc_easy)"),
    Row("ARC-Easy", "arc_easy", "acc_norm", "acc_norm (0-shot)"),
    Row("ARC average", "arc_average", "acc_norm", "mean of ARC-Easy and ARC-Challenge acc_norm"),
    Row("BBH", "bbh", "exact_match,get-answer", "exact_match, get-answer filter (3-shot CoT, 27 tasks size-weighted)"),
    Row("BoolQ", "boolq", "acc", "acc (0-shot)"),
    Row("GSM8K", "gsm8k", "exact_match,strict-match", "exact_match, strict-match (5-shot)"),
    Row("GSM8K", "gsm8k", "exact_match,flexible-extract", "exact_match, flexible-extract (5-shot)"),
    Row("IFEval", "ifeval", "prompt_level_strict_acc", "prompt-level strict acc"),
    Row("IFEval", "ifeval", "inst_level_strict_acc", "instruction-level strict acc"),
    Row("IFEval", "ifeval", "prompt_level_loose_acc", "prompt-level loose acc"),
    Row("IFEval", "ifeval", "inst_level_loose_acc", "instruction-level loose acc"),
    Row("IFEval", "ifeval_mean4", "mean4", "mean of the four IFEval metrics above"),
    Row("MMLU", "mmlu", "acc", "acc (0-shot MCF: letter answer, 57 subjects size-weighted)"),
    Row("PIQA", "piqa", "acc", "acc (0-shot)"),
    Row("PIQA", "piqa", "acc_norm", "acc_norm (0-shot)"),
)

# Derived rows: key -> (task, metric) parts averaged with equal weights.
DERIVED: dict[str, list[tuple[str, str]]] = {
    "arc_average": [("arc_easy", "acc_norm"), ("arc_challenge", "acc_norm")],
    "ifeval_mean4": [("ifeval", m) for m in ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")],
}

COMMON_TRLM = (
    "TRLM-135M: lm-eval (version not pinned in the repository) run as `lm_eval --tasks gsm8k,bbh,arc_challenge,"
    "boolq,piqa,ifeval,mmlu --apply_chat_template --fewshot_as_multiturn --batch_size auto`, dtype bfloat16, "
    "with the TRLM chat template (its own system prompt); no per-task logs were published."
)
COMMON_SMOLLM2 = (
    "SmolLM2-135M-Instruct: figures from the model card, measured with lighteval (not lm-eval) with its chat "
    "template, vLLM, bf16; log-likelihood tasks use acc_norm_nospace. They are not re-measurements with our setup."
)

# (column, task key, metric key) -> (value in %, note)
PUBLISHED: dict[tuple[str, str, str], tuple[float, str]] = {
    ("TRLM-135M (published)", "arc_challenge", "acc_norm"): (
        40.61,
        "Published as 'ARC Challenge 40.61 (avg)'; the metric (acc, acc_norm or their mean) and what '(avg)' averages are not stated; placed on the acc_norm row.",
    ),
    ("SmolLM2-135M-Instruct (published)", "arc_average", "acc_norm"): (
        37.3,
        "Published as 'ARC (Average) 37.3': lighteval, the mean of ARC-Easy and ARC-Challenge, acc_norm_nospace, 0-shot. TRLM's table sets it beside its ARC-Challenge-only figure.",
    ),
    ("TRLM-135M (published)", "bbh", "exact_match,get-answer"): (
        36.80,
        "lm-eval `bbh` (3-shot chain-of-thought since lm-eval 0.4.5, max_gen_toks 1024); the lm-eval version used is unknown.",
    ),
    ("SmolLM2-135M-Instruct (published)", "bbh", "exact_match,get-answer"): (
        28.2,
        "lighteval 'BBH (3-shot)': a direct-answer prompt ('Question: … Answer:') scored with exact_match, not chain-of-thought: a different task formulation.",
    ),
    ("TRLM-135M (published)", "boolq", "acc"): (
        62.17,
        "Exactly the majority-class rate of the BoolQ validation split (2033 of 3270 answers are 'yes' = 62.17%): a model that always answers 'yes' scores this.",
    ),
    ("TRLM-135M (published)", "gsm8k", "exact_match,strict-match"): (
        2.59,
        "Which filter (strict-match or flexible-extract) is not stated; placed on strict-match. 5-shot, max_gen_toks 256, which cuts <think> traces short.",
    ),
    ("SmolLM2-135M-Instruct (published)", "gsm8k", "exact_match,strict-match"): (
        1.4,
        "lighteval 'GSM8K (5-shot)' scored with quasi_exact_match_gsm8k, 256 new tokens; not lm-eval's strict-match filter.",
    ),
    ("TRLM-135M (published)", "ifeval_mean4", "mean4"): (
        35.49,
        "Published as 'IFEval 35.49 (avg)'; which of the four lm-eval IFEval metrics are averaged is not stated; placed on the mean-of-four row.",
    ),
    ("SmolLM2-135M-Instruct (published)", "ifeval_mean4", "mean4"): (
        29.9,
        "lighteval 'IFEval (Average prompt/inst)': an average of prompt- and instruction-level accuracy (strict/loose not stated), not the mean of all four.",
    ),
    ("TRLM-135M (published)", "mmlu", "acc"): (
        34.95,
        "lm-eval `mmlu`: 0-shot multiple-choice format (letter answer), acc, size-weighted.",
    ),
    ("SmolLM2-135M-Instruct (published)", "mmlu", "acc"): (
        29.3,
        "lighteval 'MMLU (cloze)': the answer text is scored (no lettered options), acc_norm_nospace: a different task formulation from lm-eval's letter-answer MCF.",
    ),
    ("TRLM-135M (published)", "piqa", "acc"): (
        64.91,
        "Whether acc or acc_norm is not stated; placed on the acc row.",
    ),
    ("SmolLM2-135M-Instruct (published)", "piqa", "acc_norm"): (
        66.3,
        "lighteval 0-shot PIQA, acc_norm_nospace (length-normalised, no leading space before the answer).",
    ),
}
