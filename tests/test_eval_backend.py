"""The trlm eval backend equals lm-eval's HFLM: per request, per generation and per task metric.

One smoke evaluation of every default task (the smoke profile's own seeded items) with each backend on
the tiny model; the per-item samples lm-eval logs are compared request by request. Plus direct
requests for what the smoke items may not reach: greedy continuations (is_greedy True), an empty
context, and requests longer than `max_length` (HFLM truncates them from the left).
"""

from __future__ import annotations

import json
import threading

import pytest

from trlm.eval.config import EvalConfig

TOL = 1e-4


def tolerance(value: float) -> float:
    """1e-4, or two float32 steps at `value` where that is coarser: HFLM sums a continuation's token
    log-probs in float32, so a 120-token continuation of the random tiny model (about -1,265) is only
    resolved to 1.2e-4 by the reference itself."""
    import numpy as np

    return max(TOL, 2 * float(np.spacing(np.float32(abs(value)))))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def both(tiny, shared_data, tmp_path_factory):
    """{backend: (results document, {(task, doc_id): sample})} for one smoke evaluation each."""
    from trlm.eval.harness import evaluate

    model, tok = tiny
    out = {}
    for backend in ("hf", "trlm"):
        work = tmp_path_factory.mktemp(f"eval-{backend}")
        cfg = EvalConfig(profile="smoke", batch_size=4, num_threads=1, backend=backend, gen_batch_size=8)
        doc = evaluate(model, tok, cfg, data_root=shared_data, work_dir=work, model_fingerprint=backend * 8, progress=False)
        rows = [json.loads(line) for line in open(doc["settings"]["samples_file"])]
        out[backend] = doc, {(r["task"], r["doc_id"]): r for r in rows}
    return out


def test_every_smoke_task_ran_on_the_same_items(both):
    (hf_doc, hf), (tr_doc, tr) = both["hf"], both["trlm"]
    assert set(hf) == set(tr) and len(hf) > 50
    assert set(hf_doc["results"]) == set(tr_doc["results"]) == set(EvalConfig().tasks)
    assert (hf_doc["settings"]["backend"], tr_doc["settings"]["backend"]) == ("hf", "trlm")
    for key, row in hf.items():
        assert row["arguments"] == tr[key]["arguments"], key  # the same prompts, tokenized the same way


def test_per_request_loglikelihoods_and_generations_are_equal(both):
    hf, tr = both["hf"][1], both["trlm"][1]
    n_ll = n_gen = 0
    worst, over = 0.0, 0
    for key, row in hf.items():
        for a, b in zip(row["resps"], tr[key]["resps"], strict=True):
            a, b = a[0], b[0]
            if isinstance(a, str):  # generate_until: the text itself
                assert a == b, (key, a, b)
                n_gen += 1
            else:  # loglikelihood: (log-likelihood, is_greedy)
                worst = max(worst, abs(a[0] - b[0]))
                over += abs(a[0] - b[0]) > TOL
                assert abs(a[0] - b[0]) <= tolerance(a[0]), (key, a, b)
                assert a[1] == b[1], (key, a, b)
                n_ll += 1
    assert n_ll > 200 and n_gen >= 10, (n_ll, n_gen)
    print(f"{n_ll} loglikelihood requests (max |diff| {worst:.2e}, {over} over 1e-4 within float32 resolution), {n_gen} generations")


def test_task_metrics_are_equal(both):
    hf_doc, tr_doc = both["hf"][0], both["trlm"][0]
    for part in ("results", "subtask_results", "baselines"):
        assert hf_doc[part] == tr_doc[part], part


