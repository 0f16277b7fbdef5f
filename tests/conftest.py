"""Shared fixtures: the real SmolLM2 tokenizer (read from the offline GGUF) and a tiny random Llama.

The tiny model has the real vocabulary (49,152) so that chat templates, special tokens and label
masks are exercised exactly as with the 135M model, but only a few layers of width 64: a training
step takes milliseconds on a 2-core CPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest

# Offline and quiet, before any library reads its settings.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Under pytest-xdist (the README's command: 3 workers on 2 cores, so that a worker whose test waits on
# its servers leaves no core idle) one intra-op thread per worker and per process it starts: several
# threads per worker oversubscribe the cores, and OpenMP's spinning threads then slow every worker.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TRLM_DATA_ROOT", REPO_ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"the offline data is missing: {SHARED_DATA} (set TRLM_DATA_ROOT)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct tokenizer, extracted once per session from the shipped GGUF."""
    from transformers import AutoTokenizer

    from trlm.base_model import packaged_gguf_path

    gguf = packaged_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def make_tiny_llama(vocab_size: int = 49152, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A randomly initialised 2-layer Llama on the real tokenizer, saved as an HF checkpoint."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama().save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL cluster for the session; each server started on it gets its own database."""
    from servers import Postgres

    pg = Postgres.start()
    yield pg
    pg.stop()


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    import prefect.testing.utilities as harness

    from trlm.prefect_db import seed_prefect_database

    home = tmp_path_factory.mktemp("prefect-home")
    database = tmp_path_factory.mktemp("prefect-db")
    seed_prefect_database(database / "prefect-test.db")  # the harness's database, migrated once per suite
    old = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_RESULTS_LOCAL_STORAGE_PATH")}
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(home / "storage")
    with mock.patch.object(harness, "mkdtemp", lambda: str(database)), harness.prefect_test_harness(server_startup_timeout=120):
        yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _work_dir_server_settings_do_not_leak():
    """`trlm` commands invoked in-process point this process at their work dir's servers through
    the environment (as they must, before Prefect is imported): undo that after each test."""
    keys = ("PREFECT_API_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL", "MLFLOW_TRACKING_URI", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# The README's command runs the files on pytest-xdist workers (`--dist loadscope`: a module, or a
# test class, stays on one worker with its fixtures; `--no-loadscope-reorder`: in this order). The
# longest go first, so that no long one starts last while the other workers have nothing left to do.
# The order was measured on the 2-core machine with two xdist workers (2026-12-03; the command now runs
# three): each test_two_workers class about 4.5 min, test_prefect_worker about 8, then the other
# service, distributed and real-model tests.
LONGEST_FIRST = ("test_two_workers", "test_prefect_worker", "test_cli_monitoring", "test_shared_servers", "test_distributed",
                 "test_pipeline", "test_grpo_learning", "test_eval_backend", "test_distributed_accum", "test_postgres_store",
                 "test_grpo_distributed", "test_eval_harness")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: file order otherwise
