"""Verifiable rewards: named functions of (completion text, reference answer) -> a float.

A recipe chooses them by name, with weights (`grpo.rewards: {gsm8k_correct: 1.0, think_format: 0.2}`);
the total reward of a completion is the weighted sum. Each function sees the decoded completion
(special tokens kept, so `<think>` and `</think>` are visible; the end-of-turn token stripped)
and the row's reference answer (data kind `prompt_answer`; a string).

- `gsm8k_correct`: 1 if the last number of the answer part (after the last `</think>`) equals the
  reference as a number (`72`, `72.0`, `$72`, `1,234` all count), else 0. No `</think>`, two
  `</think>`, or no number after it: 0. A number inside the think block never counts.
- `think_format`: 1 if the completion opens exactly one `<think>` block at its start and closes
  it exactly once, with a non-empty answer after it, else 0.
- `contains_seven`, `short_answer`: easily learnable rewards for tests and smoke runs (the answer
  contains the digit 7; the completion is at most 20 tokens long, measured in words here).
"""

from __future__ import annotations

import re
from typing import Callable

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def _answer_part(completion: str) -> str | None:
    """The text after the one `</think>`; None without exactly one."""
    if completion.count(THINK_CLOSE) != 1:
        return None
    return completion.split(THINK_CLOSE, 1)[1]


def parse_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").replace("$", ""))
    except ValueError:
        return None


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    return parse_number(found[-1]) if found else None


def gsm8k_correct(completion: str, answer: str) -> float:
    part = _answer_part(completion)
    if part is None:
        return 0.0
    got, want = last_number(part), parse_number(answer.strip())
    return float(got is not None and want is not None and abs(got - want) < 1e-6)


def think_format(completion: str, answer: str) -> float:
    text = completion.strip()
    if not text.startswith(THINK_OPEN) or text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
        return 0.0
    return float(bool(text.split(THINK_CLOSE, 1)[1].strip()))


def contains_seven(completion: str, answer: str) -> float:
    part = _answer_part(completion)
    return float("7" in (part if part is not None else completion))


def short_answer(completion: str, answer: str) -> float:
    return float(len(completion.split()) <= 20)


REWARDS: dict[str, Callable[[str, str], float]] = {
    "gsm8k_correct": gsm8k_correct,
    "think_format": think_format,
    "contains_seven": contains_seven,
    "short_answer": short_answer,
}


def score(completion: str, answer: str, weights: dict[str, float]) -> tuple[float, dict[str, float]]:
    """(weighted total, each named reward) of one completion."""
    each = {name: REWARDS[name](completion, answer) for name in weights}
    return sum(weights[name] * value for name, value in each.items()), each
