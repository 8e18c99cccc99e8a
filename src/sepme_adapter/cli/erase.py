"""Train erasers and write DIR/<name>.safetensors, a training report (JSON) and loss curves (PNG). Under
`accelerate launch`, concepts are split across processes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import struct
import typing
from collections.abc import Sequence
from dataclasses import Field, fields
from pathlib import Path
from typing import Any

from ..baselines.config import ANCHOR_METHODS, METHOD_FIELDS, BaselineConfig, field_choices
from ..baselines.config import METHODS as BASELINE_METHODS
from ..errors import TrainingError
from ..files import eraser_filename
from ..training.concepts import TEMPLATES, Concept, merge_concepts, read_concepts_csv
from ..training.config import MODES, TrainConfig
from .options import add_model_options, check_device, concept_list, load_model, warn

METHODS = ("sepme", "gcirs", *BASELINE_METHODS)
GROUPS = {"common": "training (common)", "advanced": "training (advanced)"}
BASELINE_HELP = {
    "esd_lr": "ESD-x: Adam learning rate (ESD paper: 1e-5)",
    "esd_iterations": "ESD-x: training steps (ESD paper: 1000)",
    "esd_eta": "ESD-x: negative guidance eta (ESD paper: 1.0)",
    "esd_layers": "ESD-x: layers fine-tuned: attn2 (q, k, v, out of cross-attention) or kv (k, v)",
    "ablation_lr": "Concept Ablation: Adam learning rate (about 2e-6 in its cross-attention runs)",
    "ablation_iterations": "Concept Ablation: training steps",
    "ablation_layers": "Concept Ablation: layers fine-tuned: kv (its 'cross-attn' group) or attn2",
    "fmn_lr": "Forget-Me-Not: Adam learning rate",
    "fmn_iterations": "Forget-Me-Not: attention re-steering steps (its release: 35)",
    "fmn_layers": "Forget-Me-Not: layers fine-tuned: attn2 or kv",
    "uce_lambda": "UCE: lambda of lambda * ||W' - W||^2 (its erase script: 0.5)",
    "uce_erase_scale": "UCE: weight of the erased concepts' terms (1.0)",
    "uce_preserve_scale": "UCE: weight lambda_p of the preserved prompts' terms (0.1)",
    "uce_tokens": "UCE: token positions edited: tail (the concept's last word and after) or all",
    "probe_samples": "every baseline: fixed (x_t, t) samples on which its objective is measured before and after",
}


def register(parser: argparse.ArgumentParser, argv: Sequence[str] = ()) -> None:
    parser.set_defaults(func=run)
    what = parser.add_argument_group("what to erase")
    what.add_argument("--concept", action="append", metavar="NAME[=PROMPT]",
                      help="a concept to erase (repeat, or comma-separate names); repeating a NAME adds prompts")
    what.add_argument("--concepts-file", metavar="FILE.csv",
                      help="concepts to erase from a CSV file with the header name,prompt (one row per prompt)")
    what.add_argument("--templates", choices=sorted(TEMPLATES),
                      help="phrase every bare NAME (no =PROMPT) with the standard templates of this kind, e.g. "
                           "style: 'a painting by NAME', 'in the style of NAME', 'NAME style', 'an artwork by NAME'")
    what.add_argument("--known", action="append", metavar="NAME[=PROMPT]",
                      help="a concept every eraser must leave exactly as it is (repeat, or comma-separate names)")
    what.add_argument("--protect", action="append", metavar="PROMPT", help="an extra prompt kept exact")
    what.add_argument("--retain", action="append", metavar="PROMPT",
                      help="a prompt the erasers should leave alone, added to the retain distribution drawn from "
                           "the model's vocabulary (shapes the basis and the containment term; not kept exact: "
                           "use --protect for that)")
    what.add_argument("--retain-file", metavar="FILE.txt", help="retain prompts, one per line")
    add_model_options(parser.add_argument_group("model"))
    out = parser.add_argument_group("output")
    out.add_argument("--out", "-o", default="erasers", help="output folder (default: ./erasers)")
    out.add_argument("--overwrite", action="store_true",
                     help="replace the erasers and report already in --out (without it, a folder that holds "
                          "erasers is refused: an old eraser would not know the new ones)")
    out.add_argument("--resume", action="store_true", help="continue from the checkpoint in OUT/checkpoints")
    method = parser.add_argument_group("method")
    method.add_argument("--method", choices=METHODS, default="sepme",
                        help="sepme (weight decoupling, --mode), gcirs (= --mode gcirs), or a baseline: esd "
                             "(ESD-x), ablation (Concept Ablation), fmn (Forget-Me-Not), uce (closed-form UCE); "
                             "`--method esd --help` lists a baseline's settings")
    method.add_argument("--mode", choices=MODES, default="simultaneous", help="SepME mode (--method sepme)")
    method.add_argument("--anchor", metavar="PROMPT",
                        help="anchor prompt c* of --method ablation / uce (default 'a painting' / ''); for an "
                             "object pass a generic prompt of its kind")
    method.add_argument("--reference-images", metavar="DIR", help="folder with one sub-folder of images per concept name")
    method.add_argument("--preset", choices=("default", "paper"), default="default",
                        help="default: settings that need no tuning per model (scale-free step sizes, stop on "
                             "the relative correlation); paper: the paper's SD v1.4 values (--learning-rate "
                             "1e-2, --increment-scale 1e-4, --l1-weight 3e-5, --stop-below 0, "
                             "--max-iterations 1000). Flags below override the preset.")
    add_config_options(parser, TrainConfig, GROUPS)
    add_baseline_options(parser, _shown_baseline(argv))


def _shown_baseline(argv: Sequence[str]) -> str | None:
    """The baseline named by `--method X` / `--method=X` in `argv`, whose settings `--help` then lists."""
    for i, value in enumerate(argv):
        given = value.split("=", 1)[1] if value.startswith("--method=") else (
            argv[i + 1] if value == "--method" and i + 1 < len(argv) else None)
        if given is not None:
            return given
    return None


def flag_name(item: Field) -> str:
    return item.metadata.get("flag") or "--" + item.name.replace("_", "-")


def flag_kind(item: Field, annotation: Any) -> dict[str, Any]:
    """argparse's `type` / `action` / `choices` for a dataclass field, from its annotation (never its default):
    `int | None` -> int, `float` -> float, `bool` -> --name / --no-name, `str` -> its `choices`."""
    kinds = [k for k in typing.get_args(annotation) if k is not type(None)] or [annotation]
    kind = kinds[0]
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if kind in (int, float):
        return {"type": kind, "metavar": "N" if kind is int else "X"}
    choices = item.metadata.get("choices")
    return {"choices": choices} if choices else {"type": str}


def add_config_options(parser: argparse.ArgumentParser, config_class: type, groups: dict[str, str]) -> None:
    """One flag per field of a config dataclass: its declared name, help and group (`training.config.setting`);
    a field without them gets `--field-name` and a generic help. The field name stays a hidden alias."""
    hints = typing.get_type_hints(config_class)
    defaults, paper = config_class(), getattr(config_class, "paper", config_class)()
    sections = {key: parser.add_argument_group(title) for key, title in groups.items()}
    for item in fields(config_class):
        flag, kind = flag_name(item), flag_kind(item, hints[item.name])
        default, preset = getattr(defaults, item.name), getattr(paper, item.name)
        help = item.metadata.get("help") or f"TrainConfig.{item.name}"
        notes = [] if "default:" in help else [f"default {_shown(default)}"]
        notes += [f"paper preset {_shown(preset)}"] if preset != default else []
        note = "; ".join(notes)
        section = sections.get(item.metadata.get("group", "advanced"), sections["advanced"])
        section.add_argument(flag, dest=item.name, default=None, help=f"{help} ({note})" if note else help, **kind)
        alias = "--" + item.name.replace("_", "-")
        if alias != flag:  # the former name, for one release
            section.add_argument(alias, dest=item.name, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kind)


def _shown(value: Any) -> str:
    return "none" if value is None else ("on" if value else "off") if isinstance(value, bool) else str(value)


def add_baseline_options(parser: argparse.ArgumentParser, shown: str | None) -> None:
    """`--esd-lr` ... (`BaselineConfig`); `--help` lists them only with `--method` naming a baseline."""
    group = parser.add_argument_group(
        f"baseline settings (--method {shown})" if shown in BASELINE_METHODS else "baseline settings",
        None if shown in BASELINE_METHODS else "hidden: `sepme erase --method esd --help` (or ablation, fmn, uce) "
                                                "lists a baseline's settings")
    hints, defaults = typing.get_type_hints(BaselineConfig), BaselineConfig()
    for name in METHOD_FIELDS:
        item = next(f for f in fields(BaselineConfig) if f.name == name)
        kind = {"choices": field_choices(name)} if hints[name] is str else flag_kind(item, hints[name])
        visible = shown in BASELINE_METHODS and (name.startswith(f"{shown}_") or name == "probe_samples")
        help = f"{BASELINE_HELP.get(name, name)} (default {getattr(defaults, name)})"
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None,
                           help=help if visible else argparse.SUPPRESS, **kind)


def in_flag_names(message: str) -> str:
    """A config's message in the command's terms: `TrainConfig.rank` -> `--rank`, `BaselineConfig.esd_lr` -> `--esd-lr`."""
    for item in sorted(fields(TrainConfig), key=lambda f: -len(f.name)):
        message = message.replace(f"TrainConfig.{item.name}", flag_name(item))
    for name in sorted(METHOD_FIELDS, key=len, reverse=True):
        message = message.replace(f"BaselineConfig.{name}", "--" + name.replace("_", "-"))
    return message


def configs_from_args(args: argparse.Namespace) -> tuple[TrainConfig, BaselineConfig]:
    """The settings the flags give: `--preset`, overridden by every flag that was passed."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    config = TrainConfig.paper(**given) if args.preset == "paper" else TrainConfig(**given)
    baseline = {name: getattr(args, name) for name in METHOD_FIELDS if getattr(args, name, None) is not None}
    return config, BaselineConfig.from_train_config(config, **baseline)


