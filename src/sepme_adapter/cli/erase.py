"""Train erasers and write DIR/<name>.safetensors, a training report (JSON) and loss curves (PNG). Under
`accelerate launch`, concepts are split across processes.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from ..baselines import METHOD_FIELDS, BaselineConfig, field_choices, train_baseline
from ..baselines import METHODS as BASELINE_METHODS
from ..eraser import Eraser
from ..errors import TrainingError
from ..files import eraser_filename
from ..pipelines import load_pipeline
from ..training import MODES, Concept, TrainConfig, train_erasers, write_report
from ..training.concepts import TEMPLATES, merge_concepts, read_concepts_csv
from ..training.config import STOP_STATISTICS
from .options import add_model_options, concept_list, new_command

METHODS = ("sepme", "gcirs", *BASELINE_METHODS)


def register(subparsers: Any) -> None:
    parser = new_command(subparsers, "erase", __doc__, run,
                         help="train one eraser per concept (SepME / G-CiRs / ESD / ablation / FMN / UCE)")
    add_model_options(parser)
    parser.add_argument("--concept", action="append", metavar="NAME[=PROMPT]",
                        help="a concept to erase (repeat, or comma-separate names); repeating a NAME adds prompts")
    parser.add_argument("--concepts-file", metavar="FILE.csv",
                        help="concepts to erase from a CSV file with columns name,prompt (one row per prompt)")
    parser.add_argument("--templates", choices=sorted(TEMPLATES),
                        help="phrase every bare NAME (no =PROMPT) with the standard templates of this kind, e.g. "
                             "style: 'a painting by NAME', 'in the style of NAME', 'NAME style', 'an artwork by NAME'")
    parser.add_argument("--known", action="append", metavar="NAME[=PROMPT]",
                        help="a concept kept exact by every eraser's basis (repeat, or comma-separate names)")
    parser.add_argument("--protect", action="append", metavar="PROMPT", help="an extra prompt kept exact")
    parser.add_argument("--method", choices=METHODS, default="sepme",
                        help="sepme (weight decoupling, --mode), gcirs (= --mode gcirs), or a baseline: esd (ESD-x), "
                             "ablation (Concept Ablation), fmn (Forget-Me-Not), uce (closed-form UCE)")
    parser.add_argument("--anchor", metavar="PROMPT",
                        help="anchor prompt c* of --method ablation / uce (default 'a painting' / ''); for an "
                             "object pass a generic prompt of its kind")
    parser.add_argument("--mode", choices=MODES, default="simultaneous", help="SepME mode (--method sepme)")
    parser.add_argument("--out", "-o", default="erasers", help="output folder (default: ./erasers)")
    parser.add_argument("--reference-images", help="folder with one sub-folder of images per concept name")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in OUT/checkpoints")
    _add_config_options(parser)


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """`--preset`, one flag per `TrainConfig` field (`--max-iterations` ...) and per baseline setting (`--esd-lr` ...)."""
    parser.add_argument("--preset", choices=("default", "paper"), default="default",
                        help="default: settings that need no tuning per model (scale-free step sizes, stop on the "
                             "relative correlation); paper: the paper's SD v1.4 values (lr 1e-2, beta 1e-4, "
                             "lambda 3e-5, tau 0, 1000 iterations). Flags below override the preset.")
    defaults, paper = TrainConfig(), TrainConfig.paper()
    for item in fields(TrainConfig):
        default = getattr(defaults, item.name)
        if isinstance(default, bool):  # --flag / --no-flag
            kind: dict[str, Any] = {"action": argparse.BooleanOptionalAction}
        elif isinstance(default, str):
            kind = {"choices": STOP_STATISTICS}
        else:
            kind = {"type": float if isinstance(default, float) or default is None else int}
        parser.add_argument(f"--{item.name.replace('_', '-')}", dest=item.name, default=None,
                            help=f"(default {default}; paper preset {getattr(paper, item.name)})", **kind)
    group = parser.add_argument_group("baselines (--method esd / ablation / fmn / uce)")
    baseline_defaults = BaselineConfig()
    for name in METHOD_FIELDS:
        default = getattr(baseline_defaults, name)
        kind: dict[str, Any] = {"choices": field_choices(name)} if isinstance(default, str) else {"type": type(default)}
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, default=default, help=f"(default {default})",
                           **kind)


def _distributed(device: str | None) -> tuple[Any, tuple[int, int] | None, str | None]:
    """Under `accelerate launch` (or torchrun) each process trains its share of the concepts."""
    from accelerate import PartialState  # imported when used: it is slow to import

    state = PartialState(cpu=device == "cpu" or (device is None and not torch.cuda.is_available()))
    shard = (state.process_index, state.num_processes) if state.num_processes > 1 else None
    if shard is not None and device is None:
        device = str(state.device)
    return state, shard, device


def parse_concepts(values: list[str] | None, templates: str | None) -> list[Concept]:
    """`--concept` / `--known` values as concepts; bare names get the `--templates` phrasings."""
    concepts = []
    for text in concept_list(values):
        concept = Concept.parse(text)
        concepts.append(Concept.from_templates(concept.name, templates) if templates and "=" not in text else concept)
    return merge_concepts(concepts)


def concepts_to_erase(args: argparse.Namespace) -> list[Concept]:
    concepts = parse_concepts(args.concept, args.templates)
    if args.concepts_file:
        concepts = merge_concepts([*concepts, *read_concepts_csv(args.concepts_file)])
    if not concepts:
        raise TrainingError("no concept to erase: pass --concept NAME[=PROMPT] or --concepts-file FILE.csv")
    return concepts


def _train(args: argparse.Namespace, pipe: Any, shard: tuple[int, int] | None, out: Path) -> list[Eraser]:
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    config = TrainConfig.paper(**given) if args.preset == "paper" else TrainConfig(**given)
    concepts, protected = concepts_to_erase(args), args.protect or []
    known = parse_concepts(args.known, args.templates)
    if args.method in ("sepme", "gcirs"):
        return train_erasers(
            pipe, concepts, known=known, protected=protected, mode="gcirs" if args.method == "gcirs" else args.mode,
            config=config, reference_images=args.reference_images, cache_dir=out / "reference",
            checkpoint_dir=out / "checkpoints" / (f"rank-{shard[0]}" if shard else "main"), resume=args.resume,
            progress=not args.quiet, shard=shard,
        )
    # a baseline (issue 7): one dense eraser per concept
    baseline_config = BaselineConfig.from_train_config(config, **{name: getattr(args, name) for name in METHOD_FIELDS})
    return train_baseline(
        pipe, concepts, args.method, anchor=args.anchor, config=baseline_config, known=known, protected=protected,
        reference_images=args.reference_images, cache_dir=out / "reference", progress=not args.quiet, shard=shard,
    )


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    state, shard, device = _distributed(args.device)
    if args.anchor is not None and args.method in ("sepme", "gcirs"):
        raise TrainingError(f"--anchor applies to --method ablation or uce, not {args.method}")
    if args.resume and args.method not in ("sepme", "gcirs"):
        raise TrainingError(f"--resume is not supported for --method {args.method} (baselines keep no checkpoints)")
    pipe = load_pipeline(args.model, device, args.dtype)
    erasers = _train(args, pipe, shard, out)
    for eraser in erasers:
        path = eraser.save(out / eraser_filename(eraser.name))
        print(f"{eraser.name}: {path}  (iterations {eraser.metadata['stats']['iterations']}, "
              f"||dtheta||_p {eraser.metadata['stats']['dtheta_p']:.4g})")
    if shard is not None:
        state.wait_for_everyone()
        if not state.is_main_process:
            return 0
        erasers = [Eraser.load(out / eraser_filename(c.name)) for c in concepts_to_erase(args)]
    json_path, png_path = write_report(erasers, out)
    print(f"report: {json_path}, {png_path}")
    return 0
