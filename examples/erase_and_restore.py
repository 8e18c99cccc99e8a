"""Erase two concepts from a Stable Diffusion model, then restore one of them.

    python examples/erase_and_restore.py                       # the built-in demo world
    python examples/erase_and_restore.py --world sdxl          # its SDXL-architecture twin (pooled increments too)
    python examples/erase_and_restore.py --quick               # a few iterations and steps: checks it runs
    python examples/erase_and_restore.py --model runwayml/stable-diffusion-v1-5 \\
        --concept "vangogh=a painting by van gogh" --concept "picasso=a painting by picasso"
"""

import argparse

import sepme_adapter
from sepme_adapter import demo
from sepme_adapter.pipelines import load_pipeline
from sepme_adapter.training import TrainConfig, train_erasers

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None, help="diffusers folder or Hub id (default: the demo world)")
parser.add_argument("--world", choices=demo.MODELS, default="sd", help="which demo world, without --model")
parser.add_argument("--concept", action="append", default=None)
parser.add_argument("--iterations", type=int, default=400, help="at most this many (the default stop usually ends sooner)")
parser.add_argument("--quick", action="store_true", help="3 iterations, 1 reference image, 2 steps: checks it runs")
args = parser.parse_args()
steps = 2 if args.quick else 20

pipe = load_pipeline(args.model or demo.pipeline_path(args.world))
concepts = args.concept or [f"{n}={demo.CONCEPTS[n].prompt}" for n in ("orvan", "pimsa")]
config = TrainConfig(max_iterations=3 if args.quick else args.iterations, images_per_concept=1 if args.quick else 4,
                     reference_steps=steps)
erasers = train_erasers(pipe, concepts, config=config, progress=not args.quick)  # simultaneous mode: each knows the other
for eraser in erasers:
    eraser.save(f"{eraser.name}.safetensors")
    pipe.load_sepme(f"{eraser.name}.safetensors")

first, second = (e.name for e in erasers)
print("erased:", pipe.get_erased())
pipe.set_erased([second])  # `first` is restored: its prompt renders exactly as before
pipe.set_erased([])  # the original model, bit for bit
pipe.set_erased([first])
pipe.fuse_sepme()  # baked into to_k / to_v for zero-overhead inference
image = pipe(erasers[0].prompt, num_inference_steps=steps).images[0]
pipe.unfuse_sepme()
image.save("erased.png")
print(sepme_adapter.__version__, "wrote erased.png and", [f"{e.name}.safetensors" for e in erasers])
