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
"""

from __future__ import annotations

import hashlib
import itertools

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
