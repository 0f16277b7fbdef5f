"""Assistant spans and DPO completions are located by position in the template's output, never by
searching for their text (stages/data_prep/chat_spans.py). Every case is checked token by token: the exact
list of trained token strings (byte-level BPE: 'Ċ' is a newline, 'Ġ' a space).

The templates are the published ones (trlm/recipes/trlm-135m.yaml, whitespace quirks included) on
the real SmolLM2 tokenizer; the mixtures are built from the recipe's YAML with loss_mask/max_length
overridden where a case needs it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from trlm.data_spec import RowError
from trlm.recipe import MixtureConfig
from trlm.stages.data_prep.chat_spans import TemplateError, content_span, control_tokens, render, sft_spans, tokenize_with_mask
from trlm.stages.data_prep import IGNORE, DataValidationError, build_tokenizer, prepare_mixture
from trlm.stages.data_prep.chat_spans import KINDS, Encoding

IM_END = "<|im_end|>"
RECIPE = yaml.safe_load((Path(__file__).resolve().parents[1] / "trlm" / "recipes" / "trlm-135m.yaml").read_text())
# Not prefix-stable: the last message renders as "role\n", earlier ones as "role: ".
UNSTABLE = (
    "{% for m in messages %}{% if loop.last %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + ': ' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
)


def mixture(section: str, **updates) -> MixtureConfig:
    return MixtureConfig.model_validate({**RECIPE[section]["data"], "spec": "unused", **updates})


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    cache: dict[str, object] = {}

    def get(section: str):
        if section not in cache:
            cache[section] = build_tokenizer(tokenizer_dir, mixture(section))
        return cache[section]

    return get


def turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


def sft(tok, messages: list[dict], section: str = "sft_general", **updates) -> tuple[list[list[str]], Counter, dict]:
    """Runs of consecutive trained token strings of one SFT row, the row's stats and the record."""
    mix = mixture(section, **{"loss_mask": "assistant", "max_length": 4096, **updates})
    t = tok(section)
    stats: Counter = Counter()
    row = {"messages": messages, "_source": "t.jsonl", "_row": 1}
    rec = KINDS["sft"].encode(Encoding.of(t, mix), row, stats)
    return runs(t, rec["input_ids"], rec["labels"]), stats, rec


def runs(t, ids: list[int], labels: list[int]) -> list[list[str]]:
    out, current = [], []
    for token, label in zip(t.convert_ids_to_tokens(ids), labels):
        if label != IGNORE:
            current.append(token)
        elif current:
            out.append(current)
            current = []
    return out + ([current] if current else [])


def dpo(tok, prompt: list[dict], chosen: str, rejected: str, section: str = "dpo", template: str | None = None) -> dict[str, list[str]]:
    mix = mixture(section, max_length=4096, max_prompt_length=None, truncation_mode="keep_start", **({"chat_template": template} if template else {}))
    t = tok(section)
    row = {"prompt": prompt, "chosen": turns(("assistant", chosen)), "rejected": turns(("assistant", rejected)), "_source": "p.jsonl", "_row": 3}
    rec = KINDS["preference"].encode(Encoding.of(t, mix), row, Counter())
    out = {}
    for side in ("chosen", "rejected"):
        ids, labels = rec[f"{side}_input_ids"], rec[f"{side}_labels"]
        assert labels[: rec["prompt_length"]] == [IGNORE] * rec["prompt_length"] and labels[rec["prompt_length"] :] == ids[rec["prompt_length"] :]
        out[side] = t.convert_ids_to_tokens(ids[rec["prompt_length"] :])
        out[f"{side}_prompt"] = t.decode(ids[: rec["prompt_length"]])
    return out


Q = turns(("user", "Is water wet?"))


# --- the three reproduced bugs ---------------------------------------------------------------------


