"""The report's rendering: markdown (`report.md`) and the chart (`report.png`) from `build_report`'s data.

    md, png = write_report({"base": doc0, "sft-general": doc1, "sft-think": None, "dpo": doc3}, out_dir)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trlm.eval.published import FULL_SPLITS, PUBLISHED_COLUMNS
from trlm.eval.report import DASH, build_report, column_label, pct, short


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any], png_name: str | None = None) -> str:
    cols = report["columns"]
    labels = [column_label(n, d) for n, d in cols.items()]
    # Our columns lead (a UI that cuts the table on the right keeps them); baselines and the published
    # figures follow for comparison.
    header = ["Benchmark", "Metric", *labels, "Chance", "Majority", *PUBLISHED_COLUMNS]
    body = []
    for r in report["rows"]:
        row, cells, base = r["row"], r["cells"], r["baseline"] or {}
        body.append(
            [row.benchmark, row.label]
            + [cells[n]["text"] for n in cols]
            + [pct(base.get("chance"), 1), pct(base.get("majority"), 1)]
            + [cells[p]["text"] for p in PUBLISHED_COLUMNS]
        )
    out = ["# TRLM-135M reproduction: evaluation report", ""]
    out.append(
        "Scores in % (± one standard error, closed form). **≈chance** / **≈majority**: the score is within 2 standard "
        "errors of the chance / majority-class baseline (for published figures: the binomial standard error at the full "
        "split size). Chance and majority are computed on the items our reference column evaluated; the majority-class "
        "answer is the most frequent gold answer of the whole split. Bracketed numbers refer to the notes. "
        f"{DASH} = not evaluated / not published."
    )
    out.append("")
    if any(d and (d.get('settings') or {}).get('profile') == 'smoke' for d in cols.values()):
        out.append(
            "**Smoke columns** evaluate a small seeded subset of items (and of MMLU/BBH subtasks) with a short generation "
            "budget: they check the pipeline, their scores are not estimates of the full benchmarks."
        )
        out.append("")
    out.append(_md_table(header, body))
    out.append("")
    if png_name:
        out += [f"![scores]({png_name})", ""]

    if report["mismatched"]:
        out.append("## Results with different settings")
        out.append("")
        out.append(
            "These cells were evaluated with settings that differ from the reference column of their row, so they are "
            "kept out of the main table."
        )
        out.append("")
        rows = [
            [m["row"].benchmark, m["row"].label, column_label(m["column"], cols[m["column"]]), m["cell"]["text"], column_label(m["reference_column"], cols[m["reference_column"]]), m["differs_in"]]
            for m in report["mismatched"]
        ]
        out.append(_md_table(["Benchmark", "Metric", "Column", "Score", "Reference column", "Settings that differ"], rows))
        out.append("")

    out.append("## Evaluation settings per column")
    out.append("")
    srows = []
    for name, doc in cols.items():
        if not doc:
            srows.append([name, "not run"] + [DASH] * 7)
            continue
        s = doc.get("settings") or {}
        srows.append([
            column_label(name, doc),
            s.get("profile", DASH),
            short(s.get("model_fingerprint")),
            f"lm-eval {(s.get('versions') or {}).get('lm_eval')}",
            f"chat template {'on' if s.get('apply_chat_template') else 'off'} ({short(s.get('chat_template_sha256'), 10)}), multi-turn few-shot {'on' if s.get('fewshot_as_multiturn') else 'off'}",
            f"max_gen_toks {s.get('max_gen_toks') or 'task default'}",
            f"seed {(s.get('seeds') or {}).get('fewshot_random_seed')}",
            s.get("model_dtype", DASH),
            f"{s.get('wall_s', DASH)} s",
        ])
    out.append(_md_table(["Column", "Profile", "Model fingerprint", "Harness", "Chat", "Generation", "Seed", "dtype", "Eval time"], srows))
    out.append("")
    probes = {}
    for name, doc in cols.items():
        p = ((doc or {}).get("settings") or {}).get("chat_template_rendered_probe")
        if p:
            probes.setdefault(p, []).append(name)
    if probes:
        out.append("What each chat template wraps around a prompt (`{prompt}`), including any system prompt:")
        out.append("")
        for p, names in probes.items():
            out.append(f"- {', '.join(names)}:")
            out.append("")
            out.append("  ```")
            out += ["  " + line for line in p.splitlines()]
            out.append("  ```")
        out.append("")

    out.append("## Notes")
    out.append("")
    for i, n in enumerate(report["notes"], 1):
        out.append(f"{i}. {n}")
    out.append(
        f"{len(report['notes']) + 1}. Standard errors of derived rows: ARC average = sqrt(se_E² + se_C²)/2 (independent test sets); "
        "IFEval mean of four = root of the mean of the four variances (the four metrics share items, so this is approximate)."
    )
    out.append("")
    run_notes: dict[str, list[str]] = {}
    for name, doc in cols.items():
        for n in (doc or {}).get("notes") or []:
            run_notes.setdefault(n, []).append(name)
    if run_notes:
        out.append("### Notes recorded by the evaluation runs")
        out.append("")
        for n, names in run_notes.items():
            out.append(f"- ({', '.join(names)}) {n}")
        out.append("")
    return "\n".join(out)


# Rows drawn in the chart (each panel is one exact metric; published figures appear on the row they were placed on).
CHART_ROWS = (
    ("arc_challenge", "acc_norm"),
    ("arc_easy", "acc_norm"),
    ("arc_average", "acc_norm"),
    ("bbh", "exact_match,get-answer"),
    ("boolq", "acc"),
    ("gsm8k", "exact_match,strict-match"),
    ("ifeval_mean4", "mean4"),
    ("mmlu", "acc"),
    ("piqa", "acc"),
    ("piqa", "acc_norm"),
)


# Metric names as the compact table shows them (the full report names each exactly).
SHORT_METRICS = {"prompt_level_strict_acc": "prompt strict", "inst_level_strict_acc": "inst. strict", "prompt_level_loose_acc": "prompt loose",
                 "inst_level_loose_acc": "inst. loose", "strict-match": "strict", "flexible-extract": "flexible", "get-answer": "exact"}


def render_compact(report: dict[str, Any], png_name: str | None = None) -> str:
    """The report for a UI pane about 700 px wide (Prefect's artifact view at a 1,280 px window):
    scores only, our columns first, short labels, the two published figures in one column;
    standard errors, baselines, settings and notes stay in `report.md`. A `≈` marks a score within
    2 standard errors of the chance or majority-class baseline."""
    cols = report["columns"]
    header = ["Benchmark", *cols, "published"]
    body = []
    for r in report["rows"]:
        row, cells = r["row"], r["cells"]
        if all(cells[n].get("value") is None for n in cols):
            continue  # not evaluated by any of our columns: the full report lists it
        ours = [pct(cells[n]["value"], 1) + (" ≈" if cells[n].get("flag") else "") if cells[n].get("value") is not None else DASH for n in cols]
        published = " / ".join(pct(cells[p]["value"], 1) if cells[p].get("value") is not None else DASH for p in PUBLISHED_COLUMNS)
        metric = row.metric.split(",")[-1]
        body.append([f"{row.benchmark} {SHORT_METRICS.get(metric, metric)}", *ours, published])
    smoke = any(d and (d.get("settings") or {}).get("profile") == "smoke" for d in cols.values())
    out = ["### Evaluation" + (" (smoke subsets: a pipeline check, not benchmark estimates)" if smoke else ""), "",
           _md_table(header, body), "", "Scores in %. ≈: within 2 standard errors of chance or of the majority class. Published: "
           + " / ".join(p.split(" ")[0] for p in PUBLISHED_COLUMNS) + ". "
           "Standard errors, baselines, settings and notes: `report.md`.", ""]
    if png_name:
        out += [f"![scores]({png_name})", ""]
    return "\n".join(out)


def render_chart(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = report["columns"]
    series = list(PUBLISHED_COLUMNS) + list(cols)
    series_labels = ["SmolLM2 (published)", "TRLM (published)"] + [column_label(n, d) for n, d in cols.items()]
    colors = ["#bbbbbb", "#888888", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    rows = {(r["row"].task, r["row"].metric): r for r in report["rows"]}
    fig, axes = plt.subplots(2, 5, figsize=(19, 8))
    for ax, key in zip(axes.flat, CHART_ROWS):
        r = rows[key]
        ax.set_title(f"{r['row'].benchmark}\n{r['row'].label}", fontsize=8, wrap=True)
        for i, name in enumerate(series):
            cell = r["cells"].get(name) or {}
            v = cell.get("value")
            if v is None:
                mark = "≠" if cell.get("moved") else DASH
                ax.text(i, 1.0, mark, ha="center", va="bottom", fontsize=9, color="#777777")
                continue
            se = cell.get("stderr")
            hatch = "//" if name in PUBLISHED_COLUMNS else None
            ax.bar(i, 100 * v, color=colors[i % len(colors)], hatch=hatch, edgecolor="white" if hatch else None,
                   yerr=None if se is None else 100 * se, capsize=3)
            top = 100 * (v + (se or 0))
            ax.text(i, min(top + 1.5, 93), f"{100 * v:.1f}", ha="center", va="bottom", fontsize=6.5)
        base = r["baseline"] or FULL_SPLITS.get(key[0]) or {}
        if base.get("chance") is not None:
            ax.axhline(100 * base["chance"], color="black", linestyle="--", linewidth=1, label="chance")
        if base.get("majority") is not None:
            ax.axhline(100 * base["majority"], color="red", linestyle=":", linewidth=1.2, label="majority class (items evaluated)")
        ax.set_xticks(range(len(series)))
        ax.set_xticklabels(series_labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 100)
        ax.set_ylabel("%", fontsize=8)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.suptitle("TRLM-135M reproduction. Hatched: published figures (different setups, see the report's notes); "
                 "≠: evaluated with different settings (see report)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(columns: dict[str, dict | None], out_dir: Path) -> tuple[Path, Path]:
    """Write `report.md`, its compact form `report-ui.md` (for the UIs) and `report.png` into
    `out_dir`; return the report's and the chart's paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(columns)
    png = render_chart(report, out_dir / "report.png")
    md = out_dir / "report.md"
    md.write_text(render_markdown(report, png.name), encoding="utf-8")
    (out_dir / "report-ui.md").write_text(render_compact(report, png.name), encoding="utf-8")
    return md, png
