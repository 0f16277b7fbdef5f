"""The reproduction report: missing stages, settings mismatches, baselines, published notes, chart."""

from __future__ import annotations

import copy

import pytest

from trlm.eval.render import write_report
from trlm.eval.report import build_report, headline_metrics


def _task(version, nshot, gen=None, indices="abc123", n_total=100):
    leaf = {
        "task_version": version,
        "num_fewshot": nshot,
        "config_sha256": "c" * 64,
        "subset": {"kind": "seeded", "indices_sha256": indices, "n": 20},
        "n_total": n_total,
        "n_evaluated": 20,
    }
    if gen:
        leaf["generation_kwargs"] = gen
    return leaf


def fake_doc(profile="smoke", boolq=0.62, max_gen_toks=64, fingerprint="a" * 64) -> dict:
    """A minimal evaluate() document with the fields the report reads."""
    gen = {"until": ["Question:"], "do_sample": False, "max_gen_toks": max_gen_toks}
    tasks = {
        "arc_challenge": ("acc", "acc_norm"),
        "arc_easy": ("acc", "acc_norm"),
        "boolq": ("acc",),
        "gsm8k": ("exact_match,strict-match", "exact_match,flexible-extract"),
    }
    values = {"arc_challenge": 0.30, "arc_easy": 0.46, "boolq": boolq, "gsm8k": 0.0}
    results = {t: {m: {"value": values[t], "stderr": 0.02, "n": 20} for m in ms} for t, ms in tasks.items()}
    settings_tasks = {}
    for t in tasks:
        leaf = _task(3.0 if t == "gsm8k" else 1.0, 5 if t == "gsm8k" else 0, gen if t == "gsm8k" else None)
        settings_tasks[t] = {"task_version": leaf["task_version"], "num_fewshot": leaf["num_fewshot"], "leaves": {t: leaf}}
    return {
        "settings": {
            "profile": profile,
            "limit": None,
            "model_fingerprint": fingerprint,
            "versions": {"lm_eval": "0.4.13"},
            "apply_chat_template": True,
            "fewshot_as_multiturn": True,
            "system_instruction": None,
            "seeds": {"fewshot_random_seed": 1234},
            "max_gen_toks": max_gen_toks,
            "chat_template_sha256": "d" * 64,
            "chat_template_rendered_probe": "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
            "model_dtype": "torch.float32",
            "wall_s": 12.0,
            "tasks": settings_tasks,
        },
        "results": results,
        "baselines": {
            "arc_challenge": {"chance": 0.25, "majority": 0.27, "n": 20},
            "arc_easy": {"chance": 0.25, "majority": 0.27, "n": 20},
            "boolq": {"chance": 0.5, "majority": 0.6217, "n": 20},
            "gsm8k": {"chance": None, "majority": None, "n": 20},
        },
        "notes": ["boolq: lm-eval's YAML declares training_split='train' ..."],
    }


def _row(report, task, metric):
    return next(r for r in report["rows"] if r["row"].task == task and r["row"].metric == metric)


def test_missing_stages_render_as_dash_and_files_are_written(tmp_path):
    md, png = write_report({"base": fake_doc(), "sft-general": None, "sft-think": None, "dpo": None}, tmp_path)
    text = md.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    header = next(line for line in text.splitlines() if line.startswith("| Benchmark"))
    assert "base (smoke)" in header and "| sft-general |" in header and "| dpo |" in header
    assert "SmolLM2-135M-Instruct (published)" in header and "TRLM-135M (published)" in header
    arc_row = next(line for line in text.splitlines() if line.startswith("| ARC-Challenge | acc_norm"))
    cells = [c.strip() for c in arc_row.strip("|").split("|")]
    # our columns lead (a UI that cuts wide tables on the right keeps them), then baselines and published
    assert header.index("base (smoke)") < header.index("Chance") < header.index("SmolLM2-135M-Instruct (published)")
    assert cells[2].startswith("30.00 ± 2.00")  # base
    assert cells[3:6] == ["–", "–", "–"]  # three stages not run
    assert cells[-1].startswith("40.61")  # TRLM published, with notes
    # a row that no column has (MMLU) is all dashes, not a crash
    mmlu = next(line for line in text.splitlines() if line.startswith("| MMLU"))
    assert [c.strip() for c in mmlu.strip("|").split("|")][2:6] == ["–"] * 4
    assert "![scores](report.png)" in text


