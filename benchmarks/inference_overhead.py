"""UNet-call time with SepME erasers: none, 1 / 3 / 10 active at run time, fused; `set_erased` latency.

Runs on a tiny UNet (`tiny_pipeline`) and on an SD v1.5-shaped UNet with random weights (CPU, small
latents, batch 2 as with classifier-free guidance, text 2 x 77 x 768). Erasers get random `w` on a
random orthonormal basis of width m = d_in - 3 * tokens (SD: 768 - 3 * 77 = 537) for all of them: ten
erasers would have no real null space on SD (768 - 10 * 77 < 0), but their run-time cost is the same.
Configurations are interleaved (A B C .. C B A ..) and each figure is a median over rounds.

    .venv/bin/python benchmarks/inference_overhead.py            # tiny + SD v1.5 size (minutes)
    .venv/bin/python benchmarks/inference_overhead.py --quick    # tiny only, few repeats
    .venv/bin/python benchmarks/inference_overhead.py --smoke    # tiny only, one repeat: checks the script runs

Then a whole generation (`steady`): per configuration (plain, 3 active) a run of UNet calls on the same
text tensor, as a pipeline makes them: the first call after `set_erased` computes every layer's
increment, the later ones reuse them; the cost of a 25-step generation is first + 24 x later.

    .venv/bin/python benchmarks/inference_overhead.py --rounds 0 --steady-steps 4   # SD size: generation only

The last line is `RESULT overhead_1=.. overhead_3=.. overhead_10=.. fused=.. set_erased_ms=.. first_3=..
later_3=.. steady_3=.. threads=..`, ratios to the plain UNet (no SepME at all), for the SD v1.5-size UNet
(the tiny one with --quick; the first five are left out with --rounds 0).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from types import SimpleNamespace

import torch
from diffusers import UNet2DConditionModel

import sepme_adapter
from sepme_adapter.fingerprint import fingerprint
from sepme_adapter.testing import sd15_unet_config, tiny_pipeline
from sepme_adapter.unet import cross_attention_modules

CONFIGS = ("plain", "0", "1", "3", "10", "fused")  # plain: no SepME loaded; 0: loaded, nothing erased
LABELS = {"plain": "no erasers (plain UNet)", "0": "10 loaded, 0 active", "1": "1 active", "3": "3 active",
          "10": "10 active", "fused": "3 fused"}


class UNetOnly(sepme_adapter.SepMELoaderMixin):
    """Just enough pipeline for the loader: a UNet, and a stand-in blank-prompt embedding for the fingerprint."""

    def __init__(self, unet: UNet2DConditionModel, tokens: int) -> None:
        self.unet = unet
        self.text_encoder = SimpleNamespace(device=torch.device("cpu"))
        self.blank = torch.zeros(1, tokens, unet.config.cross_attention_dim)

    def encode_prompt(self, prompt, device=None, num_images_per_prompt=1, do_classifier_free_guidance=False,
                      **kwargs):
        return (self.blank.expand(len(prompt), -1, -1), None)


def random_erasers(pipe, count: int, m: int, seed: int = 0) -> list[sepme_adapter.Eraser]:
    """`count` erasers, each with its own random orthonormal basis (d_in x m) and random `w` per to_k / to_v."""
    generator = torch.Generator().manual_seed(seed)
    attention = sorted(cross_attention_modules(pipe.unet).items())
    width = pipe.unet.config.cross_attention_dim
    prompts = {f"concept{i}": f"a painting by concept {i}" for i in range(count)}
    metadata = {"base_model": "random", "fingerprint": fingerprint(pipe)}
    erasers = []
    for name, prompt in prompts.items():
        basis = torch.linalg.qr(torch.randn(width, m, generator=generator, dtype=torch.float64))[0].float()
        weights = {f"{path}.{proj}": torch.randn(getattr(module, proj).weight.shape[0], m, generator=generator)
                   for path, module in attention for proj in ("to_k", "to_v")}
        known = {n: p for n, p in prompts.items() if n != name}  # all mutually separable: set_erased never warns
        erasers.append(sepme_adapter.Eraser(name, prompt, basis, weights, known=known, metadata=metadata))
    return erasers


class Bench:
    def __init__(self, pipe, erasers, inputs, clock) -> None:
        self.pipe, self.erasers, self.inputs, self.clock = pipe, erasers, inputs, clock
        self.names = [e.name for e in erasers]
        self.fused = False
        self.fuse_s: list[float] = []

    def apply(self, config: str) -> None:
        pipe = self.pipe
        if self.fused:
            pipe.unfuse_sepme()
            self.fused = False
        if config == "plain":
            if pipe.list_sepme():
                pipe.unload_sepme()
            return
        if not pipe.list_sepme():
            for eraser in self.erasers:
                pipe.load_sepme(eraser, erase=False)
        if config == "fused":
            pipe.set_erased(self.names[:3])
            start = time.perf_counter()
            pipe.fuse_sepme()
            self.fuse_s.append(time.perf_counter() - start)
            self.fused = True
        else:
            pipe.set_erased(self.names[:int(config)])

    def call(self) -> float:
        start = self.clock()
        self.pipe.unet(*self.inputs, return_dict=False)
        return self.clock() - start

    def set_erased_ms(self, repeats: int) -> list[float]:
        """Latency of switching between two 3-concept subsets with all 10 loaded (no UNet call between)."""
        self.apply("0")
        times = []
        for i in range(repeats):
            names = self.names[:3] if i % 2 else self.names[3:6]
            start = time.perf_counter()
            self.pipe.set_erased(names)
            times.append(1e3 * (time.perf_counter() - start))
        return times


def run(title: str, pipe, tokens: int, latent: int, rounds: int, calls: int, clock) -> dict[str, float]:
    width = pipe.unet.config.cross_attention_dim
    m = width - 3 * tokens
    torch.manual_seed(0)
    inputs = (torch.randn(2, 4, latent, latent), torch.tensor(500), torch.randn(2, tokens, width))
    bench = Bench(pipe, random_erasers(pipe, 10, m), inputs, clock)
    print(f"\n== {title}: latents 2x4x{latent}x{latent}, text 2x{tokens}x{width}, 10 erasers of m={m}, "
          f"{len(cross_attention_modules(pipe.unet))} attn2 layers; {rounds} rounds x {calls} calls", flush=True)
    for config in ("plain", "10"):  # warm-up: allocator, and every eraser's cached weights
        bench.apply(config)
        bench.call()
    rounds_ms: dict[str, list[float]] = {c: [] for c in CONFIGS}  # per round: the median of its calls
    for r in range(rounds):
        for config in CONFIGS if r % 2 == 0 else reversed(CONFIGS):
            bench.apply(config)
            rounds_ms[config].append(1e3 * statistics.median([bench.call() for _ in range(calls)]))
    # ratio: median over rounds of (config / plain in the same round), robust to slow drift of a shared CPU
    ratios = {c: statistics.median(t / p for t, p in zip(rounds_ms[c], rounds_ms["plain"])) for c in CONFIGS}
    print(f"  {'configuration':<24} {'median ms':>10}  {'ratio':>7}  {'min ms':>9}  {'min ratio':>9}")
    for config in CONFIGS:
        t, fastest = rounds_ms[config], min(rounds_ms[config])
        print(f"  {LABELS[config]:<24} {statistics.median(t):10.2f}  {ratios[config]:7.4f}  {fastest:9.2f}"
              f"  {fastest / min(rounds_ms['plain']):9.4f}")
    switch = bench.set_erased_ms(200)
    bench.apply("plain")
    print(f"  set_erased (10 loaded, 3 active)   median {statistics.median(switch):.3f} ms, max {max(switch):.3f} ms")
    print(f"  fuse_sepme (3 erasers)             median {1e3 * statistics.median(bench.fuse_s):.1f} ms")
    return {**ratios, "set_erased_ms": statistics.median(switch)}


def steady(title: str, pipe, tokens: int, latent: int, rounds: int, steps: int, clock,
           generation: int = 25) -> dict[str, float]:
    """A generation's cost: the first UNet call after `set_erased` (increments computed) and the following
    ones (each layer's increment reused: same text tensor, same plan), plain UNet vs 3 active erasers.

    `steps` calls per configuration and round are timed; the whole `generation`-step cost is
    first + (generation - 1) x median(later calls), per round, and the ratio is the median over rounds.
    """
    width = pipe.unet.config.cross_attention_dim
    torch.manual_seed(0)
    inputs = (torch.randn(2, 4, latent, latent), torch.tensor(500), torch.randn(2, tokens, width))
    bench = Bench(pipe, random_erasers(pipe, 3, width - 3 * tokens), inputs, clock)
    print(f"\n== {title}, whole generation: {rounds} rounds x {steps} calls per configuration, "
          f"extrapolated to {generation} steps", flush=True)
    for config in ("plain", "3"):
        bench.apply(config)
        bench.call()
    first: dict[str, list[float]] = {"plain": [], "3": []}
    later: dict[str, list[float]] = {"plain": [], "3": []}
    for r in range(rounds):
        for config in ("plain", "3") if r % 2 == 0 else ("3", "plain"):
            bench.apply(config)  # a new plan: the first call computes every increment
            times = [bench.call() for _ in range(steps)]
            first[config].append(times[0])
            later[config].append(statistics.median(times[1:]))
    whole = {c: [f + (generation - 1) * t for f, t in zip(first[c], later[c])] for c in first}
    bench.apply("plain")
    result = {
        "first_3": statistics.median(a / b for a, b in zip(first["3"], first["plain"])),
        "later_3": statistics.median(a / b for a, b in zip(later["3"], later["plain"])),
        "steady_3": statistics.median(a / b for a, b in zip(whole["3"], whole["plain"])),
    }
    for config, label in (("plain", "no erasers (plain UNet)"), ("3", "3 active")):
        print(f"  {label:<24} first call {1e3 * statistics.median(first[config]):9.1f} ms   later calls "
              f"{1e3 * statistics.median(later[config]):9.1f} ms   {generation}-step generation "
              f"{statistics.median(whole[config]):7.2f} s")
    print(f"  3 active / plain: first call {result['first_3']:.4f}, later calls {result['later_3']:.4f}, "
          f"whole {generation}-step generation {result['steady_3']:.4f}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny UNet only, few repeats")
    parser.add_argument("--smoke", action="store_true", help="tiny UNet, one repeat: checks the script runs (seconds)")
    parser.add_argument("--latent", type=int, default=16, help="SD latent side (16: 128x128 pixels)")
    parser.add_argument("--rounds", type=int, default=15,
                        help="interleaved rounds of the first-call table at SD size (0: skip it, whole generation only)")
    parser.add_argument("--steady-steps", type=int, default=4,
                        help="UNet calls timed per configuration and round for the whole-generation figure")
    parser.add_argument("--steady-rounds", type=int, default=3, help="interleaved rounds for the whole-generation figure")
    parser.add_argument("--generation-steps", type=int, default=25, help="denoising steps of the generation reported")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: no OpenMP stalls when other jobs share the cores)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="UNet calls timed in process CPU time (robust on a shared machine) or wall time")
    args = parser.parse_args()
    if args.smoke:
        args.quick, args.steady_rounds, args.steady_steps, args.generation_steps = True, 1, 2, 2
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    warnings.simplefilter("ignore", FutureWarning)
    start = time.perf_counter()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"torch {torch.__version__}, {args.threads} threads, cpu, UNet calls timed in {args.clock} time")

    tiny = sepme_adapter.attach(tiny_pipeline())
    repeats = 1 if args.smoke else 3 if args.quick else 10
    result = run("tiny UNet", tiny, tokens=8, latent=8, rounds=repeats, calls=repeats, clock=clock)
    result.update(steady("tiny UNet", sepme_adapter.attach(tiny_pipeline()), 8, 8, args.steady_rounds,
                         args.steady_steps if args.smoke else max(args.steady_steps, 10), clock, args.generation_steps))
    if not args.quick:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**sd15_unet_config()).eval()
        sd = UNetOnly(unet, 77)
        title = f"SD v1.5-size UNet (random weights), latents {args.latent} x {args.latent}"
        result = run(title, sd, 77, args.latent, args.rounds, 1, clock) if args.rounds else {}
        result.update(steady(title, sd, 77, args.latent, args.steady_rounds, args.steady_steps, clock,
                             args.generation_steps))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    first = (f"overhead_1={result['1']:.4f} overhead_3={result['3']:.4f} overhead_10={result['10']:.4f} "
             f"fused={result['fused']:.4f} set_erased_ms={result['set_erased_ms']:.3f} " if "1" in result else "")
    print(f"RESULT {first}first_3={result['first_3']:.4f} later_3={result['later_3']:.4f} "
          f"steady_3={result['steady_3']:.4f} threads={args.threads}")


if __name__ == "__main__":
    main()
