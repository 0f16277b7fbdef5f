"""Shared prefixes (eval/prefix.py): grouped by their tokens, run once, and the results are still HFLM's."""

from __future__ import annotations

import os

import pytest

from trlm.eval.prefix import shared_prefix_groups

TOL = 1e-4
FEWSHOT = [
    "Question: Which gas do plants take in?\nAnswer: carbon dioxide\n\nQuestion: What melts ice?\nAnswer: heat\n\n",
    "Question: How many legs has a spider?\nAnswer: eight\n\nQuestion: What is the sun?\nAnswer: a star\n\n",
]


def test_groups_are_the_subjects_not_only_the_prefix_every_item_shares():
    system = list(range(100, 120))  # 20 tokens in every sequence (a chat template's system turn)
    subject_a, subject_b = system + list(range(200, 260)), system + list(range(300, 340))
    seqs = [subject_a + [1, i] for i in range(5)] + [subject_b + [2, i, 9] for i in range(3)]
    seqs += [system + [7], [5, 6, 7], subject_a + [1]]
    groups = shared_prefix_groups(seqs)
    assert sorted(i for _, members in groups for i in members) == list(range(len(seqs)))
    assert {p: sorted(m) for p, m in groups} == {80: [0, 1, 2, 3, 4, 10], 61: [5, 6, 7], 0: [8, 9]}
    for p, members in groups:  # members share p tokens, and each has a token of its own after them
        assert all(seqs[i][:p] == seqs[members[0]][:p] and len(seqs[i]) > p for i in members)
    assert shared_prefix_groups([[1] * 30, [1] * 30]) == [(29, [0, 1])]  # equal sequences keep their last token
    assert shared_prefix_groups([[1] * 10 + [2], [1] * 10 + [3]]) == [(0, [0, 1])]  # under MIN_SHARED: alone
    assert shared_prefix_groups([]) == [] and shared_prefix_groups([[4]]) == [(0, [0])]
    # "most of the row" holds for each member: a long one among short ones runs alone
    short, long_ = [system + [i] * 10 for i in range(1, 10)], system + [0] * 40  # 20 of 30 tokens; 20 of 60
    groups = shared_prefix_groups(short + [long_], min_fraction=0.5)
    assert groups == [(20, list(range(9))), (0, [9])], groups


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def _count_prefix_runs(monkeypatch, module) -> list[int]:
    """The lengths of the prefixes `module` runs through the model."""
    from trlm.eval import prefix

    runs: list[int] = []
    original = prefix.prefix_kv
    monkeypatch.setattr(module, "prefix_kv", lambda model, tokens, *a: runs.append(len(tokens)) or original(model, tokens, *a))
    return runs


def test_loglikelihoods_after_a_shared_fewshot_prefix_equal_hflm(tiny, monkeypatch):
    """Two subjects' few-shot turns, each shared by its questions; multi-token and one-token answers, the
    model's own greedy answer among them; and a context that shares nothing. HFLM's numbers, with each
    subject's prefix run once."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from trlm.eval import backend
    from trlm.eval.backend import TrlmLM

    model, tok = tiny
    reqs = []
    for s, shots in enumerate(FEWSHOT):
        for q in range(5):
            ctx = tok.encode(shots + f"Question: case {q}" + " and more" * q + "?\nAnswer:")
            with torch.no_grad():
                greedy = model.generate(torch.tensor([ctx]), max_new_tokens=2, do_sample=False)[0, len(ctx):].tolist()
            for cont in (tok.encode(" A"), tok.encode(" B"), tok.encode(" four legs"), greedy):
                reqs.append(((str(s), str(q)), ctx, cont))
    reqs.append((("x", "y"), tok.encode("Alone:"), tok.encode(" yes")))
    runs = _count_prefix_runs(monkeypatch, backend)
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=3, max_length=128)
    tr = TrlmLM(pretrained=model, tokenizer=tok, batch_size=3, max_length=128)
    with torch.no_grad():
        a, b = hf._loglikelihood_tokens(reqs, disable_tqdm=True), tr._loglikelihood_tokens(reqs, disable_tqdm=True)
    shots = [len(tok.encode(s)) for s in FEWSHOT]
    assert len(runs) == 2 and all(r >= min(shots) for r in runs), (runs, shots)  # one run per subject's few-shot turns
    assert sum(g for _, g in a) >= 10
    for x, y in zip(a, b, strict=True):
        assert abs(x[0] - y[0]) <= TOL and x[1] == y[1], (x, y)


def test_one_token_answers_share_a_prefix_only_when_it_is_most_of_the_context(tiny, monkeypatch):
    """MMLU's letters run as unmasked causal rows; a prefix would cost them a full mask, so a short shared prefix
    (a system turn) is not used, a long one (few-shot turns) is. HFLM's numbers either way."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from trlm.eval import backend
    from trlm.eval.backend import TrlmLM

    model, tok = tiny
    letters = [tok.encode(x) for x in (" A", " B", " C", " D")]
    long_questions = [tok.encode("System: be brief.\n" + "Question: what is this? " * 2 + f"Case {q}" + " and more" * (16 + q) + "\nAnswer:")
                      for q in range(4)]
    fewshot = [tok.encode(FEWSHOT[0] * 2 + f"Question: case {q}?\nAnswer:") for q in range(4)]
    seen, runs = [], _count_prefix_runs(monkeypatch, backend)
    original = type(model.model).forward
    monkeypatch.setattr(type(model.model), "forward", lambda self, *a, **k: seen.append(k.get("attention_mask")) or original(self, *a, **k))
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=256)
    tr = TrlmLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=256)
    for contexts, shared in ((long_questions, False), (fewshot, True)):
        reqs = [(("q", str(i)), ctx, x) for i, ctx in enumerate(contexts) for x in letters]
        common = min(len(os.path.commonprefix(contexts)), min(map(len, contexts)) - 1)
        assert common >= 16 and (common >= 0.5 * sum(map(len, contexts)) / len(contexts)) == shared
        with torch.no_grad():
            a = hf._loglikelihood_tokens(reqs, disable_tqdm=True)
            seen.clear()
            runs.clear()
            b = tr._loglikelihood_tokens(reqs, disable_tqdm=True)
        assert (len(runs), all(m is None for m in seen)) == ((1, False) if shared else (0, True)), (runs, shared)
        for x, y in zip(a, b, strict=True):
            assert abs(x[0] - y[0]) <= TOL and x[1] == y[1], (x, y)