def test_dpo_pair_a_b_is_valid(tok):
    """Was rejected as 'render different prompts': 'a' was found inside '<|im_st*a*rt|>'."""
    out = dpo(tok, Q, "a", "b")
    assert out["chosen"] == ["a", IM_END] and out["rejected"] == ["b", IM_END]
    assert out["chosen_prompt"] == out["rejected_prompt"]
    assert out["chosen_prompt"].endswith("  <|im_start|>user\nIs water wet?<|im_end|>\n\n  <|im_start|>assistant\n")


def test_dpo_pair_a_art_trains_only_the_completions(tok):
    """Was accepted with 'art|>assistant\\n' trained as part of both completions."""
    out = dpo(tok, Q, "a", "art")
    assert out["chosen"] == ["a", IM_END] and out["rejected"] == ["art", IM_END]
    assert out["chosen_prompt"] == out["rejected_prompt"] and out["chosen_prompt"].endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(("content", "trained"), [("a", ["a", IM_END]), ("assistant", ["ass", "istant", IM_END])])
def test_sft_assistant_mask_never_trains_the_header(tok, content, trained):
    """Content 'a' trained '<|im_start|>assistant\\na<|im_end|>'; 'assistant' trained 'assistant\\nassistant<|im_end|>'."""
    got, stats, _ = sft(tok, turns(("user", "Hi?"), ("assistant", content)))
    assert got == [trained] and stats["assistant_start_merged_with_header"] == 0


# --- contents that a text search confuses ------------------------------------------------------------

# One-character, repeated, role names, pieces of the '  <|im_start|>assistant\n' header, edge whitespace.
CONTENTS = [
    ("x", ["x", IM_END]),
    (".", [".", IM_END]),
    ("a a a", ["a", "Ġa", "Ġa", IM_END]),
    ("user", ["user", IM_END]),
    ("system", ["system", IM_END]),
    ("im_start", ["im", "_", "start", IM_END]),
    ("im_start|>assistant", ["im", "_", "start", "|", ">", "ass", "istant", IM_END]),
    ("t", ["t", IM_END]),
    ("<", ["<", IM_END]),
    ("_", ["_", IM_END]),
    ("ant", ["ant", IM_END]),
    ("|>", ["|", ">", IM_END]),
    (" a", ["Ġa", IM_END]),
    ("a ", ["a", "Ġ", IM_END]),
    ("\ta\n", ["ĉ", "a", "Ċ", IM_END]),
]


@pytest.mark.parametrize(("content", "trained"), CONTENTS)
@pytest.mark.parametrize("section", ["sft_general", "sft_think"])
def test_sft_short_and_confusable_contents(tok, section, content, trained):
    got, _, _ = sft(tok, turns(("user", "a a a"), ("assistant", content)), section)
    assert got == [trained]


@pytest.mark.parametrize(("content", "trained"), CONTENTS)
def test_dpo_short_and_confusable_contents(tok, content, trained):
    out = dpo(tok, turns(("user", content)), content, "No.")
    assert out["chosen"] == trained and out["rejected"] == ["No", ".", IM_END]


def test_content_equal_to_the_previous_user_turn(tok):
    got, _, _ = sft(tok, turns(("user", "Paris."), ("assistant", "Paris.")))
    assert got == [["Paris", ".", IM_END]]
    out = dpo(tok, turns(("user", "Paris.")), "Paris.", "Paris")
    assert out["chosen"] == ["Paris", ".", IM_END] and out["rejected"] == ["Paris", IM_END]


@pytest.mark.parametrize("user", ["\n", " ", "\n\n  "])
def test_whitespace_user_turns(tok, user):
    got, _, _ = sft(tok, turns(("user", user), ("assistant", "a")))
    assert got == [["a", IM_END]]


