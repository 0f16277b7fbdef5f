"""Where each turn's content sits in a chat template's rendering: found by position, never by text search.

Searching the rendered text for a turn's content can match inside the template's own text (content
`a` is found in `<|im_st*a*rt|>`, content `assistant` in the `assistant\\n` header), so the header gets
trained, or a valid DPO pair is rejected. Instead, each turn is located from the template's own output:

1. render the conversation twice: as is, and with the turn's content replaced by a sentinel string
   that occurs nowhere in the real rendering nor in any message (so finding it cannot collide);
2. the sentinel's offset `at` is where the content starts; the two renderings must agree before it
   (the text before a turn must not depend on the turn's content) and after it (the real rendering
   holds the content verbatim at `at`, followed by exactly what follows the sentinel);
3. the end token (`<|im_end|>`) must follow the content immediately; the span runs through it, so the
   model learns to stop.

Templates that fail a check (content transformed or rendered twice, end token not right after the
content, earlier turns rendered differently once later turns exist) raise TemplateError. The
generation prompt is never used: the published templates' generation prompt is not a prefix of their
training rendering (different indentation, an extra newline).

Token rule (SFT, labels over the tokens of the full rendering, via the tokenizer's offset mapping):
a token is trained iff it STARTS inside a span [content start, end of end token). A token that starts
in the header and runs into the content (BPE merges the header's `\\n` with content that opens with
whitespace, e.g. `\\n\\n`) is not trained: training it would teach the header, which the prompt always
supplies. Such turns lose only that leading whitespace and are counted (`assistant_start_merged_with_header`).
The end token is an added special token, so tokenization always splits right after it; a trained token
running past the span end would mean it is not, and raises TemplateError.

The data kinds data-prep knows, as one table at the bottom of this module (`KINDS`): how a row of
each kind becomes a training record, its turns located as above. A kind (a data spec's `kind:`) is one `Kind` entry: its encoder (canonical row -> record of token
ids), the column whose length the histogram counts, how its tokens and target tokens are counted,
which extra counters its stats report, and the field a template error names. Adding a kind is one
entry here, one canonical shape in `trlm/data_spec.py` and one row check in `validation.py`.

- `sft`: {"messages"} -> `input_ids`, `labels` (all tokens, or the assistant turns only);
- `preference`: {"prompt", "chosen", "rejected"} -> `{chosen,rejected}_{input_ids,labels}`,
  `prompt_length` (the completion is the target; the prompt keeps its last max_prompt_length tokens);
- `prompt_answer`: {"prompt", "answer"} -> `prompt_input_ids` (the prompt rendered up to where the
  assistant's content starts, exactly as the preference kind renders it) and `answer` (the
  reference, a string: for GSM8K the number after `####`). Online RL samples the completions; a
  prompt longer than max_prompt_length (or max_length) keeps its last tokens, like DPO's.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Callable

from trlm.data_spec import RowError
from trlm.recipe import MixtureConfig
from trlm.stage import IGNORE_INDEX as IGNORE


class TemplateError(ValueError):
    """The chat template cannot locate turns by position: a property of the template, not of one row."""


def describe_template(template: str) -> str:
    """Short name of a template for error messages: content hash + its first 60 characters."""
    return f"sha256:{hashlib.sha256(template.encode()).hexdigest()[:12]} {template[:60]!r}"


def render(tokenizer, template: str, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)


def control_tokens(tokenizer, allowed: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Texts that the tokenizer turns into chat-control tokens (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`).

    The mixture's own special tokens (`<think>`, `</think>`) are content by design and allowed. Other
    added tokens (`<filename>`, `<jupyter_code>`, ...) delimit nothing in a conversation and appear in
    real data (shell usage strings), so they stay allowed too.
    """
    return sorted(set(tokenizer.all_special_tokens) - set(allowed))


def find_control_text(messages: list[dict], field: str, forbidden: list[str]) -> tuple[str, str] | None:
    """(field, token) of the first message whose content holds a control token's text, else None.

    Such text is tokenized AS the control token: a fake end of turn or a forged turn header inside the
    trained target or the prompt. Rows with it are rejected (file/row/field named), not trained.
    """
    for i, m in enumerate(messages):
        for token in forbidden:
            if token in m["content"]:
                return f"{field}[{i}].content", token
    return None