def test_generations_after_a_shared_fewshot_prefix_equal_hflm(tiny, monkeypatch):
    """Greedy texts with each subject's few-shot prefix prefilled once: HFLM's, row by row, with stop strings."""
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from trlm.eval import prefix
    from trlm.eval.backend import TrlmLM

    model, tok = tiny
    contexts = [shots + f"Question: case {q}" + " go on" * (q * 3 % 7) + "?\nAnswer:" for shots in FEWSHOT for q in range(5)]
    contexts.append("Alone:")
    requests = lambda kwargs: [Instance("generate_until", {}, (c, dict(kwargs)), i) for i, c in enumerate(contexts)]  # noqa: E731
    kwargs = {"until": [], "max_gen_toks": 12, "do_sample": False}
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=160)
    runs = _count_prefix_runs(monkeypatch, prefix)  # PrefixStore runs them
    with torch.no_grad():
        free = hf.generate_until(requests(kwargs), disable_tqdm=True)
        kwargs["until"] = sorted({t[len(t) // 3:len(t) // 3 + 2] for t in free if len(t) > 6})[:3]
        want = hf.generate_until(requests(kwargs), disable_tqdm=True)
        for gen_batch_size in (3, 16):
            runs.clear()
            tr = TrlmLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=160, gen_batch_size=gen_batch_size)
            assert tr.generate_until(requests(kwargs), disable_tqdm=True) == want, gen_batch_size
            assert len(runs) == 2, runs  # each subject's prefix once, whatever the decode batches
    assert sum(w != f for w, f in zip(want, free)) >= 2  # some rows stopped early


def test_a_prefilled_prefix_leaves_the_cache_of_the_whole_prompt(tiny):
    """The batch cache after prefilling from shared prefixes holds the keys and values (rotary positions
    included) of prefilling each whole prompt: the check that greedy texts of a random model are too coarse for."""
    import torch

    from trlm.eval.backend import TrlmLM
    from trlm.eval.generate import _prefill
    from trlm.eval.prefix import PrefixStore

    model, tok = tiny
    tr = TrlmLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=160)
    rows = [tok.encode(shots + f"Question: case {q}" + " go on" * q + "?") for shots in FEWSHOT for q in range(3)]
    store = PrefixStore(tr, rows, tr._amp())
    prefixes = [store.take(r) for r in range(len(rows))]
    assert all(p >= len(tok.encode(FEWSHOT[0])) - 1 for p, _ in prefixes), [p for p, _ in prefixes]  # the few-shot turns
    whole, shared = _prefill(tr, rows, 4, tr._amp()), _prefill(tr, rows, 4, tr._amp(), prefixes)
    assert whole[3] == shared[3] and torch.equal(whole[1], shared[1]) and torch.equal(whole[2], shared[2])
    for a, b in zip(whole[0].layers, shared[0].layers, strict=True):
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)