def _token_requests(tok, model):
    """(strings, context ids, continuation ids) as HFLM's `_loglikelihood_tokens` takes them: shared
    contexts with 4 continuations each, one of them the model's own greedy tokens; contexts near and
    past `max_length` = 64."""
    import torch

    reqs = []
    for q, words in enumerate((3, 12, 40, 70)):
        ctx = tok.encode(f"Question {q}:" + " what is it?" * (words // 3))
        with torch.no_grad():
            greedy = model.generate(torch.tensor([ctx]), max_new_tokens=3, do_sample=False)[0, len(ctx):].tolist()
        for cont in (tok.encode(" A"), tok.encode(" the answer is four"), greedy, greedy[:1]):
            reqs.append(((str(q), "?"), ctx, cont))
    return reqs


def test_direct_requests_equal_hflm_including_greedy_and_truncated(tiny):
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from trlm.eval.backend import TrlmLM

    model, tok = tiny
    reqs = _token_requests(tok, model)
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=3, max_length=64)
    tr = TrlmLM(pretrained=model, tokenizer=tok, batch_size=3, max_length=64)
    with torch.no_grad():
        a, b = hf._loglikelihood_tokens(reqs, disable_tqdm=True), tr._loglikelihood_tokens(reqs, disable_tqdm=True)
        empty = [Instance("loglikelihood", {}, ("", " an empty context"), 0), Instance("loglikelihood", {}, ("Hi", " there"), 0)]
        a += hf.loglikelihood(empty, disable_tqdm=True)
        b += tr.loglikelihood(empty, disable_tqdm=True)
    assert sum(g for _, g in a) >= 8  # the greedy continuations are recognised as such
    assert any(len(c) + len(x) > 65 for _, c, x in reqs)  # some are truncated from the left
    for x, y in zip(a, b, strict=True):
        assert abs(x[0] - y[0]) <= TOL and x[1] == y[1], (x, y)


def test_tokenizations_are_shared_per_tokenizer(tiny):
    from trlm.eval.backend import TrlmLM, tokenizer_key

    model, tok = tiny
    one, two = TrlmLM(pretrained=model, tokenizer=tok), TrlmLM(pretrained=model, tokenizer=tok)
    assert one._encodings is two._encodings
    assert one.tok_encode("Question: why?") == two.tok_encode("Question: why?") == tok.encode("Question: why?")
    thinking = type(tok).from_pretrained(tok.name_or_path)
    thinking.add_tokens(["<think>", "</think>"], special_tokens=True)
    assert tokenizer_key(thinking, None) != tokenizer_key(tok, None)  # added tokens: their own cache


def _gen_requests(contexts, gen_kwargs):
    from lm_eval.api.instance import Instance

    return [Instance("generate_until", {}, (c, dict(gen_kwargs)), i) for i, c in enumerate(contexts)]


def test_direct_generations_equal_hflm_with_stops_eos_and_truncation(tiny):
    """Prompts of many lengths (some left-truncated at max_length - max_gen_toks), stop strings taken from
    HFLM's own texts so that rows stop early at different steps, and EOS: the same text for every request."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from trlm.eval.backend import TrlmLM

    model, tok = tiny
    contexts = [f"Item {i}:" + " tell me more" * (i * 3 % 17) for i in range(11)]
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=64)
    tr = TrlmLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=64)
    with torch.no_grad():
        free = hf.generate_until(_gen_requests(contexts, {"until": [], "max_gen_toks": 20, "do_sample": False}), disable_tqdm=True)
        stops = sorted({t[len(t) // 2:len(t) // 2 + 2] for t in free if len(t) > 4})[:3]
        assert stops, free
        for kwargs in ({"until": [], "max_gen_toks": 20, "do_sample": False},
                       {"until": stops, "max_gen_toks": 20, "do_sample": False},
                       {"until": stops[:1], "max_gen_toks": 30, "temperature": 0.0}):
            reqs = _gen_requests(contexts, kwargs)
            a, b = hf.generate_until(reqs, disable_tqdm=True), tr.generate_until(reqs, disable_tqdm=True)
            assert a == b, (kwargs, a, b)
    assert sum(len(t) < len(f) for t, f in zip(a, free)) >= 2  # some rows did stop early


def test_generation_falls_back_to_hflm_when_it_cannot_match(tiny, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from trlm.eval.backend import TrlmLM
    from trlm.eval.generate import greedy_settings

    model, tok = tiny
    tr = TrlmLM(pretrained=model, tokenizer=tok, batch_size=2, max_length=64)
    assert greedy_settings(tr, {"until": ["\n"], "max_gen_toks": 8}) is not None
    assert greedy_settings(tr, {"until": ["\n"], "do_sample": True, "temperature": 0.7}) is None
    monkeypatch.setattr(model.generation_config, "repetition_penalty", 1.3)
    assert greedy_settings(tr, {"until": ["\n"], "max_gen_toks": 8}) is None
    calls = []
    monkeypatch.setattr(HFLM, "generate_until", lambda self, reqs, disable_tqdm=False: calls.append(len(reqs)) or ["x"] * len(reqs))
    assert tr.generate_until(_gen_requests(["a", "b", "c"], {"until": ["\n"], "max_gen_toks": 8})) == ["x"] * 3
    assert calls == [3]


def test_one_token_continuations_run_without_a_mask_and_equal_hflm(tiny, monkeypatch):
    """MMLU's requests (one-token answers after a shared context): plain causal rows, no 4D mask, right padding
    that no real token sees; the log-likelihoods and is_greedy flags are HFLM's."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from trlm.eval.backend import TrlmLM

    model, tok = tiny
    letters = [tok.encode(x) for x in (" A", " B", " C", " D")]
    assert all(len(x) == 1 for x in letters)
    reqs = []
    for i in range(7):  # contexts of different lengths, so batches are padded
        ctx = tok.encode(f"Question {i}:" + " and then" * (i * 5 % 13) + "\nAnswer:")
        reqs += [(("q", "x"), ctx, x) for x in letters]
    with torch.no_grad():
        greedy = model(torch.tensor([reqs[0][1]])).logits[0, -1].argmax().item()
    reqs.append((("q", "x"), reqs[0][1], [greedy]))  # one greedy answer
    seen = []
    backbone = model.model
    original = type(backbone).forward
    monkeypatch.setattr(type(backbone), "forward", lambda self, *a, **k: seen.append(k.get("attention_mask")) or original(self, *a, **k))
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=3, max_length=64)
    tr = TrlmLM(pretrained=model, tokenizer=tok, batch_size=3, max_length=64)
    with torch.no_grad():
        a = hf._loglikelihood_tokens(reqs, disable_tqdm=True)
        seen.clear()
        b = tr._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert seen and all(m is None for m in seen)  # the mask-free path ran
    assert any(g for _, g in a)
    for x, y in zip(a, b, strict=True):
        assert abs(x[0] - y[0]) <= TOL and x[1] == y[1], (x, y)