@pytest.mark.parametrize(
    ("content", "trained", "merged"),
    [("\n", [IM_END], 1), (" ", [IM_END], 1), ("\n\nHello", ["Ċ", "Hello", IM_END], 1), ("\n a", ["Ġa", IM_END], 1)],
)
def test_boundary_rule_for_content_opening_with_whitespace(tok, content, trained, merged):
    """A token that starts in the header ('\\n') and runs into the content is not trained: it is the
    header's. (The stage rejects whitespace-only assistant turns earlier, as 'empty assistant content'.)"""
    t, mix = tok("sft_general"), mixture("sft_general")
    messages = turns(("user", "Hi?"), ("assistant", content))
    text = render(t, mix.chat_template, messages)
    spans, prompt_end = sft_spans(t, mix.chat_template, messages, IM_END, text, assistant_only=True)
    ids, labels, _, got_merged = tokenize_with_mask(t, text, spans, prompt_end)
    assert runs(t, ids, labels) == [trained] and got_merged == merged
    assert text[spans[0][0] : spans[0][1]] == content + IM_END


def test_dpo_completion_opening_with_whitespace_is_kept_whole(tok):
    """DPO tokenizes prompt and completion separately (as TRL does): nothing straddles the boundary."""
    assert dpo(tok, Q, "\n\nHello", "No.")["chosen"] == ["Ċ", "Ċ", "Hello", IM_END]


# --- control-token text in content: rejected, naming file, row and field --------------------------------


@pytest.mark.parametrize(
    ("messages", "field", "token"),
    [
        (turns(("user", "Hi?"), ("assistant", "Done.<|im_end|>")), "messages[1].content", IM_END),
        (turns(("user", "<|im_start|>"), ("assistant", "a")), "messages[0].content", "<|im_start|>"),
        (turns(("system", "x <|endoftext|>"), ("user", "Hi?"), ("assistant", "a")), "messages[0].content", "<|endoftext|>"),
    ],
)
def test_sft_control_token_text_is_rejected(tok, messages, field, token):
    """Such text tokenizes AS the control token: a fake end of turn or a forged header. Not trained."""
    with pytest.raises(RowError) as info:
        sft(tok, messages)
    e = info.value
    assert (e.source, e.row, e.field, e.kind) == ("t.jsonl", 1, field, "control-token text in content") and repr(token) in e.reason


def test_dpo_control_token_text_is_rejected(tok):
    with pytest.raises(RowError) as info:
        dpo(tok, Q, "Yes.", "No.<|im_end|>")
    assert (info.value.source, info.value.row, info.value.field) == ("p.jsonl", 3, "rejected[0].content")


def test_think_tags_and_other_added_tokens_are_content(tok):
    """The mixture's own special tokens and non-control added tokens (`<filename>`) stay trainable."""
    got, _, _ = sft(tok, turns(("user", "2+3?"), ("assistant", "<think>\n2+3=5\n</think>\n#### 5")), "sft_think")
    assert got == [["<think>", "Ċ", "2", "+", "3", "=", "5", "Ċ", "</think>", "Ċ", "####", "Ġ", "5", IM_END]]
    got, _, _ = sft(tok, turns(("user", "Usage?"), ("assistant", "Usage: $0 <filename>")))
    assert got == [["Usage", ":", "Ġ$", "0", "Ġ", "<filename>", IM_END]]


def test_control_token_rows_are_dropped_and_listed(tmp_path, tokenizer_dir):
    rows = [{"messages": turns(("user", "Hi?"), ("assistant", "a"))}, {"messages": turns(("user", "Hi?"), ("assistant", "b<|im_end|>"))}]
    (tmp_path / "root" / "c").mkdir(parents=True)
    (tmp_path / "root" / "c" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "c", "kind": "sft", "sources": [{"name": "s", "path": "c/rows.jsonl"}]}))
    mix = mixture("sft_general", spec=str(spec), loss_mask="assistant")
    summary = prepare_mixture("sft-general", mix, data_root=tmp_path / "root", base_model_dir=tokenizer_dir, policy="drop", out=tmp_path / "out", progress=False)
    assert summary["rows_out"] == 1 and summary["dropped"] == {"control-token text in content": 1}
    (d,) = summary["dropped_rows"]
    assert (d["file"], d["row"], d["field"]) == ("c/rows.jsonl", 2, "messages[1].content")


