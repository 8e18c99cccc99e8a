"""Evaluate erasers the way the paper does (Tables 1-5)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .options import add_generation_options, add_model_options, apply_threads, load_model, warn

if TYPE_CHECKING:
    from ..evaluation import Classify, EvalConcept

# the original model's accuracy on a concept at or below this: the classifier does not see the concept at all
BLIND_ACCURACY = 0.05


def register(parser: argparse.ArgumentParser, argv: Any = ()) -> None:
    parser.set_defaults(func=run)
    add_model_options(parser)
    parser.add_argument("--erasers", nargs="+", help="eraser files or folders (loaded in order)")
    parser.add_argument("--compare", nargs="+", metavar="LABEL=DIR",
                        help="compare methods side by side: each LABEL=DIR (or DIR, labelled by its name) is one "
                             "method's erasers, e.g. the --out of `sepme erase --method esd`; writes one table "
                             "(results.md) and an image grid (comparison.png); --scenario single is Table 1")
    parser.add_argument("--classifier", default="demo",
                        help="demo | resnet18:FOLDER | torchvision:ARCH:concept=index,... | package.module:function")
    parser.add_argument("--scenario", choices=["single", "multi", "subsets", "iterative"], default="subsets",
                        help="which subsets of the erasers to evaluate: single (Table 1), multi (Table 2), "
                             "subsets (Tables 3-5, default) or iterative (SepME2 prefixes)")
    parser.add_argument("--prompts", help="CSV with prompt, evaluation_seed, case_number (and concept)")
    parser.add_argument("--concepts", help="comma-separated concept names (default: the erasers' concepts)")
    parser.add_argument("--paraphrases", action="store_true",
                        help="also measure held-out phrasings: the standard templates an eraser was not trained on")
    parser.add_argument("--composition", action="append", metavar="NAME+PARTNER=PROMPT",
                        help="a prompt combining two concepts (repeat), judged for both halves, e.g. "
                             "'pimsa+square=a square by pimsa': pimsa erased must go, the square must stay")
    parser.add_argument("--seeds", type=int, default=10, help="seeds per prompt (paper: 50 x 5 images)")
    parser.add_argument("--images-per-prompt", type=int, default=1, help="CSV prompts: seeds per row")
    parser.add_argument("--steps", type=int, default=25, help="sampler steps per image (default 25)")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
    parser.add_argument("--lpips-weights", metavar="FILE.pth",
                        help="torchvision's ImageNet AlexNet weights (alexnet-owt-7be5be79.pth): the image metric is "
                             "then LPIPS, as in the paper (default: LPIPS when torch's hub cache holds them, "
                             "otherwise 1-SSIM, a pixel metric, labelled as such)")
    add_generation_options(parser)
    parser.add_argument("--out", "-o", default="sepme-eval", help="output folder (default: ./sepme-eval)")
    parser.add_argument("--allow-base-mismatch", action="store_true",
                        help="load erasers trained on another base model (with a warning)")


def _named_classifiers() -> tuple[dict[str, Any], dict[str, str]]:
    """The demo world's named classifier and default prompts; evaluation itself does not know the demo."""
    from .. import demo

    return ({"demo": lambda device: demo.demo_classifier()},
            {name: concept.prompt for name, concept in demo.CONCEPTS.items()})


def _metric(args: argparse.Namespace, pipe: Any) -> Any:
    from ..evaluation import image_metric

    return image_metric(pipe.device, args.lpips_weights)


def warn_blind_classifier(results: dict[str, Any]) -> None:
    """A classifier that does not recognise a concept even in the original model's images cannot show erasure."""
    original = results.get("original", {}).get("accuracy", {})
    blind = [name for name, accuracy in original.items() if accuracy <= BLIND_ACCURACY]
    if blind:
        warn("eval", f"the classifier recognises {', '.join(blind)} in at most {BLIND_ACCURACY:.0%} of the original "
                     f"model's images, so their accuracy cannot show erasure; check --classifier and the prompts")


def _classifier(args: argparse.Namespace, pipe: Any) -> Classify:
    from ..evaluation import classifier_from_spec

    return classifier_from_spec(args.classifier, str(pipe.device), named=_named_classifiers()[0])


