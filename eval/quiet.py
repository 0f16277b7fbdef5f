"""lm-eval without its side effects: progress bars and INFO chatter (unless asked for), and the
`git describe` it runs in the working directory."""

from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def quiet(progress: bool):
    """Without progress: no progress bars (lm-eval's, datasets') and no lm-eval INFO chatter.

    tqdm reads TQDM_DISABLE only when it is imported, so lm-eval's module-level `tqdm` names are
    swapped for a silent subclass for the duration of the block.
    """
    if progress:
        yield
        return
    import importlib

    import tqdm as tqdm_mod

    class _Silent(tqdm_mod.tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    patched = []
    for name in ("lm_eval.models.huggingface", "lm_eval.api.model", "lm_eval.api.task", "lm_eval.evaluator"):
        with contextlib.suppress(ImportError):
            mod = importlib.import_module(name)
            if getattr(mod, "tqdm", None) is tqdm_mod.tqdm:
                patched.append(mod)
                mod.tqdm = _Silent
    lm_logger = logging.getLogger("lm_eval")
    level = lm_logger.level
    lm_logger.setLevel(logging.WARNING)
    ds_bars = None
    with contextlib.suppress(ImportError):
        import datasets.utils.logging as ds_logging

        ds_bars = ds_logging.is_progress_bar_enabled()
        ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        lm_logger.setLevel(level)
        for mod in patched:
            mod.tqdm = tqdm_mod.tqdm
        if ds_bars:
            ds_logging.enable_progress_bar()


@contextlib.contextmanager
def no_git_probe():
    """lm-eval runs `git describe` in the working directory to record *its* commit; skip that.

    The working directory is the dataset mirror (not a repository), and lm-eval's version is recorded
    from the installed distribution instead.
    """
    import lm_eval.evaluator as ev

    saved = getattr(ev, "get_git_commit_hash", None)
    if saved is None:
        yield
        return
    ev.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        ev.get_git_commit_hash = saved


_ENV_INFO: list[str] = []


@contextlib.contextmanager
def env_info_once():
    """lm-eval attaches torch's environment report to every result (`add_env_info`); build it once per
    process. The report runs `pip list` and a dozen other probes: 0.8 s per task, 6 s per model here,
    and nothing in it changes while the process runs."""
    import torch.utils.collect_env as collect_env

    saved = collect_env.get_pretty_env_info

    def once() -> str:
        if not _ENV_INFO:
            _ENV_INFO.append(saved())
        return _ENV_INFO[0]

    collect_env.get_pretty_env_info = once
    try:
        yield
    finally:
        collect_env.get_pretty_env_info = saved