def _distributed(device: str | None) -> tuple[Any, tuple[int, int] | None, str | None]:
    """Under `accelerate launch` (or torchrun) each process trains its share of the concepts: `shard` is
    `(process index, number of processes)`."""
    import os
    from types import SimpleNamespace

    import torch

    from ..extras import require

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and importlib.util.find_spec("accelerate") is None:
        # one process and no `[train]` extra: nothing to coordinate
        return SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None), None, device
    PartialState = require("accelerate", "`sepme erase` under several processes").PartialState  # slow to import

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


def is_eraser_file(path: Path) -> bool:
    """A `.safetensors` file whose header says it is a SepME eraser (read without torch)."""
    from ..formats import FORMAT_NAME

    try:
        with open(path, "rb") as stream:
            (length,) = struct.unpack("<Q", stream.read(8))
            header = json.loads(stream.read(min(length, 100_000_000)))
        return header.get("__metadata__", {}).get("format") == FORMAT_NAME
    except (OSError, ValueError, struct.error):
        return False


def existing_erasers(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("*.safetensors") if is_eraser_file(p)) if out.is_dir() else []


def check_output_folder(args: argparse.Namespace, out: Path, main_process: bool) -> None:
    """Refuse an --out that already holds erasers (an old eraser would not know the new ones) unless
    --overwrite, which removes them and the old report first, or --resume, which continues that run."""
    old = existing_erasers(out)
    if not old or args.resume:
        return
    if not args.overwrite:
        names = ", ".join(p.name for p in old[:5]) + (f" and {len(old) - 5} more" if len(old) > 5 else "")
        raise TrainingError(f"{out} already holds erasers ({names}); pass --overwrite to replace them, --resume "
                            f"to continue their training, or another --out")
    if main_process:
        for path in [*old, out / "training_report.json", out / "loss_curves.png"]:
            path.unlink(missing_ok=True)
        warn("erase", f"--overwrite: removed {len(old)} earlier eraser(s) from {out}")