def _sentinel(taken: list[str]) -> str:
    """A string found in none of `taken` (deterministic, so reruns render identically)."""
    for k in itertools.count():
        candidate = f"TRLMspan{k}Qz7Kx3Wf9Rm2Vb8"  # letters and digits only: survives any escaping filter
        if not any(candidate in t for t in taken):
            return candidate
    raise AssertionError("unreachable")


def content_span(tokenizer, template: str, messages: list[dict], i: int, end_token: str, text: str | None = None) -> tuple[int, int]:
    """(content start, end of the end token after it) of messages[i] in the rendering `text` of `messages`."""
    text = render(tokenizer, template, messages) if text is None else text
    content = messages[i]["content"]
    sentinel = _sentinel([text, *(m["content"] for m in messages)])
    probe = render(tokenizer, template, [*messages[:i], {**messages[i], "content": sentinel}, *messages[i + 1 :]])
    at = probe.find(sentinel)  # the only search: the sentinel occurs nowhere else, so it cannot collide
    if at < 0 or probe.find(sentinel, at + 1) >= 0:
        raise TemplateError(f"message {i}'s content must be rendered exactly once, verbatim; it is rendered {probe.count(sentinel)} time(s)")
    after = at + len(content)
    if text[:at] != probe[:at]:
        raise TemplateError(f"the text before message {i} depends on that message's content")
    if text[at:after] != content or text[after:] != probe[at + len(sentinel) :]:
        raise TemplateError(f"message {i}'s content is not inserted verbatim (or the text after it depends on it)")
    if not text.startswith(end_token, after):
        raise TemplateError(f"message {i}'s content is not followed immediately by the end token {end_token!r}")
    return at, after + len(end_token)


def check_prefix_stable(tokenizer, template: str, messages: list[dict], upto: int, text: str) -> None:
    """The rendering of messages[:upto] must be a prefix of `text` (the rendering of all messages):
    a turn is trained in the context that the template gives the conversation up to it."""
    if not text.startswith(render(tokenizer, template, messages[:upto])):
        raise TemplateError(f"the template is not prefix-stable: the rendering of the first {upto} message(s) is not a prefix of the rendering of all {len(messages)}")


def sft_spans(tokenizer, template: str, messages: list[dict], end_token: str, text: str, *, assistant_only: bool) -> tuple[list[tuple[int, int]], int]:
    """(spans of the trained assistant turns, start of the first assistant content) in `text`.

    With assistant_only every assistant turn is located and every prefix rendering checked; otherwise
    (loss_mask all) only the first assistant turn, whose start bounds the untrainable prompt.
    """
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if assistant_only:
        for upto in range(1, len(messages)):
            check_prefix_stable(tokenizer, template, messages, upto, text)
    else:
        turns = turns[:1]
    spans = [content_span(tokenizer, template, messages, i, end_token, text) for i in turns]
    return spans, spans[0][0]


