"""Generate images of each concept (and of the blank prompt) with the model and fit a ResNet18 head on them
(paper App. C); use it with `sepme eval --classifier resnet18:DIR`.
"""

from __future__ import annotations

import argparse
from typing import Any

from .options import add_generation_options, add_model_options, apply_threads, load_model, warn


def register(parser: argparse.ArgumentParser, argv: Any = ()) -> None:
    parser.set_defaults(func=run)
    parser.add_argument("--concept", action="append", required=True, metavar="NAME[=PROMPT]",
                        help="a concept (label) and the prompt its images come from (repeat)")
    add_model_options(parser)
    parser.add_argument("--out", "-o", default="style-classifier", help="output folder (default: ./style-classifier)")
    parser.add_argument("--images", type=int, default=50, help="images per concept and for the blank prompt")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    parser.add_argument("--peak-lr", type=float, default=0.01, help="peak of the one-cycle learning rate (default 0.01)")
    parser.add_argument("--steps", type=int, default=25, help="sampler steps per image (default 25)")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
    add_generation_options(parser)


def chance_level(labels: int) -> float:
    """The accuracy of guessing among `labels` balanced classes."""
    return 1.0 / max(labels, 1)


def run(args: argparse.Namespace) -> int:
    from ..evaluation import train_style_classifier
    from ..training.concepts import Concept

    apply_threads(args)
    concepts = [Concept.parse(c) for c in args.concept]
    pipe = load_model(args)
    pipe.set_progress_bar_config(disable=True)
    config = train_style_classifier(pipe, {c.name: c.prompt for c in concepts}, args.out, args.images,
                                    args.epochs, args.peak_lr, args.steps, args.guidance_scale,
                                    progress=not args.quiet, batch_size=args.batch_size)
    backbone = "ImageNet" if config["imagenet_backbone"] else "random"
    accuracy = config["held_out_accuracy"]
    print(f"held-out accuracy {accuracy:.3f} ({backbone} ResNet18 backbone); use it with: "
          f"sepme eval --classifier resnet18:{args.out}")
    labels = len(config.get("labels", [])) or len(concepts) + 1  # the concepts and the blank prompt
    chance = chance_level(labels)
    if accuracy <= chance:
        warn("train-classifier", f"held-out accuracy {accuracy:.3f} is at or below chance ({chance:.3f} for "
                                 f"{labels} labels with the blank prompt): this classifier cannot tell the "
                                 f"concepts apart, and `sepme eval` scores made with it mean nothing; try more --images "
                                 f"or --epochs" + ("" if config["imagenet_backbone"] else
                                                   ", or ImageNet ResNet18 weights in torch's hub cache"))
    return 0