def _train(args: argparse.Namespace, pipe: Any, shard: tuple[int, int] | None, out: Path) -> list[Any]:
    from ..baselines import train_baseline
    from ..training import train_erasers

    config, baseline_config = configs_from_args(args)
    concepts, protected = concepts_to_erase(args), args.protect or []
    known = parse_concepts(args.known, args.templates)
    if args.method in ("sepme", "gcirs"):
        return train_erasers(
            pipe, concepts, known=known, protected=protected, mode="gcirs" if args.method == "gcirs" else args.mode,
            config=config, reference_images=args.reference_images, cache_dir=out / "reference",
            checkpoint_dir=out / "checkpoints" / (f"process-{shard[0]}" if shard else "main"), resume=args.resume,
            progress=not args.quiet, shard=shard, retain=retain_list(args),
        )
    # a baseline: one dense eraser per concept
    return train_baseline(
        pipe, concepts, args.method, anchor=args.anchor, config=baseline_config, known=known, protected=protected,
        reference_images=args.reference_images, cache_dir=out / "reference", progress=not args.quiet, shard=shard,
    )


def retain_list(args: argparse.Namespace) -> list[str]:
    """--retain prompts, then the lines of --retain-file (blank lines skipped)."""
    prompts = list(args.retain or [])
    if args.retain_file:
        path = Path(args.retain_file)
        if not path.is_file():
            raise TrainingError(f"--retain-file {str(path)!r} does not exist; give a text file with one prompt per line")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    return prompts


