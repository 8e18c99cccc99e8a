"""The paper's evaluation protocol (Sec. 4.1, App. C-D): ACC, LPIPS, `||dtheta||_p`, subset tables, grids.

- ACC: a classifier's accuracy on images generated from each concept's prompts; erased
  concepts should fall, the others stay.
- LPIPS (AlexNet) between the original model's image and the edited model's image for the same
  prompt and seed. ImageNet AlexNet weights cannot be downloaded offline: then the real lpips
  code runs with a randomly initialised AlexNet (`pnet_rand=True`) and the tables say so.
- The restoration tables (3, 4, 5, 8) evaluate every subset of a set of erasers.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

# classify(concept name, images) -> for each image, whether the classifier recognises the concept
Classify = Callable[[str, Sequence[Image.Image]], Sequence[bool]]


@dataclass
class EvalConcept:
    """A concept under evaluation: its exact (training) prompts and paraphrases, with seeds."""

    name: str
    prompts: list[str]
    paraphrases: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: list(range(10)))


def all_subsets(names: Sequence[str]) -> list[list[str]]:
    """Every non-empty subset, smallest first (the paper's restoration tables)."""
    return [list(s) for r in range(1, len(names) + 1) for s in itertools.combinations(names, r)]


def scenario_subsets(names: Sequence[str], scenario: str) -> list[list[str]]:
    """`single` (Table 1), `multi` (Table 2), `subsets` (Tables 3-5), `iterative` (SepME2 prefixes)."""
    if scenario == "single":
        return [[n] for n in names]
    if scenario == "multi":
        return [list(names)]
    if scenario == "subsets":
        return all_subsets(names)
    if scenario == "iterative":
        return [list(names[: i + 1]) for i in range(len(names))]
    raise ValueError(f"scenario must be single, multi, subsets or iterative, got {scenario!r}")


def concepts_from_csv(path: str | Path, images_per_prompt: int = 1) -> list[EvalConcept]:
    """Prompts from an ESD/SepME-style CSV (`prompt, evaluation_seed, case_number`, optional `concept`)."""
    by_concept: dict[str, EvalConcept] = {}
    with open(path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    if not rows or "prompt" not in rows[0]:
        raise ValueError(f"{path}: expected a CSV with a 'prompt' column (and evaluation_seed, case_number)")
    for row in rows:
        name = row.get("concept") or row.get("artist") or row.get("class") or row["prompt"]
        concept = by_concept.setdefault(name, EvalConcept(name, [], seeds=[]))
        concept.prompts.append(row["prompt"])
        seed = int(row.get("evaluation_seed") or len(concept.seeds))
        concept.seeds.extend(seed + k for k in range(images_per_prompt) if seed + k not in concept.seeds)
    return list(by_concept.values())


TEMPLATES = ("a painting by {}", "{} style", "in the style of {}")


def default_prompt(name: str) -> str:
    """A concept's prompt when no eraser gives one: the demo world's own, else `a painting by NAME`."""
    from . import demo

    return demo.CONCEPTS[name].prompt if name in demo.CONCEPTS else TEMPLATES[0].format(name)


def concepts_from_names(names: Sequence[str], seeds: Sequence[int], templates: Sequence[str] = TEMPLATES
                        ) -> list[EvalConcept]:
    """Prompts generated from concept names: the first template is the exact one, the rest paraphrases."""
    return [EvalConcept(n, [templates[0].format(n)], [t.format(n) for t in templates[1:]], list(seeds))
            for n in names]


class LPIPSMetric:
    """LPIPS with AlexNet (the paper's metric); a random AlexNet when ImageNet weights are unavailable."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        import lpips

        weights = Path(torch.hub.get_dir()) / "checkpoints" / "alexnet-owt-7be5be79.pth"
        self.pretrained_backbone = weights.is_file()
        self.backbone = ("AlexNet (ImageNet)" if self.pretrained_backbone
                         else "AlexNet with random weights (ImageNet weights unavailable offline)")
        self.model = lpips.LPIPS(net="alex", pnet_rand=not self.pretrained_backbone, verbose=False).to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, first: Sequence[Image.Image], second: Sequence[Image.Image]) -> list[float]:
        a, b = to_tensor(first), to_tensor(second)
        if a.shape[-1] < 64:  # AlexNet's strided layers need at least ~64 pixels
            a = torch.nn.functional.interpolate(a, size=64, mode="bilinear", align_corners=False)
            b = torch.nn.functional.interpolate(b, size=64, mode="bilinear", align_corners=False)
        return self.model(a.to(self.device) * 2 - 1, b.to(self.device) * 2 - 1).flatten().cpu().tolist()


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> float NCHW in [0, 1]."""
    return torch.from_numpy(np.stack([np.asarray(i.convert("RGB"), dtype=np.float32) / 255 for i in images])
                            ).permute(0, 3, 1, 2)


@torch.no_grad()
def generate(pipe: Any, prompt: str, seeds: Sequence[int], steps: int, guidance_scale: float) -> list[Image.Image]:
    """One image per seed; each image has its own generator, so it does not depend on the batch."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return pipe(prompt, num_images_per_prompt=len(generators), generator=generators,
                num_inference_steps=steps, guidance_scale=guidance_scale).images


def dtheta_p(erasers: Sequence[Any]) -> float:
    """`||dtheta||_p = ||dtheta||_1 / M` of the summed increments (Eq. 4), M = modified layers."""
    totals: dict[str, torch.Tensor] = {}
    for eraser in erasers:
        for layer in eraser.weights:
            delta = eraser.delta(layer)
            totals[layer] = delta if layer not in totals else totals[layer] + delta
    return sum(float(d.abs().sum()) for d in totals.values()) / max(len(totals), 1)


def evaluate(
    pipe: Any,
    concepts: Sequence[EvalConcept],
    classify: Classify,
    subsets: Sequence[Sequence[str]],
    steps: int = 25,
    guidance_scale: float = 7.5,
    lpips: LPIPSMetric | None = None,
    progress: bool = True,
    keep_images: bool = False,
) -> dict[str, Any]:
    """Accuracy, LPIPS against the original and exact-prompt drift for the original model and every subset.

    `pipe` must have the erasers loaded (`load_sepme`); the erased set is restored afterwards.
    Returns the `results.json` layout: `concepts`, `original`, `subsets` (each with `erased`,
    `accuracy`, `paraphrase_accuracy`, `lpips`, `max_pixel_change`, `dtheta_p`).
    """
    lpips = lpips or LPIPSMetric()
    before = pipe.get_erased()
    runtime_erasers = getattr(getattr(pipe.unet, "_sepme_runtime", None), "erasers", {})
    jobs = [([], "original"), *((list(s), "subset") for s in subsets)]
    total = sum(len(c.seeds) * (len(c.prompts) + len(c.paraphrases)) for c in concepts) * len(jobs)
    bar = tqdm(total=total, desc="evaluating", unit="img", disable=not progress)
    disabled = getattr(pipe, "_progress_bar_config", {}).get("disable", False)
    pipe.set_progress_bar_config(disable=True)
    original_images: dict[tuple[str, str], list[Image.Image]] = {}
    results: dict[str, Any] = {"concepts": [c.name for c in concepts], "erasers": list(runtime_erasers),
                               "lpips_backbone": lpips.backbone, "subsets": []}
    images_out: dict[str, dict[str, list[Image.Image]]] = {}
    try:
        for erased, kind in jobs:
            pipe.set_erased(erased)
            entry: dict[str, Any] = {"erased": erased, "accuracy": {}, "paraphrase_accuracy": {}, "lpips": {},
                                     "max_pixel_change": {}}
            for concept in concepts:
                hits, para_hits, distances, change = [], [], [], 0.0
                for prompt in [*concept.prompts, *concept.paraphrases]:
                    images = generate(pipe, prompt, concept.seeds, steps, guidance_scale)
                    bar.update(len(images))
                    correct = list(classify(concept.name, images))
                    (hits if prompt in concept.prompts else para_hits).extend(correct)
                    if kind == "original":
                        original_images[(concept.name, prompt)] = images
                    else:
                        reference = original_images[(concept.name, prompt)]
                        if prompt in concept.prompts:
                            distances.extend(lpips(reference, images))
                            change = max(change, float((to_tensor(reference) - to_tensor(images)).abs().max()))
                    if keep_images and prompt == concept.prompts[0]:
                        images_out.setdefault("+".join(erased) or "original", {})[concept.name] = images
                entry["accuracy"][concept.name] = float(np.mean(hits))
                if para_hits:
                    entry["paraphrase_accuracy"][concept.name] = float(np.mean(para_hits))
                if kind != "original":
                    entry["lpips"][concept.name] = float(np.mean(distances))
                    entry["max_pixel_change"][concept.name] = change
            if kind == "original":
                entry.pop("lpips"), entry.pop("max_pixel_change"), entry.pop("erased")
                results["original"] = entry
            else:
                entry["dtheta_p"] = dtheta_p([runtime_erasers[n] for n in erased if n in runtime_erasers])
                results["subsets"].append(entry)
    finally:
        bar.close()
        pipe.set_erased(before)
        pipe.set_progress_bar_config(disable=disabled)
    if keep_images:
        results["_images"] = images_out
    return results


def markdown_table(results: dict[str, Any]) -> str:
    """The paper-style table: accuracy (and LPIPS) of every concept for the original and each subset."""
    concepts = results["concepts"]
    lines = ["| erased | " + " | ".join(f"{c} ACC" for c in concepts) + " | " + " | ".join(
        f"{c} LPIPS" for c in concepts) + " | restored max pixel change |",
        "|" + "---|" * (2 * len(concepts) + 2)]
    original = results["original"]["accuracy"]
    lines.append("| (none: original) | " + " | ".join(f"{original[c]:.2f}" for c in concepts) + " | "
                 + " | ".join("-" for _ in concepts) + " | - |")
    for entry in results["subsets"]:
        erased = set(entry["erased"])
        acc = " | ".join(f"**{entry['accuracy'][c]:.2f}**" if c in erased else f"{entry['accuracy'][c]:.2f}"
                         for c in concepts)
        lp = " | ".join(f"{entry['lpips'][c]:.3f}" for c in concepts)
        # restored: concepts with a loaded eraser that is switched off (their prompts should be exact)
        restored = [entry["max_pixel_change"][c] for c in concepts
                    if c not in erased and c in results.get("erasers", concepts)]
        change = f"{max(restored):.1e}" if restored else "-"
        lines.append(f"| {', '.join(entry['erased'])} | {acc} | {lp} | {change} |")
    if any(e.get("paraphrase_accuracy") for e in results["subsets"]):
        lines += ["", "Paraphrase prompts (not in any eraser's known set: the harder case):", "",
                  "| erased | " + " | ".join(concepts) + " |", "|" + "---|" * (len(concepts) + 1)]
        lines.append("| (none: original) | " + " | ".join(
            f"{results['original']['paraphrase_accuracy'].get(c, float('nan')):.2f}" for c in concepts) + " |")
        for entry in results["subsets"]:
            lines.append(f"| {', '.join(entry['erased'])} | " + " | ".join(
                f"{entry['paraphrase_accuracy'].get(c, float('nan')):.2f}" for c in concepts) + " |")
    lines += ["", f"LPIPS backbone: {results['lpips_backbone']}. Bold: erased concepts. Restored max pixel "
              f"change: largest change (0-1 scale) of any image of a concept whose eraser is loaded but off."]
    return "\n".join(lines)


def image_grid(rows: dict[str, list[Image.Image]], columns: Sequence[str], path: str | Path,
               zoom: int = 3) -> Path:
    """A labelled grid: one row per prompt, one column per model state (each cell one image)."""
    cells = [[img.resize((img.width * zoom, img.height * zoom), Image.NEAREST) for img in row]
             for row in rows.values()]
    size = cells[0][0].width
    label_width, header = 170, 34
    grid = Image.new("RGB", (label_width + size * len(columns), header + size * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(columns):
        draw.text((label_width + j * size + 3, 3), "\n".join(name.split(" ", 1)), fill="black")
    for i, (label, row) in enumerate(zip(rows, cells)):
        draw.text((3, header + i * size + size // 2 - 6), label[:28], fill="black")
        for j, img in enumerate(row):
            grid.paste(img, (label_width + j * size, header + i * size))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def write_results(results: dict[str, Any], folder: str | Path) -> tuple[Path, Path]:
    """`results.json` and `results.md` (atomic writes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in results.items() if not k.startswith("_")}
    paths = []
    for name, text in (("results.json", json.dumps(clean, indent=2)), ("results.md", markdown_table(results))):
        temp = folder / f".{name}.tmp"
        temp.write_text(text + "\n")
        os.replace(temp, folder / name)
        paths.append(folder / name)
    return paths[0], paths[1]


# --------------------------------------------------------------------------- classifiers and `sepme eval`
def demo_classifier() -> Classify:
    """The demo world's classifiers: concept `name` is recognised when its family's classifier says `name`."""
    from . import demo

    classifiers = demo.load_classifiers()

    def classify(name: str, images: Sequence[Image.Image]) -> list[bool]:
        if name not in demo.CONCEPTS:
            raise KeyError(f"{name!r} is not a demo concept; demo concepts: {sorted(demo.CONCEPTS)}")
        return [p == name for p in classifiers[demo.CONCEPTS[name].family].predict(list(images))]

    return classify


def torchvision_classifier(arch: str, classes: dict[str, int], device: str = "cpu") -> Classify:
    """An ImageNet torchvision model (the paper: ResNet50 on Imagenette classes); `classes` maps concept -> index.

    The weights come from torchvision's cache (`torch.hub`); offline without them, this fails with
    torchvision's own message.
    """
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    model = torchvision.models.get_model(arch, weights=weights).eval().to(device)
    preprocess = weights.transforms()

    @torch.no_grad()
    def classify(name: str, images: Sequence[Image.Image]) -> list[bool]:
        batch = torch.stack([preprocess(i.convert("RGB")) for i in images]).to(device)
        return (model(batch).argmax(dim=1).cpu() == classes[name]).tolist()

    return classify


def classifier_from_spec(spec: str, device: str = "cpu") -> Classify:
    """`demo`, `resnet18:FOLDER` (from `sepme train-classifier`), `torchvision:resnet50:church=497,...`,
    or `package.module:function` (a `Classify`)."""
    import importlib

    if spec == "demo":
        return demo_classifier()
    if spec.startswith("resnet18:"):
        from .style_classifier import load_style_classifier

        return load_style_classifier(spec.split(":", 1)[1], device)
    if spec.startswith("torchvision:"):
        _, arch, mapping = (spec.split(":", 2) + [""])[:3]
        classes = {k: int(v) for k, v in (item.split("=") for item in mapping.split(",") if item)}
        if not classes:
            raise ValueError("torchvision classifiers need concept=imagenet_index pairs: "
                             "torchvision:resnet50:church=497,parachute=701")
        return torchvision_classifier(arch, classes, device)
    module, _, attribute = spec.partition(":")
    if not attribute:
        raise ValueError(f"--classifier {spec!r}: use 'demo', 'torchvision:ARCH:name=index,...' or 'module:function'")
    return getattr(importlib.import_module(module), attribute)


def _eval_command(args: Any) -> int:
    from .base_model import load_pipeline

    if bool(args.erasers) == bool(args.compare):
        raise ValueError("give either --erasers FILE... or --compare LABEL=DIR ... (one set of erasers per method)")
    pipe = load_pipeline(args.model, args.device, args.dtype)
    if args.compare:
        return _compare_command(pipe, args)
    names = []
    for path in args.erasers:
        loaded = pipe.load_sepme(path, erase=False, allow_base_mismatch=args.allow_base_mismatch)
        names.extend([loaded] if isinstance(loaded, str) else loaded)
    seeds = list(range(args.seeds))
    if args.prompts:
        concepts = concepts_from_csv(args.prompts, images_per_prompt=args.images_per_prompt)
    else:
        erasers = pipe.list_sepme()
        wanted = args.concepts.split(",") if args.concepts else names
        concepts = []
        for name in wanted:
            exact = [erasers[name]["prompt"]] if name in erasers else [default_prompt(name)]
            concepts.append(EvalConcept(name, exact, [t.format(name) for t in TEMPLATES[1:]] if args.paraphrases
                                        else [], seeds))
    results = evaluate(pipe, concepts, classifier_from_spec(args.classifier, str(pipe.device)),
                       scenario_subsets(names, args.scenario), steps=args.steps,
                       guidance_scale=args.guidance_scale, lpips=LPIPSMetric(pipe.device), progress=not args.quiet)
    json_path, md_path = write_results(results, args.out)
    print(markdown_table(results))
    print(f"\nwritten: {json_path}, {md_path}")
    return 0


def _compare_command(pipe: Any, args: Any) -> int:
    """`sepme eval --compare sepme=DIR esd=DIR ...`: every method's erasers, one table (issue 7)."""
    from .baselines import comparison_grid, comparison_table, evaluate_methods

    methods = []
    for value in args.compare:
        label, _, folder = value.partition("=") if "=" in value else (Path(value).name, "", value)
        methods.append((label.strip(), folder.strip()))
    concepts = (concepts_from_csv(args.prompts, images_per_prompt=args.images_per_prompt) if args.prompts
                else args.concepts.split(",") if args.concepts else None)
    results = evaluate_methods(pipe, methods, classifier_from_spec(args.classifier, str(pipe.device)),
                               scenario=args.scenario, concepts=concepts, seeds=list(range(args.seeds)),
                               paraphrases=args.paraphrases, allow_base_mismatch=args.allow_base_mismatch,
                               keep_images=True, steps=args.steps, guidance_scale=args.guidance_scale,
                               lpips=LPIPSMetric(pipe.device), progress=not args.quiet)
    json_path, md_path = write_results(results, args.out)
    table = comparison_table(results)
    md_path.write_text(table + "\n")  # the per-method table replaces the single-set one
    grid = comparison_grid(results, Path(args.out) / "comparison.png")
    print(table)
    print(f"\nwritten: {json_path}, {md_path}, {grid}")
    return 0


def register_cli(subparsers: Any) -> None:
    """`sepme eval --model M (--erasers FILE... | --compare LABEL=DIR...) --classifier SPEC [--scenario subsets]`."""
    parser = subparsers.add_parser("eval", help="paper-style ACC / LPIPS / ||dtheta||_p tables",
                                   description="Evaluate erasers the way the paper does (Tables 1-5).")
    parser.add_argument("--model", required=True, help="local diffusers folder or Hub id of the base model")
    parser.add_argument("--erasers", nargs="+", help="eraser files or folders (loaded in order)")
    parser.add_argument("--compare", nargs="+", metavar="LABEL=DIR",
                        help="compare methods side by side: each LABEL=DIR (or DIR, labelled by its name) is one "
                             "method's erasers, e.g. the --out of `sepme erase --method esd`; writes one table "
                             "(results.md) and an image grid (comparison.png); --scenario single is Table 1")
    parser.add_argument("--classifier", default="demo",
                        help="demo | resnet18:FOLDER | torchvision:ARCH:concept=index,... | package.module:function")
    parser.add_argument("--scenario", choices=["single", "multi", "subsets", "iterative"], default="subsets")
    parser.add_argument("--prompts", help="CSV with prompt, evaluation_seed, case_number (and concept)")
    parser.add_argument("--concepts", help="comma-separated concept names (default: the erasers' concepts)")
    parser.add_argument("--paraphrases", action="store_true", help="also measure template paraphrases")
    parser.add_argument("--seeds", type=int, default=10, help="seeds per prompt (paper: 50 x 5 images)")
    parser.add_argument("--images-per-prompt", type=int, default=1, help="CSV prompts: seeds per row")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--out", "-o", default="sepme-eval")
    parser.add_argument("--device")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--allow-base-mismatch", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(func=_eval_command)
