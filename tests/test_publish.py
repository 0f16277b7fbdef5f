"""Links in the Prefect UI point at the MLflow UI actually in use, never at a fixed port."""

from __future__ import annotations

from types import SimpleNamespace

from trlm.flows.publish import Links, embed_images


def _tracker(uri: str, work_dir) -> SimpleNamespace:
    return SimpleNamespace(tracking_uri=uri, work_dir=work_dir, experiment_id="7")


def test_links_follow_the_tracking_server_without_its_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("TRLM_MLFLOW_UI", raising=False)
    links = Links(_tracker("https://alice:tok3n@mlflow.example.org:8443/prefix/", tmp_path))
    # a training run opens in MLflow's training views, not as a GenAI "Evaluation run"
    assert links.run("abc") == "https://mlflow.example.org:8443/prefix/#/experiments/7/runs/abc?workflowType=machine_learning"
    assert links.runs() == "https://mlflow.example.org:8443/prefix/#/experiments/7/runs?workflowType=machine_learning"
    assert links.file("abc", "plots/sft-curves.png") == "https://mlflow.example.org:8443/prefix/get-artifact?path=plots%2Fsft-curves.png&run_uuid=abc"


def test_a_local_store_without_a_running_ui_gets_no_dead_links(tmp_path, monkeypatch):
    monkeypatch.delenv("TRLM_MLFLOW_UI", raising=False)
    links = Links(_tracker(f"sqlite:///{tmp_path}/mlflow.db", tmp_path))
    assert links.base is None and links.run("abc") is None
    report = tmp_path / "report.md"
    report.write_text("# r\n\n![scores](report.png)\n\n![web](https://example.org/x.png)\n")
    text = embed_images(report, links, "abc")
    assert "(report.png: in the MLflow run's artifacts)" in text and "![web](https://example.org/x.png)" in text
    monkeypatch.setenv("TRLM_MLFLOW_UI", "http://127.0.0.1:5123/")
    text = embed_images(report, Links(_tracker(f"sqlite:///{tmp_path}/mlflow.db", tmp_path)), "abc")
    assert "![scores](http://127.0.0.1:5123/get-artifact?path=output%2Freport.png&run_uuid=abc)" in text
    # and a link that shows it in MLflow's artifact view (the file link itself downloads it)
    assert "[report.png in MLflow](http://127.0.0.1:5123/#/experiments/7/runs/abc/artifacts/output/report.png)" in text


def test_short_table_keeps_the_summary_readable():
    """A stage's table in its Prefect summary: a few rows, one line per cell, a prompt's end kept
    (where the question is), pipes escaped, numbers short; no table, no section."""
    from trlm.flows.publish import short_table

    rows = [{"prompt": "x" * 100 + " How many apples?", "completion": "<think>a|b\n6*5_</think> 7" + "y" * 100, "reward": 1.0 / 3}] * 6
    text = short_table({"empty": [], "samples-step-1": rows}, rows=2, width=30)
    lines = text.strip().splitlines()
    assert lines[0] == "**samples-step-1** (first 2 of 6; all in the MLflow run's `tables/`)"
    assert lines[2:4] == ["| prompt | completion | reward |", "|---|---|---|"] and len(lines) == 6
    assert lines[4].startswith("| …" + ("x" * 100 + " How many apples?")[-30:] + " | &lt;think&gt;a\\|b 6\\*5\\_&lt;/think&gt; 7")
    assert lines[4].endswith("… | 0.333 |")
    assert short_table({"empty": []}) == ""