def check_prompt_lengths(args: argparse.Namespace, pipe: Any) -> None:
    """Refuse a prompt the model's tokenizer would truncate: the eraser would learn the truncation while its
    file stored the full text."""
    from ..text import overlong_prompts

    prompts = [p for c in [*concepts_to_erase(args), *parse_concepts(args.known, args.templates)] for p in c.prompts]
    too_long = overlong_prompts(pipe, [*prompts, *(args.protect or [])])
    if too_long:
        prompt, count, limit = too_long[0]
        more = f" (and {len(too_long) - 1} more)" if len(too_long) > 1 else ""
        raise TrainingError(f"prompt {prompt!r} is {count} tokens long, but this model's tokenizer takes at most "
                            f"{limit} (with its start and end tokens){more}; the eraser would learn only the "
                            f"truncated prompt: shorten it")


def stop_target(config: dict[str, Any]) -> str:
    """The stop an eraser's training config asked for, as a user reads it."""
    def signed(value: Any) -> str:
        return f"{value:+g}" if isinstance(value, (int, float)) else "?"

    if config.get("stop") == "probe":
        return f"probe rho <= {signed(config.get('erase_to'))}"
    return f"{config.get('stop_on', 'rho')} <= {signed(config.get('tau'))}"


COLLATERAL_WARNING = 0.5  # a held-out unlisted prompt whose keys / values move by half their size: suspect


def self_check(eraser: Any, reason: str) -> None:
    """The eraser's own figures in plain words: how far its probes went (erasure) and how much held-out prompts
    nobody listed moved (collateral), with a warning and the flag that helps when either looks wrong."""
    stats, config = eraser.metadata.get("stats", {}), eraser.metadata.get("training", {}).get("config", {})
    collateral = eraser.metadata.get("collateral") or {}
    rho = stats.get("probe_rho")
    if rho is not None:
        print(f"    self-check: probe rho {rho:+.2f} (target <= {config.get('erase_to', 0):+g}; 1 = untouched, "
              f"0 = uncorrelated, < 0 = reversed), stopped by {reason}")
    if collateral.get("max") is not None:
        print(f"    self-check: collateral on {collateral.get('prompts')} held-out unlisted prompts: median "
              f"{collateral['median']:.2f}, max {collateral['max']:.2f} (relative key / value change; worst "
              f"{collateral.get('worst_prompt')!r})")
        if collateral["max"] > COLLATERAL_WARNING:
            warn("erase", f"{eraser.name} moves some unlisted prompts' keys / values by {collateral['max']:.0%} of "
                          f"their size: it may harm prompts nobody listed. Bound it with --max-collateral (e.g. 0.3), "
                          f"use fewer --basis-dimensions, or list what must stay with --known / --protect")
    basis = eraser.metadata.get("basis") or {}
    if str(basis.get("kind", "")).startswith("compact"):
        leakage = (getattr(eraser, "certificate", None) or {}).get("max_leakage")
        reached = "" if leakage is None else f" by up to {leakage:.1e} of their size (its leakage certificate)"
        warn("erase", f"{eraser.name}: no exact null space was left (the prompts it must keep fill the text "
                      f"encoder's space), so it uses the compact basis: the listed prompts' keys / values change"
                      f"{reached}, not ~1e-7, and unlisted prompts are less contained. Train fewer concepts "
                      f"together, list fewer --known / --protect prompts, or choose the bound with --max-leakage")
    if rho is not None and reason == "collateral bound":
        warn("erase", f"{eraser.name} stopped at its collateral bound before erasing (probe rho {rho:+.2f}): "
                      f"raise --max-collateral or --basis-dimensions, or give more phrasings of the concept")


