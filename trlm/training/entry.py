"""The command line of the training stages: `python -m trlm.stages.sft` / `python -m trlm.stages.dpo`.

    --config FILE (JSON or YAML, one stage config) | --recipe NAME_OR_PATH [--stage S] [--set K=V ...]
    --<input>-dir DIR for each input the stage declares (`Stage.launch_inputs`: model, data) --out-dir DIR

The input arguments come from the stage's declaration, the same names the flow passes under
torchrun (`flows/launch.py`); each becomes the keyword `<input>_dir` of the stage's train function.

Every input problem (missing file or directory, invalid or duplicated key, wrong stage) exits with
code 2 and one message before any compute. One JSON line per logged step, then the summary.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Callable


# What a known input's directory must hold (an unknown input only has to be a directory).
INPUT_CHECKS = {"model": ("config.json", "want a Hugging Face checkpoint directory"),
                "data": ("train.parquet", "want a directory written by data-prep")}


def stage_argument_parser(description: str, default_stage: str, inputs: tuple[str, ...] = ("model", "data")) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="JSON or YAML file holding the stage config")
    source.add_argument("--recipe", help="recipe name or path; the stage config is taken from it")
    parser.add_argument("--stage", default=default_stage, help=f"stage of the recipe (default {default_stage})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override, e.g. sft_think.train.max_steps=20")
    for name in inputs:
        parser.add_argument(f"--{name}-dir", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    return parser


def parse_stage_args(argv: list[str] | None, description: str, stages: tuple[str, ...], config_cls, inputs: tuple[str, ...] = ("model", "data")):
    """Parse a stage CLI's arguments and load its config; every input problem exits with code 2 and
    one message (missing file or directory, invalid config, duplicate key, wrong stage) before any compute.

    With `--recipe`, only the stage's own section is read and validated (`trlm.recipe.load_section`):
    a stage's command line knows its own stages, not the pipeline."""
    from pydantic import ValidationError

    from trlm.recipe import RecipeError, format_validation_error, load_section, section_name

    parser = stage_argument_parser(description, stages[0], inputs)
    args = parser.parse_args(argv)
    for name in inputs:
        path = getattr(args, f"{name}_dir")
        required, what = INPUT_CHECKS.get(name, (None, "want a directory"))
        if required is not None and not (path / required).is_file():
            parser.error(f"--{name}-dir {path}: no {required} there ({what})")
        if required is None and not path.is_dir():
            parser.error(f"--{name}-dir {path}: not a directory")
    if args.config is not None:
        import yaml

        from trlm.recipe import load_yaml  # duplicate keys are errors, as in recipes

        if not args.config.is_file():
            parser.error(f"--config {args.config}: no such file")
        try:
            return args, config_cls.model_validate(load_yaml(args.config.read_text()))
        except (ValidationError, yaml.YAMLError) as exc:
            detail = format_validation_error(str(args.config), exc) if isinstance(exc, ValidationError) else str(exc)
            parser.error(detail)
    section = section_name(args.stage)
    try:
        cfg = load_section(args.recipe, args.set, section, config_cls)
    except RecipeError as exc:
        if "has no section" in str(exc):
            parser.error(f"unknown stage {args.stage!r}: {exc}; this entry point runs {', '.join(stages)}")
        if args.stage not in stages:
            parser.error(f"stage {args.stage!r} is not run by this entry point: it runs {', '.join(stages)} "
                         f"(this entry point needs {config_cls.__name__})")
        parser.error(str(exc))
    if args.stage not in stages:
        parser.error(f"stage {args.stage!r} is not run by this entry point: it runs {', '.join(stages)} (this entry point needs {config_cls.__name__})")
    return args, cfg


def stage_main(argv: list[str] | None, train_stage: Callable[..., dict], description: str, stages: tuple[str, ...], config_cls,
               inputs: tuple[str, ...] = ("model", "data")) -> None:
    """`python -m trlm.stages.<stage>`: one JSON line per logged step, then the summary (once under torchrun).
    `inputs`: the stage's declared launch inputs, each passed to `train_stage` as `<input>_dir`."""
    from tqdm.auto import tqdm

    args, cfg = parse_stage_args(argv, description, stages, config_cls, inputs)

    def print_metrics(metrics: dict[str, float], step: int) -> None:
        tqdm.write(json.dumps({"step": step, **{k: round(v, 6) for k, v in metrics.items()}}))

    dirs = {f"{name}_dir": getattr(args, f"{name}_dir") for name in inputs}
    summary = train_stage(cfg, **dirs, out_dir=args.out_dir, on_log=print_metrics)
    if os.environ.get("RANK", "0") == "0":  # under torchrun / accelerate launch, once
        print(json.dumps(summary, indent=1))