def tokenize_with_mask(tokenizer, text: str, spans: list[tuple[int, int]] | None, prompt_end: int) -> tuple[list[int], list[int], int, int]:
    """(ids, labels, prompt tokens, turns whose first token merged with the header) of `text`.

    spans None: every token is trained (loss_mask all). Otherwise the rule in the module docstring:
    trained iff the token starts inside a span. Prompt tokens: those starting before `prompt_end`.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    prompt_len = sum(1 for start, _ in offsets if start < prompt_end)
    if spans is None:
        return ids, list(ids), prompt_len, 0
    labels, merged, s = [IGNORE] * len(ids), 0, 0
    spans = sorted(spans)
    for k, (start, end) in enumerate(offsets):  # one pass: spans and tokens are both in text order
        while s < len(spans) and spans[s][1] <= start:
            s += 1
        if s == len(spans):
            break
        span_start, span_end = spans[s]
        if start < span_start < end:
            merged += 1
        elif span_start <= start:
            if end > span_end:
                raise TemplateError(f"a token runs past the end token (offsets {start}-{end}, span end {span_end}): the end token is not a single token")
            labels[k] = ids[k]
    return ids, labels, prompt_len, merged


def preference_texts(tokenizer, template: str, prompt: list[dict], completion: list[dict], end_token: str) -> tuple[str, str]:
    """(prompt text, completion text) of prompt + completion, split by position.

    The completion starts where its first message's content starts and ends with the end token after
    its last message; the prompt is everything before (its header included). Whatever lies after the
    last end token (the template's trailing newlines) belongs to neither, as in the published recipe.
    """
    messages = [*prompt, *completion]
    text = render(tokenizer, template, messages)
    check_prefix_stable(tokenizer, template, messages, len(prompt), text)
    start, end = content_span(tokenizer, template, messages, len(prompt), end_token, text)
    if len(completion) > 1:
        end = content_span(tokenizer, template, messages, len(messages) - 1, end_token, text)[1]
    return text[:start], text[start:end]


# --- the data kinds: one entry each ------------------------------------------------------------
@dataclass(frozen=True)
class Encoding:
    """What every encoder needs from the mixture and its tokenizer."""

    tokenizer: object
    mixture: MixtureConfig
    end_token: str
    think_close_id: int | None
    eos_id: int
    forbidden: list[str]

    @classmethod
    def of(cls, tokenizer, mixture: MixtureConfig) -> "Encoding":
        think_close = "</think>" if "</think>" in mixture.special_tokens else None
        return cls(tokenizer, mixture, tokenizer.eos_token,
                   tokenizer.convert_tokens_to_ids(think_close) if think_close else None,
                   tokenizer.convert_tokens_to_ids(tokenizer.eos_token), control_tokens(tokenizer, mixture.special_tokens))

    @property
    def template(self) -> str:
        return self.mixture.chat_template


def _truncate(seq: list[int], max_length: int, mode: str) -> list[int]:
    return seq[:max_length] if mode == "keep_start" else seq[-max_length:]


def _reject_control_text(row: dict, fields: tuple[str, ...], forbidden: list[str]) -> None:
    for field in fields:
        found = find_control_text(row[field], field, forbidden)
        if found:
            raise RowError(row["_source"], row["_row"], found[0], f"contains the text {found[1]!r}, which tokenizes as that control token (a fake turn boundary)", "control-token text in content")


def encode_sft(enc: Encoding, row: dict, stats) -> dict:
    """Tokens of the full rendering; with loss_mask assistant, labels on each assistant turn's content
    + its end token, located by position (chat_spans.py). TemplateError propagates: it stops the stage."""
    tokenizer, template, mixture, messages = enc.tokenizer, enc.template, enc.mixture, row["messages"]
    _reject_control_text(row, ("messages",), enc.forbidden)
    text = render(tokenizer, template, messages)
    assistant_only = mixture.loss_mask == "assistant"
    spans, prompt_end = sft_spans(tokenizer, template, messages, enc.end_token, text, assistant_only=assistant_only)
    ids, labels, prompt_len, merged = tokenize_with_mask(tokenizer, text, spans if assistant_only else None, prompt_end)
    stats["assistant_start_merged_with_header"] += merged
    if prompt_len >= mixture.max_length and mixture.truncation_mode == "keep_start":
        raise RowError(row["_source"], row["_row"], "messages", f"prompt alone ({prompt_len} tokens) is longer than max_length {mixture.max_length}", "prompt longer than max_length")
    reasoning = any("<think>" in m["content"] for m in messages if m["role"] == "assistant")
    stats["reasoning_rows"] += reasoning
    if len(ids) > mixture.max_length:
        stats["truncated"] += 1
        kept = _truncate(ids, mixture.max_length, mixture.truncation_mode)
        if reasoning and enc.think_close_id is not None and enc.think_close_id in ids and enc.think_close_id not in kept:
            stats["lost_think_close"] += 1
        if enc.eos_id in ids and kept[-1] != enc.eos_id and mixture.truncation_mode == "keep_start":
            stats["lost_end_of_turn"] += 1
        ids, labels = kept, _truncate(labels, mixture.max_length, mixture.truncation_mode)
    if not any(x != IGNORE for x in labels[1:]):
        raise RowError(row["_source"], row["_row"], "messages", f"no target tokens left after truncation to max_length {mixture.max_length}", "no target tokens after truncation")
    return {"input_ids": ids, "labels": labels, "_source": row["_source"], "_row": row["_row"]}


def encode_preference(enc: Encoding, row: dict, stats) -> dict:
    """prompt ids (shared) + completion ids; labels -100 on the prompt; truncation as published.

    Each side is split by position (chat_spans.py): the completion starts where its first assistant
    content starts. Prompt and completion are tokenized separately (as TRL's DPO does), so no token
    straddles the boundary."""
    tokenizer, mixture = enc.tokenizer, enc.mixture
    _reject_control_text(row, ("prompt", "chosen", "rejected"), enc.forbidden)
    sides = {}
    prompt_text = None
    for side in ("chosen", "rejected"):
        p_text, c_text = preference_texts(tokenizer, enc.template, row["prompt"], row[side], enc.end_token)
        if prompt_text is not None and p_text != prompt_text:  # compared whole, by position: never searched
            raise TemplateError("the template renders the shared prompt differently for chosen and rejected")
        prompt_text = p_text
        sides[side] = tokenizer(c_text, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    if mixture.max_prompt_length is None and len(prompt_ids) >= mixture.max_length:
        raise RowError(row["_source"], row["_row"], "prompt", f"prompt alone ({len(prompt_ids)} tokens) is longer than max_length {mixture.max_length}", "prompt longer than max_length")
    if mixture.max_prompt_length is not None and len(prompt_ids) > mixture.max_prompt_length:
        prompt_ids = prompt_ids[-mixture.max_prompt_length :]
        stats["truncated_prompt"] += 1
    rec: dict = {}
    truncated = False
    for side, completion in sides.items():
        ids = prompt_ids + completion
        labels = [IGNORE] * len(prompt_ids) + completion
        if len(ids) > mixture.max_length:
            truncated = True
            ids, labels = _truncate(ids, mixture.max_length, mixture.truncation_mode), _truncate(labels, mixture.max_length, mixture.truncation_mode)
        if not any(x != IGNORE for x in labels[1:]):
            raise RowError(row["_source"], row["_row"], side, f"completion entirely cut off by truncation to max_length {mixture.max_length}", "completion cut off by truncation")
        rec[f"{side}_input_ids"], rec[f"{side}_labels"] = ids, labels
    stats["truncated"] += truncated
    rec["prompt_length"] = next(i for i, x in enumerate(rec["chosen_labels"]) if x != IGNORE)
    rec["_source"], rec["_row"] = row["_source"], row["_row"]
    return rec


def encode_prompt_answer(enc: Encoding, row: dict, stats) -> dict:
    """The prompt rendered up to the assistant's content (as for preference data), and the reference
    answer as a string. A prompt longer than max_prompt_length (default max_length) keeps its end."""
    _reject_control_text(row, ("prompt",), enc.forbidden)
    placeholder = [{"role": "assistant", "content": "x"}]  # where the assistant's content would start
    prompt_text, _ = preference_texts(enc.tokenizer, enc.template, row["prompt"], placeholder, enc.end_token)
    ids = enc.tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    limit = enc.mixture.max_prompt_length or enc.mixture.max_length
    if len(ids) > limit:
        ids = ids[-limit:]
        stats["truncated_prompt"] += 1
        stats["truncated"] += 1
    return {"prompt_input_ids": ids, "answer": str(row["answer"]), "_source": row["_source"], "_row": row["_row"]}


def _targets(rec: dict) -> int:
    return sum(1 for x in rec["labels"][1:] if x != IGNORE)


@dataclass(frozen=True)
class Kind:
    encode: Callable[[Encoding, dict, object], dict]
    column: str  # the token column the length histogram (and decontamination) reads
    tokens: Callable[[dict], int]  # tokens of one record
    targets: Callable[[dict], int] | None  # trained tokens of one record (None: not defined for the kind)
    loss_mask: str | None  # None: the mixture's own setting
    counted: tuple[str, ...]  # kind-specific counters in stats.json (None for the other kinds)
    field: str  # the field a template error names


KINDS: dict[str, Kind] = {
    "sft": Kind(encode_sft, "input_ids", lambda r: len(r["input_ids"]), _targets, None, ("assistant_start_merged_with_header",), "messages"),
    "preference": Kind(encode_preference, "chosen_input_ids", lambda r: len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]), None,
                       "completion", ("truncated_prompt",), "prompt"),
    "prompt_answer": Kind(encode_prompt_answer, "prompt_input_ids", lambda r: len(r["prompt_input_ids"]), None, "none (sampled online)",
                          ("truncated_prompt",), "prompt"),
}
COUNTED = tuple(dict.fromkeys(key for kind in KINDS.values() for key in kind.counted))
