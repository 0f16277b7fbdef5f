"""Work done once per process (one eval stage evaluates several models in one process), not once per model.

* **Task objects.** `load_task` (lm-eval's TaskManager: dataset loading, group pruning, the seeded item
  choice) runs once per (task, data root, profile, limit, sample, seed); later models reuse the object.
  `simple_evaluate` sets the same generation kwargs and re-seeds the few-shot sampler on every call, so a
  reused task draws the same few-shot examples.
* **Built requests.** A leaf task's `build_all_requests` (few-shot contexts, chat template, one Instance
  per request) is memoised per (tokenizer, chat template, arguments): a model whose `<think>` tokens
  change its tokenizer, or whose chat template differs, gets its own. Every call hands out fresh
  Instances (empty `resps`), as lm-eval's own build does.
* The token encodings of the shared contexts are cached per tokenizer in `trlm.eval.backend` (TrlmLM).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json

from trlm.eval.tasks import leaf_tasks, load_task

_TASKS: dict[tuple, tuple] = {}  # load_task arguments -> (task object, plan, samples)
_BUILT = "_trlm_built_requests"  # attribute of a leaf task: {(lm key, arguments): [Instance, ...]}


def clear() -> None:
    """Forget the cached tasks (and with them their built requests)."""
    _TASKS.clear()


def shared_task(tm, name: str, **kwargs):
    """`load_task(tm, name, **kwargs)`, once per process for the same arguments."""
    key = (name, *sorted((k, str(v)) for k, v in kwargs.items()))
    if key not in _TASKS:
        _TASKS[key] = load_task(tm, name, **kwargs)
    return _TASKS[key]


def lm_key(lm) -> str:
    """What built requests depend on besides the task: the tokenizer (vocabulary, special tokens, BOS
    setting) and the chat template lm-eval renders with."""
    from trlm.eval.backend import tokenizer_key

    template = None
    with contextlib.suppress(Exception):  # a tokenizer without a template has none to key by
        template = lm.chat_template(True)
    extra = json.dumps(getattr(lm, "chat_template_args", None) or {}, sort_keys=True, default=str)
    parts = (tokenizer_key(lm.tokenizer, getattr(lm, "add_bos_token", None)), template or "", extra)
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def _fresh(instances) -> list:
    return [dataclasses.replace(i, resps=[], filtered_resps={}) for i in instances]


def share_requests(task_obj, lm) -> None:
    """Memoise each leaf task's `build_all_requests` for `lm`'s tokenizer and chat template."""
    key = lm_key(lm)
    for leaf in leaf_tasks(task_obj):
        leaf._trlm_lm_key = key
        if _BUILT in vars(leaf):
            continue
        setattr(leaf, _BUILT, {})
        original = leaf.build_all_requests

        def build(*, _leaf=leaf, _original=original, **kwargs) -> None:
            args = json.dumps({k: v for k, v in kwargs.items() if k != "chat_template"}, sort_keys=True, default=str)
            memo = getattr(_leaf, _BUILT)
            found = memo.get((_leaf._trlm_lm_key, args))
            if found is None:
                _original(**kwargs)
                memo[(_leaf._trlm_lm_key, args)] = _fresh(_leaf._instances)  # copies: this run fills the originals
            else:
                _leaf._instances = _fresh(found)

        leaf.build_all_requests = build
