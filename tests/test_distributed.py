"""Training in several processes (`trlm/training/distributed.py`): DDP and FSDP2 checked against one process.

On the tiny model, CPU, gloo, 2 processes:
* 2 processes x batch b == 1 process x batch 2b, for SFT and DPO, in DDP and in FSDP2: the same
  per-step loss and gradient norm (relative 1e-5), and final weights within 2e-5 absolute. Why not
  bit for bit: the two runs sum the same numbers in another order (fp32), and AdamW's normalised
  step carries that into the weights; measured 1.3e-6 (SFT) and 3.6e-6 (DPO) after 4 steps at lr
  1e-3, a step moving a weight by up to 1e-3.
* every rank killed with SIGKILL mid-stage, then a rerun == the uninterrupted run of the same world
  size, bit for bit (weights and every logged loss).
* DPO with its reference model live (`precompute_ref_logps: false`) the same way, in DDP and FSDP2.
* two torchrun "nodes" (--nnodes 2, one process each, c10d rendezvous) == one node with 2 processes, bit for bit.
* the flow starts a stage under torchrun when its recipe says `num_processes: 2`, and a failed
  rank fails the launch with the stage's own error.
* every shipped accelerate config runs the stages (single_gpu.yaml: the one-process reference;
  multi_gpu.yaml and fsdp.yaml: the 2-process runs), and launches that cannot work stop before
  any compute.

A launch costs about 10 s on the 2-core machine (two Python processes importing torch and
transformers); one launch runs both stages.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from test_training_support import model_state, sft_config, write_dpo_dir, write_sft_dir
from trlm.stages import sft
from trlm.stages.registry import PIPELINE
from trlm.training.distributed import LaunchError, OutputBusy, accelerator_options, check_launch, exclusive_output

TESTS = Path(__file__).resolve().parent
CONFIGS = TESTS.parent / "trlm" / "accelerate_configs"
SHORT = PIPELINE[:2]  # the flow test's pipeline: data-prep, then sft-general
STEPS, SAVE = 4, 2  # every run: 4 optimizer steps, checkpoints after steps 2 and 4
WEIGHT_TOLERANCE = 2e-5

# Runs a list of stage calls in each process of a launch; rank 0 writes each run's logged
# (step, loss, grad_norm) next to its out_dir. `kill_at`: every rank SIGKILLs itself in step N,
# after its forward and backward, before the optimizer step.
WORKER = """
import json, os, signal, sys
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_training_support import dpo_config, sft_config
from trlm.stages import dpo, sft
for run in json.loads(sys.argv[1]):
    module, make, train = (sft, sft_config, sft.train_sft) if run["stage"] == "sft" else (dpo, dpo_config, dpo.train_dpo)
    if run.get("kill_at"):
        def step(*args, _real=module.optimizer_step, _at=run["kill_at"], **kwargs):
            if kwargs["step"] == _at:
                dist.barrier()  # every rank is mid-step
                os.kill(os.getpid(), signal.SIGKILL)
            return _real(*args, **kwargs)
        module.optimizer_step = step
    logs = []
    train(make(**run["train"]), model_dir=run["model"], data_dir=run["data"], out_dir=run["out"],
          on_log=lambda m, s: logs.append([s, m["loss"], m["grad_norm"]]))
    if os.environ.get("RANK", "0") == "0":
        open(run["out"] + ".logs.json", "w").write(json.dumps(logs))