def report_eraser(eraser: Any, path: Path) -> None:
    """One line per eraser, and a warning when it ran out of iterations before meeting its stop."""
    stats = eraser.metadata.get("stats", {})
    print(f"{eraser.name}: {path}  (iterations {stats.get('iterations')}, ||dtheta||_p {stats.get('dtheta_p', 0):.4g})")
    training = eraser.metadata.get("training", {})
    if training.get("method") not in ("sepme", "gcirs"):
        return
    asked = training.get("config", {}).get("rank")
    if asked is not None and getattr(eraser, "rank", None) is None:
        dimensions = eraser.metadata.get("basis", {}).get("dimensions", "its")
        print(f"    (--rank {asked} is at least the basis's {dimensions} dimensions: trained at full rank, which is "
              f"no larger)")
    reason = stats.get("stop_reason") or ("stop statistic" if stats.get("stopped_early") else "max_iterations")
    self_check(eraser, reason)
    if reason == "max_iterations":
        rho = stats.get("probe_rho", stats.get("final_rho"))
        reached = "" if rho is None else f"; rho reached {rho:+.2f}"
        warn("erase", f"{eraser.name} ran all {stats.get('iterations')} iterations without meeting its stop "
                      f"({stop_target(training.get('config', {}))}{reached}): it may erase only part of the concept. "
                      f"Check it with `sepme eval`, or train longer (--max-iterations) or faster (--step-size)")


def run(args: argparse.Namespace) -> int:
    from ..eraser import Eraser

    out = Path(args.out)
    if args.anchor is not None and args.method not in ANCHOR_METHODS:
        raise TrainingError(f"--anchor applies to --method {' or '.join(ANCHOR_METHODS)}, not {args.method}")
    if args.resume and args.method not in ("sepme", "gcirs"):
        raise TrainingError(f"--resume is not supported for --method {args.method} (baselines keep no checkpoints)")
    config, baseline_config = configs_from_args(args)
    try:  # before the model loads; in the flags' names
        (config if args.method in ("sepme", "gcirs") else baseline_config).validate()
    except TrainingError as error:
        raise TrainingError(in_flag_names(str(error))) from None
    concepts_to_erase(args)
    check_device(args.device)
    state, shard, device = _distributed(args.device)
    check_output_folder(args, out, state.is_main_process)
    args.device = device
    pipe = load_model(args)
    check_prompt_lengths(args, pipe)
    erasers = _train(args, pipe, shard, out)
    for eraser in erasers:
        report_eraser(eraser, eraser.save(out / eraser_filename(eraser.name)))
    if shard is not None:
        state.wait_for_everyone()
        if not state.is_main_process:
            return 0
        erasers = [Eraser.load(out / eraser_filename(c.name)) for c in concepts_to_erase(args)]
    from ..training import write_report

    json_path, png_path = write_report(erasers, out)
    print(f"report: {json_path}" + (f", {png_path}" if png_path else ""))
    return 0
