"""Attack erasers with adversarial prompts (UnlearnDiffAtk-style) and measure the attack success rate (ASR).

For each eraser, alone: reference images of its concept by the original model (erasers off); then k adversarial
tokens added to the concept's prompt are optimised so that the erased model denoises those images well, projected
onto real vocabulary tokens (the discrete attack, a prompt anyone can type), and, as an upper bound, left
continuous. Each found condition then generates images that the classifier judges: ASR = the fraction of seeds in
which it recognises the erased concept. Writes results.json, results.md, prompts.txt (the found prompts) and
continuous.safetensors (the continuous vectors) to --out.

Without --model: the built-in demo world (give the erasers `sepme demo` trained, e.g. sepme-demo/erasers).
"""

from __future__ import annotations

import argparse
from typing import Any

from .options import DTYPES, add_generation_options, add_quiet_option, apply_threads, load_model

QUICK = {"iterations": 8, "seeds": 2, "references": 4, "probes": 4, "steps": 10}
"""`--quick`: a smoke run of every stage (used by the tests); flags given explicitly win."""
DEMO_SAMPLER, MODEL_SAMPLER = (20, 5.0), (25, 7.5)  # (steps, guidance) on the demo world / another model


def register(parser: argparse.ArgumentParser, argv: Any = ()) -> None:
    parser.set_defaults(func=run)
    parser.add_argument("--model", help="local diffusers folder or Hub id of the base model (default: the built-in "
                                        "demo world)")
    parser.add_argument("--erasers", nargs="+", required=True, help="eraser files or folders (loaded in order)")
    parser.add_argument("--concepts", help="comma-separated eraser names to attack (default: every loaded eraser)")
    parser.add_argument("--classifier", default="demo",
                        help="demo | resnet18:FOLDER | torchvision:ARCH:concept=index,... | package.module:function")
    attack = parser.add_argument_group("the attack")
    attack.add_argument("--tokens", type=int, help="k, adversarial tokens added to the prompt (default 3)")
    attack.add_argument("--position", choices=["prefix", "suffix"], help="where they go (default prefix)")
    attack.add_argument("--iterations", type=int, help="optimisation steps of each search (default 60, quick 8)")
    attack.add_argument("--step-size", type=float,
                        help="Adam's learning rate in standard deviations of the token embeddings (default 1.0)")
    attack.add_argument("--samples", type=int, help="noised reference latents per step (default 4)")
    attack.add_argument("--probes", type=int,
                        help="fixed noised latents on which candidate prompts are compared (default 16, quick 4)")
    attack.add_argument("--references", type=int,
                        help="reference images of the concept by the original model (default 8, quick 4)")
    attack.add_argument("--vocabulary", choices=["words", "all"],
                        help="tokens the discrete attack may use: words (a token that is a whole word, so the "
                             "prompt can be typed; default) or all (every non-special token)")
    attack.add_argument("--continuous", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the continuous (unprojected) attack, an upper bound (default on)")
    attack.add_argument("--fused", action="store_true",
                        help="attack each eraser fused into the weights (fuse_sepme) instead of applied at run time")
    attack.add_argument("--seed", type=int, default=0, help="seeds the attack (initial tokens, noise, references)")
    judge = parser.add_argument_group("judging")
    judge.add_argument("--seeds", type=int, help="images per condition judged by the classifier (default 10, quick 2)")
    judge.add_argument("--steps", type=int, help="sampler steps (default 20 on the demo world, else 25; quick 10)")
    judge.add_argument("--guidance-scale", type=float,
                       help="classifier-free guidance (default 5 on the demo world, else 7.5)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of every stage (used by the tests)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=list(DTYPES),
                        help="the model's weights (default: float16 on CUDA, float32 on CPU)")
    add_quiet_option(parser)
    add_generation_options(parser)
    parser.add_argument("--out", "-o", default="sepme-attack", help="output folder (default: ./sepme-attack)")
    parser.add_argument("--allow-base-mismatch", action="store_true",
                        help="load erasers trained on another base model (with a warning)")


def _positive(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def settings(args: argparse.Namespace) -> tuple[Any, int, int, float]:
    """The `AttackConfig`, seeds, steps and guidance from the arguments (`--quick` fills what was not given)."""
    from ..evaluation.attack import AttackConfig

    _positive(args, ("tokens", "iterations", "samples", "probes", "references", "seeds", "steps", "batch_size"))
    if args.step_size is not None and not args.step_size > 0:
        raise ValueError(f"--step-size must be > 0, got {args.step_size}")
    if args.guidance_scale is not None and not args.guidance_scale >= 0:
        raise ValueError(f"--guidance-scale must be >= 0, got {args.guidance_scale}")
    quick = QUICK if args.quick else {}
    steps, guidance = DEMO_SAMPLER if args.model is None else MODEL_SAMPLER
    steps = args.steps or quick.get("steps", steps)
    guidance = guidance if args.guidance_scale is None else args.guidance_scale
    given = {name: getattr(args, name) for name in ("tokens", "position", "iterations", "step_size", "samples",
                                                    "probes", "references", "vocabulary")
             if getattr(args, name) is not None}
    defaults = {k: v for k, v in quick.items() if k in ("iterations", "probes", "references")}
    config = AttackConfig(**{**defaults, **given}, continuous=args.continuous, seed=args.seed,
                          reference_steps=steps, guidance_scale=guidance)
    config.validate()
    return config, args.seeds or quick.get("seeds", 10), steps, guidance


def _classifier(args: argparse.Namespace, pipe: Any) -> Any:
    from ..evaluation import classifier_from_spec

    def demo_classifier(device: Any) -> Any:
        from .. import demo

        return demo.demo_classifier()

    return classifier_from_spec(args.classifier, str(pipe.device), named={"demo": demo_classifier})


def run(args: argparse.Namespace) -> int:
    from ..evaluation.attack import attack_erasers, attack_table, write_attack

    config, seeds, steps, guidance = settings(args)
    apply_threads(args)
    if args.model is None:
        from .. import demo

        pipe = load_model(args, model=demo.pipeline_path())
    else:
        pipe = load_model(args)
    names = []
    for path in args.erasers:
        loaded = pipe.load_sepme(path, erase=False, allow_base_mismatch=args.allow_base_mismatch)
        names.extend([loaded] if isinstance(loaded, str) else loaded)
    wanted = [n.strip() for n in args.concepts.split(",") if n.strip()] if args.concepts else names
    unknown = [n for n in wanted if n not in names]
    if unknown or not wanted:
        raise ValueError(f"--concepts {args.concepts!r}: no loaded eraser named {unknown}; loaded: {names}")
    listed = pipe.list_sepme()
    targets = [(name, listed[name]["concept"], listed[name]["prompt"]) for name in wanted]
    results = attack_erasers(pipe, targets, _classifier(args, pipe), config, list(range(seeds)), steps, guidance,
                             args.batch_size, fused=args.fused, progress=not args.quiet)
    paths = write_attack(results, args.out)
    print(attack_table(results))
    print(f"\ntime: {results['seconds']} s; written: {', '.join(str(p) for p in paths)}")
    return 0