"""


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(kind: str, nproc: int = 2, **extra) -> list[str]:
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / kind), "--main_process_port", str(_port())]


def launch(tmp: Path, runs: list[dict], prefix: list[str]) -> subprocess.CompletedProcess:
    worker = tmp / "worker.py"
    worker.write_text(WORKER.format(tests=str(TESTS)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*prefix, str(worker), json.dumps(runs)], env=env, capture_output=True, text=True, timeout=300)


def stage_runs(root: Path, data: dict, batch: dict, **train) -> list[dict]:
    """One SFT and one DPO call, both from the tiny model, `batch` sequences/pairs per process."""
    common = {"max_steps": STEPS, "save_steps": SAVE, **train}
    return [{"stage": s, "train": {**common, "batch_size": batch[s]}, "model": str(data["model"]), "data": str(data[s]),
             "out": str(root / s)} for s in ("sft", "dpo")]


def live_reference_run(root: Path, data: dict, batch: int, **train) -> dict:
    """DPO without precomputed reference log-probs: the reference model runs beside the policy in every process."""
    return {"stage": "dpo", "train": {"max_steps": STEPS, "save_steps": SAVE, **train, "batch_size": batch, "precompute_ref_logps": False},
            "model": str(data["model"]), "data": str(data["dpo"]), "out": str(root / "dpo-live")}


def results(root: Path) -> dict:
    return {s.replace("-", "_"): (json.loads(Path(f"{root / s}.logs.json").read_text()), model_state(root / s / "model"))
            for s in ("sft", "dpo", "dpo-live") if (root / s).is_dir()}


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer_dir, tiny_model_dir) -> dict:
    root = tmp_path_factory.mktemp("dist-data")
    return {"model": tiny_model_dir, "sft": write_sft_dir(root / "sft", tokenizer_dir, n=16, vary=True),
            "dpo": write_dpo_dir(root / "dpo", tokenizer_dir, n=8)}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data) -> dict:
    """1 process x batch 2b, launched with the shipped single_gpu.yaml (on a CPU: this CPU)."""
    root = tmp_path_factory.mktemp("one")
    proc = launch(root, [*stage_runs(root, data, {"sft": 4, "dpo": 4}), live_reference_run(root, data, 4)], launcher("single_gpu.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((root / "sft" / "fingerprint.json").read_text())["meta"]["num_processes"] == 1
    return results(root)


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def two_processes(request, tmp_path_factory, data) -> SimpleNamespace:
    """2 processes x batch b, launched with the shipped accelerate config of the mode."""
    mode = request.param
    root = tmp_path_factory.mktemp(f"two-{mode}")
    config = {"ddp": "multi_gpu.yaml", "fsdp": "fsdp.yaml"}[mode]
    runs = [*stage_runs(root, data, {"sft": 2, "dpo": 2}, distributed=mode), live_reference_run(root, data, 2, distributed=mode)]
    proc = launch(root, runs, launcher(config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SimpleNamespace(mode=mode, root=root, **results(root))


def assert_same(a: dict, b: dict, exact: bool) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            assert (a[key] - b[key]).abs().max().item() <= WEIGHT_TOLERANCE, key


def test_two_processes_match_one(two_processes, one_process):
    assert set(one_process) == {"sft", "dpo", "dpo_live"}
    for stage in ("sft", "dpo", "dpo_live"):
        (logs2, weights2), (logs1, weights1) = getattr(two_processes, stage), one_process[stage]
        assert [s for s, *_ in logs2] == [s for s, *_ in logs1] == list(range(1, STEPS + 1)), stage
        for (_, loss2, norm2), (_, loss1, norm1) in zip(logs2, logs1):
            assert loss2 == pytest.approx(loss1, rel=1e-5) and norm2 == pytest.approx(norm1, rel=1e-5), stage
        assert_same(weights2, weights1, exact=False)
    fingerprint = json.loads((two_processes.root / "sft" / "fingerprint.json").read_text())
    assert fingerprint["meta"]["num_processes"] == 2 and fingerprint["meta"]["distributed"] == two_processes.mode
    assert not (two_processes.root / "sft" / "checkpoints").exists()


def test_kill_every_rank_and_resume(two_processes, data, tmp_path):
    """SIGKILL of every rank in step 3 (after the checkpoint of step 2), then a rerun: it resumes
    from step 2 and ends bit for bit where the uninterrupted run of the same world size ended."""
    runs = stage_runs(tmp_path, data, {"sft": 2, "dpo": 2}, distributed=two_processes.mode)
    sft_run, dpo_run = runs
    for job in ([{**sft_run, "kill_at": 3}], [sft_run, {**dpo_run, "kill_at": 3}], [dpo_run]):
        proc = launch(tmp_path, job, launcher("torchrun"))
        killed = any(run.get("kill_at") for run in job)
        assert (proc.returncode != 0) == killed, proc.stderr[-3000:]
        if killed:
            out = Path(job[-1]["out"])
            assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-000002"]
            assert not (out / "model").exists()
            if two_processes.mode == "fsdp":  # each rank wrote its own shard, rank 0 the metadata
                assert {p.name for p in (out / "checkpoints" / "step-000002" / "sharded").iterdir()} == {"__0_0.distcp", "__1_0.distcp", ".metadata"}
    for stage in ("sft", "dpo"):
        history = json.loads((tmp_path / stage / "metrics.json").read_text())["history"]
        uninterrupted = json.loads((two_processes.root / stage / "metrics.json").read_text())["history"]
        assert [(h["step"], h["loss"], h["grad_norm"]) for h in history] == [(h["step"], h["loss"], h["grad_norm"]) for h in uninterrupted]
        assert [s for s, *_ in json.loads(Path(f"{tmp_path / stage}.logs.json").read_text())] == [3, 4], "resumed after step 2"
        assert_same(model_state(tmp_path / stage / "model"), getattr(two_processes, stage)[1], exact=True)


@pytest.mark.parametrize("two_processes", ["fsdp"], indirect=True)
def test_two_nodes_match_one_node(two_processes, data, tmp_path):
    """`torchrun --nnodes 2 --node-rank 0|1 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT`,
    twice: the multi-node launch the README documents (the c10d rendezvous, not the static one)."""
    sft_run = stage_runs(tmp_path, data, {"sft": 2, "dpo": 2}, distributed="fsdp")[0]
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(tests=str(TESTS)))
    port = _port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-id", "two-nodes", "--rdzv-endpoint", f"127.0.0.1:{port}", str(worker), json.dumps([sft_run])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert json.loads(Path(f"{tmp_path / 'sft'}.logs.json").read_text()) == two_processes.sft[0]
    assert_same(model_state(tmp_path / "sft" / "model"), two_processes.sft[1], exact=True)


def test_flow_runs_a_stage_in_two_processes(prefect_env, tiny_model_dir, shared_data, tmp_path):
    """`trlm run --set sft_general.train.num_processes=2`: the flow starts sft-general under
    torchrun, its per-step metrics reach MLflow, and 2 processes trained (the fingerprint's meta)."""
    from test_pipeline import write_tiny_recipe

    from trlm.flows.pipeline import pipeline
    from trlm.stages.registry import load_recipe
    from trlm.runs.tracking import setup_tracking

    recipe = write_tiny_recipe(tmp_path, tiny_model_dir, shared_data)
    content = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump({k: v for k, v in content.items() if k not in ("sft_think", "dpo", "grpo", "eval")}))
    overrides = ["sft_general.train.num_processes=2"]
    outcome = pipeline(recipe=str(recipe), overrides=overrides, stages="test_distributed:SHORT")
    out = Path(outcome["sft-general"]["path"])
    assert json.loads((out / "fingerprint.json").read_text())["meta"]["num_processes"] == 2
    tracker = setup_tracking(load_recipe(str(recipe), overrides, pipeline=SHORT))
    history = tracker.client.get_metric_history(outcome["sft-general"]["run_id"], "loss")
    assert [m.step for m in history] == [1, 2]


