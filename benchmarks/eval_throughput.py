"""Evaluation throughput: the batched engine (`generate_batched`) against one-prompt-at-a-time generation.

The workload is an evaluation's: the demo world's pipeline with three erasers loaded (random `w` on
each concept's real null space), prompts x seeds x erased states (the original model and every
subset). The old way (the evaluation before the batched engine) sets each state with `set_erased` and makes
each prompt's seeds in one pipeline call; the engine mixes prompts, seeds and erased subsets in
calls of `--batch-size` images. Both make the same images (checked: largest difference, 0-1
scale); each is timed twice, interleaved (old, new, old, new), and the faster of each pair counts.

    .venv/bin/python benchmarks/eval_throughput.py --quick          # 96 images per run, ~1-2 min
    .venv/bin/python benchmarks/eval_throughput.py --smoke          # 4 images, 2 steps: checks the script runs
    .venv/bin/python benchmarks/eval_throughput.py                  # 320 images per run
    .venv/bin/python benchmarks/eval_throughput.py --threads 1 --compare-threads

`--threads` applies to both ways (default: torch's, one per core); `--compare-threads` also times
the engine at 1 and 2 threads. The last line is
`RESULT speedup=<new / old images per second> old_ips=.. new_ips=.. cpu_speedup=.. threads=.. max_diff=..`;
`cpu_speedup` is the ratio of process CPU seconds (the work each way does, whatever else runs on the machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spin-waiting on a shared machine

import numpy as np  # noqa: E402
import torch  # noqa: E402

import sepme_adapter  # noqa: E402
from sepme_adapter import demo  # noqa: E402
from sepme_adapter.basis import null_space_basis  # noqa: E402
from sepme_adapter.evaluation import all_subsets  # noqa: E402
from sepme_adapter.generation import Job, generate_batched  # noqa: E402
from sepme_adapter.text import encode_prompts  # noqa: E402
from sepme_adapter.unet import cross_attention_modules  # noqa: E402

ERASED = ("orvan", "pimsa", "kadrel")
STEPS, GUIDANCE = 20, 5.0


def random_erasers(pipe) -> list[sepme_adapter.Eraser]:
    """One eraser per erased concept on its real null space (blank + the other two), random `w`."""
    prompts = {n: demo.CONCEPTS[n].prompt for n in ERASED}
    generator = torch.Generator().manual_seed(0)
    erasers = []
    for name, prompt in prompts.items():
        known = {n: p for n, p in prompts.items() if n != name}
        basis = null_space_basis(list(encode_prompts(pipe, ["", *known.values()])))
        weights = {f"{path}.{proj}": torch.randn(getattr(m, proj).weight.shape[0], basis.shape[1],
                                                  generator=generator) * 3.0
                   for path, m in cross_attention_modules(pipe.unet).items() for proj in ("to_k", "to_v")}
        erasers.append(sepme_adapter.Eraser(name=name, prompt=prompt, basis=basis, weights=weights, beta=1e-2,
                                            known=known, metadata={"base_model": "demo"}))
    return erasers


def one_prompt_at_a_time(pipe, prompts, seeds, states, steps=STEPS) -> list[np.ndarray]:
    """The evaluation before the engine: per state `set_erased`, per prompt one call with all its seeds."""
    images = []
    for state in states:
        pipe.set_erased(list(state))
        for prompt in prompts:
            generators = [torch.Generator().manual_seed(s) for s in seeds]
            images.extend(pipe(prompt, num_images_per_prompt=len(seeds), generator=generators,
                               num_inference_steps=steps, guidance_scale=GUIDANCE, output_type="np").images)
    pipe.set_erased([])
    return images


def engine(pipe, prompts, seeds, states, batch_size, steps=STEPS) -> list[np.ndarray]:
    jobs = [Job(p, s, tuple(state)) for state in states for p in prompts for s in seeds]
    return generate_batched(pipe, jobs, steps, GUIDANCE, batch_size, output_type="np")


def timed(fn, *args) -> tuple[float, float, list[np.ndarray]]:
    """Wall seconds, process CPU seconds (all threads; robust to other jobs on the machine), the images."""
    start, cpu = time.perf_counter(), time.process_time()
    images = fn(*args)
    return time.perf_counter() - start, time.process_time() - cpu, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 prompts x 4 seeds x 8 states (96 images)")
    parser.add_argument("--smoke", action="store_true",
                        help="1 prompt x 2 seeds x 2 states, 2 steps, one round: checks the script runs (seconds)")
    parser.add_argument("--batch-size", type=int, default=40, help="engine: images per pipeline call")
    parser.add_argument("--threads", type=int, help="torch CPU threads for both ways (default: torch's)")
    parser.add_argument("--compare-threads", action="store_true", help="also time the engine at 1 and 2 threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    pipe = sepme_adapter.attach(demo.load_pipeline())
    pipe.set_progress_bar_config(disable=True)
    for eraser in random_erasers(pipe):
        pipe.load_sepme(eraser, erase=False)
    names = ["orvan", "pimsa", "circle", "selune"]
    prompts = [demo.CONCEPTS[n].prompt for n in (names[:1] if args.smoke else names[:3] if args.quick else names)]
    seeds = list(range(2 if args.smoke else 4 if args.quick else 10))
    states = [[], [ERASED[0]]] if args.smoke else [[], *all_subsets(ERASED)]
    steps, rounds = (2, 1) if args.smoke else (STEPS, 2)
    count = len(prompts) * len(seeds) * len(states)
    print(f"torch {torch.__version__}, {threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"load average {os.getloadavg()[0]:.1f}; {len(prompts)} prompts x {len(seeds)} seeds x {len(states)} "
          f"states = {count} images per run, {steps} steps, guidance {GUIDANCE}, engine batch {args.batch_size}",
          flush=True)
    old_s, new_s, old_cpu, new_cpu = [], [], [], []
    for _ in range(rounds):
        seconds, cpu, old = timed(one_prompt_at_a_time, pipe, prompts, seeds, states, steps)
        old_s.append(seconds), old_cpu.append(cpu)
        print(f"  one prompt at a time: {seconds:6.1f} s  {count / seconds:5.2f} images/s  (CPU {cpu:6.1f} s)",
              flush=True)
        seconds, cpu, new = timed(engine, pipe, prompts, seeds, states, args.batch_size, steps)
        new_s.append(seconds), new_cpu.append(cpu)
        print(f"  batched engine:       {seconds:6.1f} s  {count / seconds:5.2f} images/s  (CPU {cpu:6.1f} s)",
              flush=True)
    max_diff = max(float(np.abs(a - b).max()) for a, b in zip(old, new))
    print(f"  same images: largest difference {max_diff:.1e} (0-1 scale; one 8-bit level is 3.9e-3)")
    if args.compare_threads:  # interleaved 1, 2, 2, 1, 1, 2: the median of each
        walls: dict[int, list[float]] = {1: [], 2: []}
        for r in range(3):
            for n in (1, 2) if r % 2 == 0 else (2, 1):
                torch.set_num_threads(n)
                seconds, cpu, _ = timed(engine, pipe, prompts, seeds, states, args.batch_size, steps)
                walls[n].append(seconds)
                print(f"  batched engine, {n} thread(s): {seconds:6.1f} s  {count / seconds:5.2f} images/s  "
                      f"(CPU {cpu:6.1f} s)", flush=True)
        torch.set_num_threads(threads)
        medians = {n: count / statistics.median(w) for n, w in walls.items()}
        print(f"  threads: 1 -> {medians[1]:.2f} images/s, 2 -> {medians[2]:.2f} images/s (medians of 3)")
    old_ips, new_ips = count / min(old_s), count / min(new_s)
    cpu_speedup = min(old_cpu) / min(new_cpu)
    print(f"RESULT speedup={new_ips / old_ips:.2f} old_ips={old_ips:.2f} new_ips={new_ips:.2f} "
          f"cpu_speedup={cpu_speedup:.2f} threads={threads} max_diff={max_diff:.1e}")


if __name__ == "__main__":
    main()
