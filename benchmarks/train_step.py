"""Training step: the paper's weight-decoupling step (Alg. 2, as in the authors' code) vs ours (`train_erasers`).

Reference, literal: two UNets (a frozen deep copy, `model_orig`, and the trainable one carrying the
increments); per step, one concept at a time: text embeddings of `""` and the concept recomputed,
2 frozen passes (c_i, c_0) without a graph, 2 passes with a graph on the trainable model (c_i, c_0),
`L_cor = mean((eps_orig(c_i) - eps_orig(c_0)) * (eps_new(c_i) - eps_new(c_0))) + lambda ||w||_1 / M`,
backward, Adam step. The increment `dW_i = beta * w_i @ S_p,i.T` on every attn2 to_k / to_v is applied
either by the package's own processor (`--reference-increments processor`, default: the increment code is
then the same in both variants, so the comparison measures the algorithm) or by merging `W + dW` into
the weights with `torch.func.functional_call` (`merged`: an independent reading of Eq. 10).
Ours: the library as-is, `train_erasers(mode="simultaneous")` on the same pipeline, reference images,
seeds and config; only its optimisation loop is timed (hooks on `training.steps.noisy_latents` and on the
loop's progress bar mark where each step starts and ends).

Both use the paper's defaults (Adam lr 1e-2, beta 1e-4, lambda 3e-5) with early stop disabled (tau = -1e30)
so both run exactly `--steps` iterations, and the same per-concept random streams (`noisy_latents` with
generators seeded as `ConceptTrack.start` does), so their loss trajectories and final `w`s are compared.

Sizes: the tiny pipeline (`tiny_pipeline`, real tiny CLIP text encoder, recomputed each step by the reference)
and an SD v1.5-shaped UNet (`sd15_unet_config()`, random weights, small latents, fixed random 77 x 768
prompt embeddings instead of a text encoder: a UNet-only comparison, so the reference's text recomputation
costs nothing there). Each variant runs in a fresh subprocess (sequentially) so its peak RSS
(`getrusage(...).ru_maxrss`) is its own; the RSS right after imports is reported as a baseline.

    .venv/bin/python benchmarks/train_step.py                # tiny + SD v1.5 size (about 7 min, 1 thread)
    .venv/bin/python benchmarks/train_step.py --quick        # tiny only, few steps
    .venv/bin/python benchmarks/train_step.py --smoke        # tiny only, 3 steps: checks the script runs
    .venv/bin/python benchmarks/train_step.py --one-eraser   # also both variants with 1 concept (+1-2 min)

Time per step is the median, over the steps after warm-up, of the process CPU time (on 1 thread: the work
done; unlike wall time it barely changes when other jobs share the cores); wall time is printed beside it.
The last line is `RESULT speedup=.. memory_ratio=.. loss_match=..` (SD v1.5 size; tiny with --quick):
speedup = reference / ours CPU time per step with 3 concepts; memory_ratio = ours / reference peak RSS
of the whole process; loss_match = L_cor and ||w||_1 / M per iteration and the final w's agree.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import torch
from PIL import Image

CONCEPTS = (("vangogh", "a painting by van gogh"), ("picasso", "a painting by picasso"),
            ("church", "a photo of the church"))
ITERATIONS = 1000  # the paper's cap (TrainConfig.max_iterations), for the one-eraser extrapolation
RTOL_LOSS = 1e-3   # L_cor per concept and iteration
RTOL_W = 2e-2      # final w, relative Frobenius norm per concept; ||w||_1 / M per iteration


# --------------------------------------------------------------------------- timing
class StepClock:
    """Wall and CPU seconds of each optimisation step."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._open: tuple[float, float] | None = None

    def start(self) -> None:  # idempotent until end(): several concepts sample at the start of one step
        if self._open is None:
            self._open = (time.perf_counter(), time.process_time())

    def end(self) -> None:
        wall, cpu = self._open
        self.wall.append(time.perf_counter() - wall)
        self.cpu.append(time.process_time() - cpu)
        self._open = None


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --------------------------------------------------------------------------- models
def build_pipeline(size: str, latent: int):
    """The tiny pipeline, or an SD v1.5-shaped UNet with a fixed-embedding stand-in for CLIP and a small VAE."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from sepme_adapter import SepMELoaderMixin
    from sepme_adapter.testing import sd15_unet_config, tiny_pipeline

    if size == "tiny":
        return tiny_pipeline()

    class FixedPrompts(torch.nn.Module):
        """Stands in for CLIP: a fixed random 77 x 768 embedding per prompt (seeded)."""

        def __init__(self) -> None:
            super().__init__()
            generator = torch.Generator().manual_seed(1234)
            self.table = {p: torch.randn(1, 77, 768, generator=generator) for p in ["", *(p for _, p in CONCEPTS)]}

        @property
        def device(self) -> torch.device:
            return torch.device("cpu")

    class UNetOnlyPipeline(SepMELoaderMixin):
        """Just enough of a Stable Diffusion pipeline for `train_erasers` with a reference-image folder."""

        def __init__(self) -> None:
            torch.manual_seed(0)
            self.unet = UNet2DConditionModel(**{**sd15_unet_config(), "sample_size": latent}).eval()
            torch.manual_seed(1)
            self.vae = AutoencoderKL(  # 3 downsamplings, as SD's (x8), but tiny: only encodes the reference images
                in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                norm_num_groups=4, sample_size=8 * latent,
            )
            self.vae_scale_factor = 8
            self.text_encoder = FixedPrompts()
            self.tokenizer = "fixed prompt table"
            self.scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           clip_sample=False, set_alpha_to_one=False, steps_offset=1)
            self.name_or_path = "random SD v1.5-shaped UNet"

        def encode_prompt(self, prompt, device=None, num_images_per_prompt=1, do_classifier_free_guidance=False,
                          **_):
            return (torch.cat([self.text_encoder.table[p] for p in prompt]).to(device),)

    return UNetOnlyPipeline()


def write_reference_images(folder: Path, resolution: int, count: int = 4) -> None:
    """`count` random RGB images per concept: both variants read them through the library's VAE encoding."""
    rng = np.random.default_rng(0)
    for name, _ in CONCEPTS:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            pixels = rng.integers(0, 256, size=(resolution, resolution, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{k}.png")


# --------------------------------------------------------------------------- the two variants
def run_ours(pipe, concepts, config, folder: Path) -> dict:
    """`train_erasers` as-is; the hooks only read the clock."""
    from sepme_adapter import training
    from sepme_adapter.training import loop, steps

    clock = StepClock()
    sample = steps.noisy_latents

    def timed_sample(*args):
        clock.start()
        return sample(*args)

    class StepEnd:  # replaces tqdm inside `loop.optimise`: `update` is called once at the end of every step
        def __init__(self, *args, **kwargs) -> None:
            pass

        def update(self, n: int = 1) -> None:
            clock.end()

        def set_postfix(self, *args, **kwargs) -> None:
            pass

        def close(self) -> None:
            pass

    with mock.patch.object(steps, "noisy_latents", timed_sample), mock.patch.object(loop, "tqdm", StepEnd):
        erasers = training.train_erasers(pipe, [training.Concept(n, p) for n, p in concepts], mode="simultaneous",
                                         config=config, reference_images=folder, progress=False)
    return {
        "clock": clock,
        "l_cor": {e.name: e.metadata["history"]["l_cor"] for e in erasers},
        "reg": {e.name: e.metadata["history"]["regulariser"] for e in erasers},
        "w": {f"{e.name}/{layer}": w for e in erasers for layer, w in e.weights.items()},
    }


def run_reference(pipe, concepts, config, folder: Path, increments: str) -> dict:
    """Alg. 2 as the authors' code runs it: two UNets, 2 frozen + 2 trainable passes per concept and step."""
    from diffusers import DDPMScheduler

    from sepme_adapter import Eraser, ErasureRuntime, null_space_basis, training
    from sepme_adapter.text import encode_prompts
    from sepme_adapter.training.harness import noisy_latents
    from sepme_adapter.training.reference import reference_latents
    from sepme_adapter.unet import cross_attention_modules

    unet = pipe.unet.requires_grad_(False)  # the trainable model: only the w's learn (conservative for the
    frozen = copy.deepcopy(unet)            # reference: ESD-style code leaves the UNet's requires_grad on)
    alphas_cumprod = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    latents = reference_latents(pipe, [training.Concept(n, p) for n, p in concepts], config, folder, progress=False)
    texts = encode_prompts(pipe, ["", *(p for _, p in concepts)])
    layers = [f"{path}.{proj}" for path in sorted(cross_attention_modules(unet)) for proj in ("to_k", "to_v")]
    base = {layer: unet.get_submodule(layer).weight for layer in layers}
    runtime = ErasureRuntime(unet) if increments == "processor" else None
    states = []
    for i, (name, prompt) in enumerate(concepts):
        rows = [texts[:1], *(texts[1 + j : 2 + j] for j in range(len(concepts)) if j != i)]  # A_i = [c_0; c_j]
        basis = null_space_basis(rows, rtol=config.rtol)
        w = {layer: torch.nn.Parameter(torch.zeros(base[layer].shape[0], basis.shape[1])) for layer in layers}
        if runtime is not None:
            eraser = Eraser(name, prompt, basis, {k: v.detach() for k, v in w.items()}, beta=config.beta)
            eraser.weights = w
            runtime.add(name, eraser, trainable=True)
        stream = SimpleNamespace(generator=torch.Generator().manual_seed(config.seed * 100_003 + i),
                                 latents=latents[name])  # what `noisy_latents` reads from a track
        states.append(SimpleNamespace(name=name, prompt=prompt, basis=basis, w=w, stream=stream,
                                      optimizer=torch.optim.Adam(list(w.values()), lr=config.lr),
                                      l_cor=[], reg=[], l_zero=[]))

    def trainable(state, x_t, t, text):
        if runtime is not None:
            runtime.set_active([state.name])
            try:
                return unet(x_t, t, text).sample.float()
            finally:
                runtime.set_active([])
        merged = {f"{layer}.weight": base[layer] + config.beta * state.w[layer] @ state.basis.T for layer in layers}
        return torch.func.functional_call(unet, merged, (x_t, t, text)).sample.float()

    clock, text_seconds = StepClock(), []
    for _ in range(config.max_iterations):
        clock.start()
        text_s = 0.0
        for s in states:  # one concept at a time: independent parameters, optimisers and random streams
            started = time.perf_counter()
            c_0, c_i = encode_prompts(pipe, [""]), encode_prompts(pipe, [s.prompt])  # recomputed every step
            text_s += time.perf_counter() - started
            x_t, t, _ = noisy_latents(s.stream.latents, s.stream.generator, alphas_cumprod, config.ddim_steps,
                                   unet.device)
            t = torch.tensor([t])
            with torch.no_grad():
                original = frozen(x_t, t, c_i).sample.float() - frozen(x_t, t, c_0).sample.float()
            change = trainable(s, x_t, t, c_i) - trainable(s, x_t, t, c_0)
            l_cor = (original * change).mean()
            reg = sum(w.abs().sum() for w in s.w.values()) / len(s.w)
            s.optimizer.zero_grad(set_to_none=True)
            (l_cor + config.lam * reg).backward()
            s.optimizer.step()
            s.l_cor.append(float(l_cor.detach()))
            s.reg.append(float(reg.detach()))
            s.l_zero.append(float(original.square().mean()))  # L_cor with w = 0: how much the edit moved it
        clock.end()
        text_seconds.append(text_s)
    return {
        "clock": clock, "text_s": text_seconds,
        "l_cor": {s.name: s.l_cor for s in states}, "reg": {s.name: s.reg for s in states},
        "l_zero": {s.name: s.l_zero for s in states},
        "w": {f"{s.name}/{layer}": w for s in states for layer, w in s.w.items()},
    }


def worker(args: argparse.Namespace) -> None:
    """One variant in this (fresh) process; results go to `<data>/<tag>.json` and `<tag>-w.safetensors`."""
    from safetensors.torch import save_file

    from sepme_adapter.training import TrainConfig

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    baseline = rss_mb()
    started = time.perf_counter()
    pipe = build_pipeline(args.size, args.latent)
    concepts = CONCEPTS[: args.concepts]
    # no early stop: exactly `steps` steps
    config = TrainConfig.paper(max_iterations=args.steps, tau=-1e30, seed=0, concepts_per_pass=args.concepts_per_pass)
    folder = Path(args.data) / f"images-{args.size}"
    built = time.perf_counter() - started
    if args.worker == "ours":
        result = run_ours(pipe, concepts, config, folder)
    else:
        result = run_reference(pipe, concepts, config, folder, args.reference_increments)
    clock, w = result.pop("clock"), result.pop("w")
    tag = Path(args.data) / f"{args.size}-{args.concepts}-{args.worker}"
    save_file({k: v.detach().contiguous() for k, v in w.items()}, f"{tag}-w.safetensors")
    result.update(wall=clock.wall, cpu=clock.cpu, build_s=built, rss_import_mb=baseline, peak_mb=peak_rss_mb())
    Path(f"{tag}.json").write_text(json.dumps(result))


# --------------------------------------------------------------------------- comparison
def launch(args: argparse.Namespace, variant: str, size: str, steps: int, concepts: int, data: Path) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--size", size, "--steps", str(steps),
               "--concepts", str(concepts), "--threads", str(args.threads), "--latent", str(args.latent),
               "--reference-increments", args.reference_increments, "--data", str(data),
               "--concepts-per-pass", str(args.concepts_per_pass)]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    tag = data / f"{size}-{concepts}-{variant}"
    result = json.loads(Path(f"{tag}.json").read_text())
    from safetensors.torch import load_file

    result["w"] = load_file(f"{tag}-w.safetensors")
    result["process_s"] = time.perf_counter() - started
    return result


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def compare(ref: dict, ours: dict, concepts) -> tuple[bool, list[str]]:
    """L_cor and ||w||_1 / M per concept and iteration, and the final w's, within tolerances."""
    lines, ok = [], True
    for name, _ in concepts:
        l_cor = max(relative(a, b) for a, b in zip(ref["l_cor"][name], ours["l_cor"][name]))
        reg = max(relative(a, b) for a, b in zip(ref["reg"][name], ours["reg"][name]))
        keys = [k for k in ref["w"] if k.startswith(f"{name}/")]
        diff = math.sqrt(sum(float((ref["w"][k] - ours["w"][k]).square().sum()) for k in keys))
        norm = math.sqrt(sum(float(ours["w"][k].square().sum()) for k in keys))
        w_rel = diff / max(norm, 1e-30)
        flipped = sum(int((ref["w"][k].sign() * ours["w"][k].sign() < 0).sum()) for k in keys)
        elements = sum(ours["w"][k].numel() for k in keys)
        moved = max(relative(a, z) for a, z in zip(ref["l_cor"][name], ref["l_zero"][name]))
        good = (len(ref["l_cor"][name]) == len(ours["l_cor"][name]) and l_cor <= RTOL_LOSS
                and reg <= RTOL_W and w_rel <= RTOL_W)
        ok &= good
        lines.append(f"    {name:<8} L_cor max rel diff {l_cor:.1e} (tol {RTOL_LOSS:.0e}; the edit itself moved "
                     f"L_cor by up to {moved:.1e}), ||w||_1/M {reg:.1e}, final w {w_rel:.1e} (tol {RTOL_W:.0e}; "
                     f"{flipped} of {elements} elements of opposite sign){'' if good else '  MISMATCH'}")
    return ok, lines


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def step_times(result: dict, warmup: int) -> SimpleNamespace:
    return SimpleNamespace(wall=statistics.median(result["wall"][warmup:]), cpu=statistics.median(result["cpu"][warmup:]),
                           peak=result["peak_mb"], above=result["peak_mb"] - result["rss_import_mb"])


def summarise(ref: dict, ours: dict, warmup: int, concepts, text_encoder: bool) -> dict:
    n = len(concepts)
    rows = {"reference": step_times(ref, warmup), "ours": step_times(ours, warmup)}
    print(f"  {'variant':<10} {'step s (cpu)':>12} {'step s (wall)':>13} {'cpu s / concept':>15} "
          f"{'peak RSS MB':>11} {'above import MB':>15}")
    for label, row in rows.items():
        print(f"  {label:<10} {row.cpu:12.3f} {row.wall:13.3f} {row.cpu / n:15.3f} {row.peak:11.0f} {row.above:15.0f}")
    ref_row, our_row = rows["reference"], rows["ours"]
    speedup, speedup_wall = ref_row.cpu / our_row.cpu, ref_row.wall / our_row.wall
    memory, memory_above = our_row.peak / ref_row.peak, our_row.above / ref_row.above
    text = (f"reference text encoding {statistics.median(ref['text_s'][warmup:]):.3f} s (wall) of its step"
            if text_encoder else "fixed prompt embeddings: no text encoder in either variant")
    print(f"  {len(ref['wall'])} steps per variant, medians over the last {len(ref['wall']) - warmup} "
          f"(first {warmup}: warm-up); {text}")
    print(f"  speedup (reference / ours, per step, {n} concepts): {speedup:.2f}x cpu time, {speedup_wall:.2f}x wall"
          f"   [target >= 2x]")
    print(f"  peak memory ratio (ours / reference): {memory:.3f} whole process, {memory_above:.3f} above the "
          f"import baseline   [target <= 0.6]")
    ok, lines = compare(ref, ours, concepts)
    print(f"  loss trajectories agree: {str(ok).lower()}")
    print("\n".join(lines))
    print(f"  one eraser, extrapolated = cpu time per concept-step x {ITERATIONS} iterations (the cap; the early "
          f"stop may end sooner), at this latent size on 1 thread:")
    print(f"    reference {duration(ref_row.cpu / n * ITERATIONS)} (concepts one at a time), peak "
          f"{ref_row.peak / 1024:.2f} GB; ours {duration(our_row.cpu / n * ITERATIONS)} per eraser when {n} "
          f"train together (peak {our_row.peak / 1024:.2f} GB for all {n})")
    return {"speedup": speedup, "memory": memory, "match": ok}


def one_eraser(args: argparse.Namespace, size: str, warmup: int, data: Path) -> None:
    """Both variants with a single concept (its basis excludes only the blank prompt): measured, not extrapolated."""
    steps = warmup + 2
    ref, ours = (step_times(launch(args, v, size, steps, 1, data), warmup) for v in ("reference", "ours"))
    print(f"  one eraser alone, measured ({steps} steps, first {warmup}: warm-up):")
    for label, row in (("reference", ref), ("ours", ours)):
        print(f"    {label:<10} {row.cpu:.3f} s cpu per step ({row.wall:.3f} wall) -> "
              f"{duration(row.cpu * ITERATIONS)} for {ITERATIONS} iterations; peak {row.peak / 1024:.2f} GB")
    print(f"    ratios: {ref.cpu / ours.cpu:.2f}x cpu time, memory {ours.peak / ref.peak:.3f} whole process, "
          f"{ours.above / ref.above:.3f} above the import baseline")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny UNet only, few steps")
    parser.add_argument("--smoke", action="store_true", help="tiny UNet only, 3 steps: checks the script runs")
    parser.add_argument("--latent", type=int, default=16, help="SD latent side (16: 128x128 pixels)")
    parser.add_argument("--steps", type=int, default=5, help="steps per variant at SD size (first one: warm-up)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for both variants (1: steadier when other jobs share the cores)")
    parser.add_argument("--reference-increments", choices=("processor", "merged"), default="processor",
                        help="how the reference applies dW: the package's processor, or W + dW via functional_call")
    parser.add_argument("--concepts-per-pass", type=int, default=0,
                        help="ours: concepts per graph pass (0: all at once; 1: lowest memory)")
    parser.add_argument("--one-eraser", action="store_true",
                        help="also run both variants with a single concept at each size (measured, not extrapolated)")
    parser.add_argument("--worker", choices=("reference", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=("tiny", "sd"), help=argparse.SUPPRESS)
    parser.add_argument("--concepts", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    started = time.perf_counter()
    print(f"torch {torch.__version__}, {args.threads} thread(s) per variant, cpu; reference increments: "
          f"{args.reference_increments}; each variant in a fresh subprocess, one after the other", flush=True)
    args.quick = args.quick or args.smoke
    sizes = [("tiny", "tiny UNet (4 attn2, text 8 x 64, latents 4x8x8)", 3 if args.smoke else 6 if args.quick else 12, 2)]
    if not args.quick:
        sizes.append(("sd", f"SD v1.5-size UNet (random weights, 16 attn2, text 77 x 768, latents "
                            f"4x{args.latent}x{args.latent})", args.steps, 1))
    with tempfile.TemporaryDirectory(prefix="sepme-train-step-") as tmp:
        data = Path(tmp)
        result = None
        for size, title, steps, warmup in sizes:
            write_reference_images(data / f"images-{size}", 16 if size == "tiny" else 8 * args.latent)
            print(f"\n== {title}: {len(CONCEPTS)} concepts, {steps} steps per variant", flush=True)
            ref = launch(args, "reference", size, steps, len(CONCEPTS), data)
            ours = launch(args, "ours", size, steps, len(CONCEPTS), data)
            result = summarise(ref, ours, warmup, CONCEPTS, text_encoder=size == "tiny")
            if args.one_eraser:
                one_eraser(args, size, warmup, data)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    print(f"RESULT speedup={result['speedup']:.2f} memory_ratio={result['memory']:.3f} "
          f"loss_match={str(result['match']).lower()}")


if __name__ == "__main__":
    main()
