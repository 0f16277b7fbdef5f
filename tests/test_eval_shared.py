"""Work done once per eval stage: tasks loaded and their requests built once for several models in one
process (per tokenizer), with the same results as a cold run."""

from __future__ import annotations

import json

from trlm.eval.config import EvalConfig


def _arguments(doc) -> dict:
    rows = [json.loads(line) for line in open(doc["settings"]["samples_file"])]
    return {(r["task"], r["doc_id"]): (r["arguments"], r["resps"]) for r in rows}


def test_tasks_and_requests_are_built_once_per_tokenizer(tiny_model_dir, shared_data, tmp_path, monkeypatch):
    from lm_eval.api.task import Task
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trlm.eval import shared
    from trlm.eval.harness import evaluate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    thinking = AutoTokenizer.from_pretrained(tiny_model_dir)
    thinking.add_tokens(["<think>", "</think>"], special_tokens=True)  # the think stages' tokenizer change

    shared.clear()
    loads, builds = [], []
    real_load, real_build = shared.load_task, Task.build_all_requests
    monkeypatch.setattr(shared, "load_task", lambda tm, name, **kw: loads.append(name) or real_load(tm, name, **kw))
    monkeypatch.setattr(Task, "build_all_requests", lambda self, **kw: builds.append(self.task_name) or real_build(self, **kw))
    cfg = EvalConfig(profile="smoke", tasks=["arc_easy", "gsm8k"], batch_size=4, num_threads=1, max_gen_toks=16)

    def run(tokenizer, name):
        return evaluate(model, tokenizer, cfg, data_root=shared_data, work_dir=tmp_path / name, model_fingerprint=name, progress=False)

    import torch.utils.collect_env as collect_env

    from trlm.eval import quiet

    getattr(quiet, "_ENV_INFO", []).clear()
    env_reports, targets = [], []
    from lm_eval.api.task import ConfigurableTask

    real_env, real_target = collect_env.get_pretty_env_info, ConfigurableTask.doc_to_target
    monkeypatch.setattr(collect_env, "get_pretty_env_info", lambda: env_reports.append(1) or real_env())
    monkeypatch.setattr(ConfigurableTask, "doc_to_target", lambda self, doc, *a, **kw: targets.append(1) or real_target(self, doc, *a, **kw))

    first = run(tok, "model-a")
    arc_docs = len(shared.shared_task(None, "arc_easy", data_root=shared_data, profile="smoke", limit=None, sample=None, seed=cfg.seed)[0].eval_docs)
    assert len(targets) >= arc_docs  # the majority-class baseline renders every target of the split
    targets.clear()
    second = run(tok, "model-b")  # two models of one stage, same tokenizer
    assert loads == ["arc_easy", "gsm8k"] and builds == ["arc_easy", "gsm8k"]
    assert len(targets) < arc_docs, "the split's majority class is computed once per process, not per model"
    think = run(thinking, "model-think")
    assert loads == ["arc_easy", "gsm8k"] and builds == ["arc_easy", "gsm8k"] * 2  # new tokenizer: built again
    shared.clear()
    cold = run(tok, "model-cold")
    assert loads == ["arc_easy", "gsm8k"] * 2
    for doc in (second, think, cold):
        assert doc["results"] == first["results"] and doc["baselines"] == first["baselines"]
    assert _arguments(second) == _arguments(first) == _arguments(cold)  # the same prompts and responses
    assert len(env_reports) == 1, "torch's environment report (lm-eval's add_env_info) is built once per process"