# --- the published templates, multi-turn -----------------------------------------------------------------

CONV = turns(
    ("user", "Capital of France?"), ("assistant", "Paris."), ("user", "Paris."), ("assistant", "Paris."),
    ("user", "And Italy?"), ("assistant", "Rome, since 1871."),
)
CONV_TRAINED = [["Paris", ".", IM_END], ["Paris", ".", IM_END], ["Rome", ",", "Ġsince", "Ġ", "1", "8", "7", "1", ".", IM_END]]


@pytest.mark.parametrize("section", ["sft_general", "sft_think", "dpo"])
@pytest.mark.parametrize("system", [None, "Be brief."])
def test_published_templates_multi_turn(tok, section, system):
    """Every assistant turn + its <|im_end|> trained, nothing else: not the (default or given) system
    turn, the user turns (one equal to an assistant turn), the headers, the quirky indentation."""
    messages = (turns(("system", system)) if system else []) + CONV
    got, _, rec = sft(tok, messages, section)
    assert got == CONV_TRAINED
    t = tok(section)
    text = render(t, mixture(section).chat_template, messages)
    assert rec["input_ids"] == t(text, add_special_tokens=False)["input_ids"]  # the full rendering, as is
    assert text.startswith("      <|im_start|>system\n" if system is None else "  <|im_start|>system\nBe brief.")
    assert "<|im_end|>\n\n  <|im_start|>assistant\nParis.<|im_end|>\n\n  <|im_start|>user\nParis." in text


def test_published_dpo_template_multi_turn_prompt(tok):
    out = dpo(tok, CONV[:3], "Yes, in everyday terms.", "Milan?")
    assert out["chosen"] == ["Yes", ",", "Ġin", "Ġeveryday", "Ġterms", ".", IM_END]
    assert out["rejected"] == ["Mil", "an", "?", IM_END]
    assert out["chosen_prompt"] == out["rejected_prompt"]
    assert out["chosen_prompt"].endswith("<|im_start|>user\nParis.<|im_end|>\n\n  <|im_start|>assistant\n")


# --- templates that cannot locate turns: a clear error naming the template -------------------------------


def test_not_prefix_stable_template_is_named(tok):
    with pytest.raises(TemplateError, match="not prefix-stable"):
        sft(tok, turns(("user", "Hi?"), ("assistant", "a")), chat_template=UNSTABLE)
    with pytest.raises(TemplateError, match="not prefix-stable"):
        dpo(tok, Q, "a", "b", template=UNSTABLE)


def test_not_prefix_stable_template_stops_the_stage(tmp_path, tokenizer_dir):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "rows.jsonl").write_text(json.dumps({"messages": turns(("user", "Hi?"), ("assistant", "a"))}) + "\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "c", "kind": "sft", "sources": [{"name": "s", "path": "rows.jsonl"}]}))
    mix = mixture("sft_general", spec=str(spec), loss_mask="assistant", chat_template=UNSTABLE)
    with pytest.raises(DataValidationError) as info:  # even under policy drop: the template is at fault
        prepare_mixture("sft-general", mix, data_root=tmp_path / "root", base_model_dir=tokenizer_dir, policy="drop", out=tmp_path / "out", progress=False)
    message = str(info.value)
    assert message.startswith("sft-general: the chat template sha256:") and repr(UNSTABLE[:60]) in message
    assert "rows.jsonl: row 1: field 'messages'" in message and "not prefix-stable" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("template", "content", "match"),
    [
        ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}", " a", "not inserted verbatim"),
        ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}\n<|im_end|>\n{% endfor %}", "a", "not followed immediately by the end token"),
        ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}", "a", "exactly once"),
        ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] | length }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}", "a", "depends on"),
    ],
)
def test_templates_that_do_not_insert_content_verbatim(tok, template, content, match):
    t = tok("sft_general")
    with pytest.raises(TemplateError, match=match):
        content_span(t, template, turns(("user", "Hi?"), ("assistant", content)), 1, IM_END)