def test_a_failed_rank_fails_the_launch_with_the_stage_error(data, tmp_path):
    """The flow's launch (accelerate, 2 processes): rank 0 finds its out_dir held by another writer
    and stops; the launch fails with that error, not only an exit code."""
    from trlm.flows.launch import launch_command, launch_env, run_stage_process
    from trlm.stage import StageContext

    cfg = sft_config(max_steps=1, batch_size=2, launcher="accelerate", num_processes=2)
    ctx = StageContext(None, cfg, tmp_path / "out", {"model": data["model"], "data": data["sft"]}, {}, lambda m, s: None)
    cmd = launch_command(sft.SFT_GENERAL, ctx, tmp_path / "config.json")
    assert cmd[2] == "accelerate.commands.launch" and cmd[cmd.index("--num_processes") + 1] == "2"
    with exclusive_output(ctx.out), pytest.raises(RuntimeError) as info:
        run_stage_process(cmd, ctx.out, ctx.on_log, lambda line: None, env=launch_env(2))
    assert str(info.value).startswith("trlm.training.distributed.OutputBusy: ")
    assert "is being written by another process" in str(info.value).splitlines()[0]
    assert not (ctx.out / "checkpoints").exists()


# --- launches that cannot work: refused before any compute (in this process) --------------------


