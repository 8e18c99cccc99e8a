"""Eraser file size and run-time increment cost at SD v1.5 shape: full rank versus rank 4 and rank 1.

No training is needed to measure the layout: an SD v1.5-shaped UNet with random weights
(`sd15_unet_config()`, 16 `attn2` layers, 32 `to_k` / `to_v`, text width 768) gets erasers with a random
orthonormal basis of width m = 768 - 3 * 77 = 537 (the null space left by three excluded 77-token prompts)
and random factors: full rank (`w`, d_out x m, plus the basis), rank 4 and rank 1 (`A S_p^T`, r x 768, and
`B`, d_out x r, per layer; no basis). Files are saved in fp16 with `Eraser.save`; sizes in MB = 10^6 bytes.

The second part times the run-time increment of one UNet call (every `to_k` / `to_v`, text 2 x 77 x 768 as
with classifier-free guidance) with 3 full-rank erasers active and with 3 rank-4 ones, interleaved, median
over rounds, on the same UNet in the same run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eraser_size.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eraser_size.py --smoke   # tiny UNet: checks the script runs

The last line is `RESULT full_mb=.. rank4_mb=.. rank1_mb=.. increment_full_ms=.. increment_rank4_ms=..`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import UNet2DConditionModel

import sepme_adapter
from sepme_adapter.fingerprint import fingerprint
from sepme_adapter.hub import export_lora
from sepme_adapter.loader import erasure_runtime
from sepme_adapter.testing import sd15_unet_config, tiny_pipeline
from sepme_adapter.unet import modified_layers

TOKENS = 77


class UNetOnly(sepme_adapter.SepMELoaderMixin):
    """Just enough pipeline for the loader: a UNet and a stand-in blank-prompt embedding (for the fingerprint)."""

    def __init__(self, unet: UNet2DConditionModel, tokens: int = TOKENS) -> None:
        self.unet = unet
        self.text_encoder = SimpleNamespace(device=torch.device("cpu"))
        self.blank = torch.zeros(1, tokens, unet.config.cross_attention_dim)

    def encode_prompt(self, prompt, device=None, num_images_per_prompt=1, do_classifier_free_guidance=False, **_):
        return (self.blank.expand(len(prompt), -1, -1),)


def random_eraser(pipe: UNetOnly, name: str, m: int, rank: int | None, generator: torch.Generator,
                  dtype: torch.dtype = torch.float16) -> sepme_adapter.Eraser:
    """A random eraser with the layout of a trained one: full rank (basis + `w`), or rank r as stored (no basis)."""
    width = pipe.unet.config.cross_attention_dim
    basis = torch.linalg.qr(torch.randn(width, m, generator=generator, dtype=torch.float64))[0]
    layers = modified_layers(pipe.unet)
    d_out = {layer: pipe.unet.get_submodule(layer).weight.shape[0] for layer in layers}
    columns = m if rank is None else rank
    weights = {layer: torch.randn(d_out[layer], columns, generator=generator).to(dtype) for layer in layers}
    down = {} if rank is None else {
        layer: torch.linalg.qr(torch.randn(m, rank, generator=generator, dtype=torch.float64))[0].T.to(dtype)
        for layer in layers}
    eraser = sepme_adapter.Eraser(
        name=name, prompt=f"a painting by {name}", basis=basis.to(dtype), weights=weights, down=down,
        known={"other": ["a painting by someone else"]}, protected=["watermark"],
        metadata={"base_model": "random-sd15", "fingerprint": fingerprint(pipe)},
    )
    # as read back from its file: rank r keeps only A S_p^T and B
    return sepme_adapter.Eraser.from_state_dict(eraser.state_dict(), eraser.header()) if rank else eraser


def file_megabytes(eraser: sepme_adapter.Eraser, folder: Path) -> float:
    return eraser.save(folder / f"{eraser.name}.safetensors").stat().st_size / 1e6


def increment_ms(pipe: UNetOnly, names: list[str], text: torch.Tensor) -> float:
    """Time to compute the increments of every `to_k` / `to_v` for one UNet call with `names` active."""
    runtime = erasure_runtime(pipe)
    pipe.set_erased(names)
    plan = runtime.plan
    x = text.clone()  # a new tensor: no cached projection or increment from an earlier round
    start = time.process_time()
    with torch.no_grad():
        for layer in modified_layers(pipe.unet):
            runtime.increment(x, layer, plan)
    return (time.process_time() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="timing rounds (default 15)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--smoke", action="store_true", help="a tiny UNet, 2 rounds: checks the script runs (seconds)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", sepme_adapter.SepMEWarning)  # random erasers do not know each other
    torch.manual_seed(0)
    started = time.monotonic()
    tokens = 4 if args.smoke else TOKENS
    unet = tiny_pipeline().unet if args.smoke else UNet2DConditionModel(**sd15_unet_config()).eval()
    args.rounds = 2 if args.smoke else args.rounds
    pipe = UNetOnly(unet, tokens)
    print(f"{'tiny' if args.smoke else 'SD v1.5-shaped'} UNet with random weights built in "
          f"{time.monotonic() - started:.0f} s; {len(modified_layers(pipe.unet))} to_k / to_v layers")
    m = pipe.unet.config.cross_attention_dim - 3 * tokens
    generator = torch.Generator().manual_seed(0)
    sizes = {}
    with tempfile.TemporaryDirectory(prefix="sepme-size-") as folder:
        for label, rank in (("full", None), ("rank16", 16), ("rank4", 4), ("rank1", 1)):
            eraser = random_eraser(pipe, label, m, rank, generator)
            sizes[label] = file_megabytes(eraser, Path(folder))
            lora = export_lora(eraser, Path(folder) / "lora" / f"{label}.safetensors", format="kohya")[0]
            print(f"{label:>6}: eraser file {sizes[label]:8.3f} MB, kohya LoRA export "
                  f"{lora.stat().st_size / 1e6:8.3f} MB (fp16, m = {m})")

    full = [random_eraser(pipe, f"full{i}", m, None, generator, torch.float32) for i in range(3)]
    low = [random_eraser(pipe, f"low{i}", m, 4, generator, torch.float32) for i in range(3)]
    for eraser in (*full, *low):
        pipe.load_sepme(eraser, erase=False)
    text = torch.randn(2, tokens, pipe.unet.config.cross_attention_dim, generator=generator)
    names = {"full": [e.name for e in full], "rank4": [e.name for e in low]}
    times: dict[str, list[float]] = {"full": [], "rank4": []}
    for label in ("full", "rank4"):  # warm-up
        increment_ms(pipe, names[label], text)
    for i in range(args.rounds):
        for label in (("full", "rank4") if i % 2 == 0 else ("rank4", "full")):
            times[label].append(increment_ms(pipe, names[label], text))
    median = {label: statistics.median(values) for label, values in times.items()}
    print(f"run-time increment of one UNet call, 3 active erasers (CPU time, {args.threads} thread(s), median of "
          f"{args.rounds}): full rank {median['full']:.2f} ms, rank 4 {median['rank4']:.2f} ms")
    print(f"RESULT full_mb={sizes['full']:.3f} rank4_mb={sizes['rank4']:.3f} rank1_mb={sizes['rank1']:.3f} "
          f"increment_full_ms={median['full']:.2f} increment_rank4_ms={median['rank4']:.2f}")


if __name__ == "__main__":
    main()