def test_every_metric_named_and_published_setups_explained():
    report = build_report({"base": fake_doc(profile="full")})
    labels = [r["row"].label for r in report["rows"]]
    for needle in ("acc (0-shot", "acc_norm", "strict-match", "flexible-extract", "prompt-level strict", "instruction-level loose", "get-answer"):
        assert any(needle in label for label in labels), needle
    notes = "\n".join(report["notes"])
    for needle in ("lighteval", "mean of ARC-Easy and ARC-Challenge", "cloze", "not chain-of-thought", "acc_norm_nospace", "2033 of 3270", "system prompt"):
        assert needle in notes, needle
    # published TRLM BoolQ (62.17) equals the majority-class rate: flagged
    boolq = _row(report, "boolq", "acc")
    assert "≈majority" in boolq["cells"]["TRLM-135M (published)"]["text"]
    assert boolq["baseline"]["majority"] == pytest.approx(0.6217)


def test_scores_near_a_baseline_are_flagged():
    report = build_report({"base": fake_doc(boolq=0.60), "dpo": fake_doc(boolq=0.90)})
    boolq = _row(report, "boolq", "acc")
    assert "≈majority" in boolq["cells"]["base"]["text"]  # |0.60-0.6217| <= 2*0.02
    assert "≈" not in boolq["cells"]["dpo"]["text"]
    arc = _row(report, "arc_challenge", "acc")
    assert "≈majority" in arc["cells"]["base"]["text"]  # 0.30 vs 0.27, se 0.02


def test_mismatched_settings_are_kept_out_of_the_same_column(tmp_path):
    base = fake_doc()
    odd = fake_doc(max_gen_toks=256, fingerprint="b" * 64)  # generation budget differs (gsm8k only)
    other_subset = copy.deepcopy(fake_doc(fingerprint="c" * 64))
    other_subset["settings"]["tasks"]["boolq"]["leaves"]["boolq"]["subset"]["indices_sha256"] = "zzz"
    report = build_report({"base": base, "sft-general": odd, "sft-think": other_subset, "dpo": copy.deepcopy(base)})
    gsm = _row(report, "gsm8k", "exact_match,strict-match")
    assert gsm["cells"]["sft-general"].get("moved") and gsm["cells"]["sft-general"]["value"] is None
    assert gsm["cells"]["base"]["value"] == 0.0 and gsm["cells"]["dpo"]["value"] == 0.0
    # loglikelihood tasks are unaffected by the generation budget
    assert _row(report, "arc_challenge", "acc")["cells"]["sft-general"]["value"] == pytest.approx(0.30)
    # a different item subset on BoolQ moves that cell only
    assert _row(report, "boolq", "acc")["cells"]["sft-think"].get("moved")
    assert _row(report, "arc_easy", "acc")["cells"]["sft-think"]["value"] == pytest.approx(0.46)
    moved = {(m["row"].task, m["column"]): m for m in report["mismatched"]}
    assert set(moved) == {("gsm8k", "sft-general"), ("boolq", "sft-think")}
    assert "generation_kwargs" in moved[("gsm8k", "sft-general")]["differs_in"]
    assert "subset" in moved[("boolq", "sft-think")]["differs_in"]

    md, _ = write_report({"base": base, "sft-general": odd, "sft-think": other_subset, "dpo": copy.deepcopy(base)}, tmp_path)
    text = md.read_text()
    section = text[text.index("## Results with different settings"):text.index("## Evaluation settings")]
    assert "| GSM8K | exact_match, strict-match (5-shot) | sft-general (smoke) | 0.00 ± 2.00 | base (smoke) | generation_kwargs |" in section
    assert "| BoolQ | acc (0-shot) | sft-think (smoke) | 62.00 ± 2.00" in section


def test_full_vs_smoke_profile_never_share_a_row():
    full = fake_doc(profile="full")
    for t in full["settings"]["tasks"].values():
        for leaf in t["leaves"].values():
            leaf["subset"] = {"kind": "all"}
    for t in full["settings"]["tasks"].values():
        t["n_evaluated"] = 1000
    smoke = fake_doc(profile="smoke")
    for t in smoke["settings"]["tasks"].values():
        t["n_evaluated"] = 20
    report = build_report({"base": smoke, "dpo": full})
    for r in report["rows"]:
        cells = r["cells"]
        shown = [c for c in ("base", "dpo") if cells[c].get("value") is not None]
        assert len(shown) <= 1, r["row"]
    # a tie (one column each) goes to the run that evaluated more items: the full one stays in the table
    arc = _row(report, "arc_challenge", "acc")
    assert arc["cells"]["dpo"]["value"] == pytest.approx(0.30) and arc["cells"]["base"].get("moved")


def test_headline_metrics_are_flat_and_mlflow_safe():
    m = headline_metrics(fake_doc())
    assert m["arc_challenge/acc_norm"] == pytest.approx(0.30)
    assert m["arc_average/acc_norm"] == pytest.approx((0.30 + 0.46) / 2)
    assert m["gsm8k/exact_match/strict-match"] == 0.0
    assert "arc_challenge/acc_norm/stderr" in m
    assert all("," not in k for k in m) and all(isinstance(v, float) for v in m.values())
    assert headline_metrics(None) == {}
