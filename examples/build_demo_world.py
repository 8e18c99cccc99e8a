"""Rebuild the demo world's assets (pipeline, classifiers, recipe) into src/sepme_adapter/demo/assets.

python examples/build_demo_world.py            # about 30 CPU minutes on one thread
python examples/build_demo_world.py --quick --out /tmp/demo-assets   # a few steps of everything (minutes)
python examples/build_demo_world.py --model flux   # the FLUX world (needs the SD world; about an hour)
python examples/build_demo_world.py --quick --out /tmp/demo-assets $SMOKE   # two steps of each: checks it runs

with SMOKE="--vae-steps 2 --unet-steps 2 --unet-warmup 1 --classifier-steps 2 --eval-seeds 1 --eval-extra-seeds 0
--vae-batch 4 --unet-batch 4 --classifier-batch 4" (the recipe's fields are flags).
"""

from sepme_adapter.demo.build import main

if __name__ == "__main__":
    main()