def _concepts(args: argparse.Namespace, pipe: Any, names: list[str]) -> list[EvalConcept]:
    """From the CSV, or per concept name: the eraser's prompts (exact: what it was trained on; else a default),
    held-out template phrasings it was not trained on (`--paraphrases`), and `--composition` prompts."""
    from ..evaluation import TEMPLATES, EvalConcept, concepts_from_csv, default_prompt

    if args.prompts:
        concepts = concepts_from_csv(args.prompts, images_per_prompt=args.images_per_prompt)
    else:
        erasers = pipe.list_sepme()
        concepts = []
        for name in args.concepts.split(",") if args.concepts else names:
            exact = list(erasers[name]["prompts"]) if name in erasers else [default_prompt(name, _named_classifiers()[1])]
            held_out = [t.format(name) for t in TEMPLATES if t.format(name) not in exact] if args.paraphrases else []
            concepts.append(EvalConcept(name, exact, held_out, list(range(args.seeds))))
    by_name = {c.name: c for c in concepts}
    for value in args.composition or []:
        pair, _, prompt = value.partition("=")
        first, _, second = pair.partition("+")
        if not prompt.strip() or not second.strip():
            raise ValueError(f"--composition {value!r}: write NAME+PARTNER=PROMPT, e.g. 'pimsa+square=a square by pimsa'")
        for name, partner in ((first.strip(), second.strip()), (second.strip(), first.strip())):
            if name in by_name:
                by_name[name].compositions.append((prompt.strip(), partner))
    return concepts


def _evaluate_erasers(pipe: Any, args: argparse.Namespace) -> int:
    from ..evaluation import evaluate, markdown_table, scenario_subsets, write_results

    names = []
    for path in args.erasers:
        loaded = pipe.load_sepme(path, erase=False, allow_base_mismatch=args.allow_base_mismatch)
        names.extend([loaded] if isinstance(loaded, str) else loaded)
    results = evaluate(pipe, _concepts(args, pipe, names), _classifier(args, pipe),
                       scenario_subsets(names, args.scenario), steps=args.steps,
                       guidance_scale=args.guidance_scale, metric=_metric(args, pipe), progress=not args.quiet,
                       batch_size=args.batch_size)
    json_path, md_path = write_results(results, args.out)
    print(markdown_table(results))
    warn_blind_classifier(results)
    print(f"\nwritten: {json_path}, {md_path}")
    return 0


def _compare(pipe: Any, args: argparse.Namespace) -> int:
    """`sepme eval --compare sepme=DIR esd=DIR ...`: every method's erasers, one table."""
    from ..evaluation import (
        comparison_grid,
        comparison_table,
        concepts_from_csv,
        evaluate_methods,
        write_results,
    )

    methods = []
    for value in args.compare:
        label, _, folder = value.partition("=") if "=" in value else (Path(value).name, "", value)
        methods.append((label.strip(), folder.strip()))
    concepts = (concepts_from_csv(args.prompts, images_per_prompt=args.images_per_prompt) if args.prompts
                else args.concepts.split(",") if args.concepts else None)
    results = evaluate_methods(pipe, methods, _classifier(args, pipe), scenario=args.scenario, concepts=concepts,
                               seeds=list(range(args.seeds)), paraphrases=args.paraphrases,
                               allow_base_mismatch=args.allow_base_mismatch, keep_images=True,
                               default_prompts=_named_classifiers()[1], steps=args.steps, guidance_scale=args.guidance_scale,
                               metric=_metric(args, pipe), progress=not args.quiet, batch_size=args.batch_size)
    table = comparison_table(results)
    json_path, md_path = write_results(results, args.out, markdown=table)  # the per-method table
    grid = comparison_grid(results, Path(args.out) / "comparison.png")
    print(table)
    warn_blind_classifier(results)
    print(f"\nwritten: {json_path}, {md_path}, {grid}")
    return 0


def run(args: argparse.Namespace) -> int:
    if bool(args.erasers) == bool(args.compare):
        raise ValueError("give either --erasers FILE... or --compare LABEL=DIR ... (one set of erasers per method)")
    apply_threads(args)
    pipe = load_model(args)
    return _compare(pipe, args) if args.compare else _evaluate_erasers(pipe, args)
