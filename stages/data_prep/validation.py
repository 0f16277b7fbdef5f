"""Row validation before anything is rendered: roles, turn order, empty turns, undecodable text, chosen == rejected.

Each problem is a `RowError` naming the file, the row and the field; under policy `error` data-prep
gathers them all into one `DataValidationError` and writes nothing.
"""

from __future__ import annotations

from typing import Any

from trlm.data_spec import RowError

ROLES = {"system", "user", "assistant"}


class DataValidationError(ValueError):
    """Bad rows under policy `error`. `errors` holds every RowError found (file, row, field)."""

    def __init__(self, errors: list[RowError], headline: str | None = None):
        self.errors = errors
        self.headline = headline
        shown = "\n".join(f"  {e}" for e in errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        head = headline or f"{len(errors)} invalid row(s); nothing was written (validation_policy=error)"
        super().__init__(f"{head}:\n{shown}{more}")

    def __reduce__(self):  # picklable with its errors (Prefect moves exceptions between processes)
        return (type(self), (self.errors, self.headline))


def _check_text(err, field: str, value: Any) -> None:
    if not isinstance(value, str):
        raise err(field, f"expected text, got {type(value).__name__}", "not text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise err(field, "undecodable text (lone surrogate escape)", "undecodable text") from None


def _check_messages(err, field: str, messages: Any, *, must_end_with: str | None) -> None:
    if not isinstance(messages, list) or not messages:
        raise err(field, "expected a non-empty list of messages", "not a message list")
    expected = None
    for i, m in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise err(where, "a message needs 'role' and 'content'", "malformed message")
        role = m["role"]
        if not isinstance(role, str) or role not in ROLES:
            raise err(f"{where}.role", f"unknown role {role!r} (expected one of {sorted(ROLES)})", "unknown role")
        if role == "system" and i != 0:
            raise err(f"{where}.role", "a system message may only come first", "misplaced system message")
        _check_text(err, f"{where}.content", m["content"])
        if role == "assistant" and not m["content"].strip():
            raise err(f"{where}.content", "empty assistant content", "empty assistant content")
        if role != "system":
            if expected is not None and role != expected:
                raise err(f"{where}.role", f"roles do not alternate: {role!r} follows {role!r}", "roles do not alternate")
            expected = "assistant" if role == "user" else "user"
    if must_end_with and messages[-1]["role"] != must_end_with:
        raise err(f"{field}[{len(messages) - 1}].role", f"the last message must be {must_end_with!r}", f"last message not {must_end_with}")


def validate_row(kind: str, row: dict) -> None:
    def err(field: str, reason: str, category: str | None = None) -> RowError:
        return RowError(row["_source"], row["_row"], field, reason, category)

    if kind == "sft":
        _check_messages(err, "messages", row["messages"], must_end_with="assistant")
        first = next(m["role"] for m in row["messages"] if m["role"] != "system")
        if first != "user":
            raise err("messages[0].role", "the conversation must start with a user turn", "first turn not user")
        return
    if kind == "prompt_answer":
        _check_messages(err, "prompt", row["prompt"], must_end_with="user")
        if not str(row["answer"]).strip():
            raise err("answer", "empty reference answer", "empty answer")
        return
    if not row["prompt"]:
        raise err("prompt", "empty prompt (chosen and rejected share no turns)", "empty prompt")
    _check_messages(err, "prompt", row["prompt"], must_end_with="user")
    for side in ("chosen", "rejected"):
        _check_messages(err, side, row[side], must_end_with="assistant")
        if row[side][0]["role"] != "assistant":
            raise err(f"{side}[0].role", "the completion must start with an assistant turn", "completion not assistant")
    if row["chosen"] == row["rejected"]:
        raise err("chosen", "chosen is identical to rejected", "chosen identical to rejected")