def test_fsdp_or_a_wrong_process_count_in_one_process_is_refused(data, tmp_path, monkeypatch):
    from trlm.training import loop

    monkeypatch.setattr(loop, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    cases = {"fsdp, which shards the model over processes, but only 1 process": {"distributed": "fsdp"},
             "train.num_processes is 2 but 1 process(es) were launched": {"num_processes": 2}}
    for message, train in cases.items():
        with pytest.raises(LaunchError, match=message.replace("(", r"\(").replace(")", r"\)")):
            sft.train_sft(sft_config(**train), model_dir=data["model"], data_dir=data["sft"], out_dir=tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_launch_checks(monkeypatch):
    train = sft_config(batch_size=4).train
    alone = SimpleNamespace(num_processes=1)
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun started 2, but this process joined no group
    with pytest.raises(LaunchError, match="launcher started 2 processes .* each would train alone and write the same output directory"):
        check_launch(train, alone, 16)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(LaunchError, match="6 rows do not fill one global micro-batch of batch_size 4 x 4 processes"):
        check_launch(train, SimpleNamespace(num_processes=4), 6)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch --config_file fsdp.yaml
    with pytest.raises(LaunchError, match="accelerate's FSDP config .* train.distributed is 'ddp'"):
        accelerator_options("ddp")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(LaunchError, match="CPU offload"):
        accelerator_options("fsdp")
    monkeypatch.delenv("FSDP_OFFLOAD_PARAMS")
    assert accelerator_options("fsdp") == {"cpu": not torch.cuda.is_available()}
    assert os.environ["ACCELERATE_USE_FSDP"] == "false", "the stage shards the model itself"


def test_recipe_refuses_fsdp_with_one_process():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="fsdp.*needs num_processes >= 2"):
        sft_config(distributed="fsdp", num_processes=1)


def test_a_second_writer_of_one_output_directory_is_refused(data, tmp_path):
    with exclusive_output(tmp_path / "out"), pytest.raises(OutputBusy, match="being written by another process"):
        sft.train_sft(sft_config(), model_dir=data["model"], data_dir=data["sft"], out_dir=tmp_path / "out")
    summary = sft.train_sft(sft_config(max_steps=1), model_dir=data["model"], data_dir=data["sft"], out_dir=tmp_path / "out")
    assert summary["steps"] == 1, "released with its holder"


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP], ids=["ENOLCK", "EOPNOTSUPP"])
def test_an_output_directory_without_flock_is_never_passed_silently(tmp_path, monkeypatch, caplog, code):
    import fcntl

    def no_flock(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with caplog.at_level(logging.WARNING, logger="trlm.training.distributed"), exclusive_output(tmp_path / "out"):
        pass
    [record] = caplog.records
    assert record.getMessage().startswith(f"cannot lock {tmp_path / 'out'} (flock: {os.strerror(code)}): this file system does not support flock")
    assert "nothing stops a second run" in record.getMessage()