def test_generations_do_not_depend_on_the_decode_batch(tiny):
    """Prompts are prefilled one by one (unpadded) and decoded `gen_batch_size` rows at a time, whatever HFLM's
    batch: HFLM's texts at every decode batch size, rows finishing at different steps."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from trlm.eval.backend import TrlmLM

    model, tok = tiny
    contexts = [f"Case {i}:" + " go on" * (i * 7 % 19) for i in range(9)]
    kwargs = {"until": [], "max_gen_toks": 16, "do_sample": False}
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=64)
    with torch.no_grad():
        free = hf.generate_until(_gen_requests(contexts, kwargs), disable_tqdm=True)
        stops = sorted({t[len(t) // 3:len(t) // 3 + 2] for t in free if len(t) > 6})[:3]
        kwargs["until"] = stops
        want = hf.generate_until(_gen_requests(contexts, kwargs), disable_tqdm=True)
        threads = torch.get_num_threads()
        encoded_in = set()
        real_encode = tok.encode
        tok.encode = lambda *a, **k: encoded_in.add(threading.current_thread().name) or real_encode(*a, **k)
        for gen_batch_size, workers in ((1, 1), (3, 1), (16, 1), (3, 2), (16, 3)):  # workers: batches side by side in threads
            tr = TrlmLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=64, gen_batch_size=gen_batch_size, gen_workers=workers)
            assert tr.generate_until(_gen_requests(contexts, kwargs), disable_tqdm=True) == want, (gen_batch_size, workers)
            assert torch.get_num_threads() == threads
        del tok.encode
    assert not any(name.startswith("generate") for name in encoded_in)  # the tokenizer encodes on the calling thread only
    assert sum(w != f for w, f in zip(want, free)) >= 2  # some rows stopped early


def test_tasks_handed_over_together_decode_side_by_side_with_hflms_texts(tiny, monkeypatch):
    """Requests of two tasks in one call (their own stop strings and token limits, as lm-eval hands over
    GSM8K's, BBH's and IFEval's at once): HFLM's text for each, from one set of decode steps."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from trlm.eval.backend import TrlmLM

    model, tok = tiny
    first, second = [f"Case {i}:" + " go on" * (i * 7 % 19) for i in range(5)], [f"Item {i}:" + " more" * (i * 3 % 11) for i in range(4)]
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=64)
    with torch.no_grad():
        free = hf.generate_until(_gen_requests(second, {"until": [], "max_gen_toks": 20, "do_sample": False}), disable_tqdm=True)
        stops = sorted({t[len(t) // 2:len(t) // 2 + 2] for t in free if len(t) > 6})[:2]
        reqs = _gen_requests(first, {"until": [], "max_gen_toks": 12, "do_sample": False})
        reqs += _gen_requests(second, {"until": stops, "max_gen_toks": 20, "do_sample": False})
        want = hf.generate_until(reqs, disable_tqdm=True)
        tr = TrlmLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=64, gen_batch_size=16)
        steps = []
        backbone = model.model
        original = type(backbone).forward
        monkeypatch.setattr(type(backbone), "forward", lambda self, *a, **k: steps.append(k["input_ids"].shape[1] == 1) or original(self, *a, **k))
        got = tr.generate_until(reqs, disable_tqdm=True)
        together = sum(steps)
        alone = []
        for part in (reqs[:5], reqs[5:]):
            steps.clear()
            tr.generate_until(part, disable_tqdm=True)
            alone.append(sum(steps))
    assert got == want
    assert any(w != f for w, f in zip(want[5:], free))  # some rows of the second task stopped early
    assert together == max(alone) < sum(alone) and min(alone) > 5, (together, alone)  # one set of decode steps, not one per task


def test_buffer_cache_layer_equals_concatenation():
    import torch

    from trlm.eval.generate import _buffer_layer_class

    torch.manual_seed(0)
    k, v = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    buf_k, buf_v = torch.zeros(3, 2, 7, 4), torch.zeros(3, 2, 7, 4)
    buf_k[:, :, :5], buf_v[:, :, :5] = k, v
    layer = _buffer_layer_class()(buf_k, buf_v, 5)
    for step in range(4):  # the fourth step outgrows the buffer
        nk, nv = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
        k, v = torch.cat([k, nk], dim=-2), torch.cat([v, nv], dim=-2)
        got_k, got_v = layer.update(nk, nv)
        assert torch.equal(got_k, k) and torch.equal(got_v, v) and layer.get_seq_length() == 5 + step + 1
    layer.batch_select_indices(torch.tensor([2, 0]))
    assert torch.equal(layer.keys, k[[2, 0]]) and torch.equal(layer.values, v[[2, 0]])
