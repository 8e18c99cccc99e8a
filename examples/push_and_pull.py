"""Share erasers: push them to the Hub, pull them back with sepme-adapter, then use them in plain diffusers.

    python examples/push_and_pull.py vangogh.safetensors picasso.safetensors \
        --repo you/sd15-erasers --model stable-diffusion-v1-5/stable-diffusion-v1-5

Needs a Hub token with write access (`hf auth login` or HF_TOKEN); HF_ENDPOINT selects another Hub.
"""

import argparse
import os
import sys
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

import sepme_adapter


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="eraser .safetensors files")
    parser.add_argument("--repo", required=True, help="Hub repo id, e.g. you/sd15-erasers")
    parser.add_argument("--model", required=True, help="the base model the erasers were trained on")
    parser.add_argument("--prompt", default="a painting by Van Gogh")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)

    # 1. one commit: the eraser files, their LoRA exports under lora/, and a model card
    commit = sepme_adapter.push_to_hub(args.files, args.repo, commit_message="Upload SepME erasers")
    print("pushed:", commit.commit_url)

    # 2. pull with sepme-adapter: every eraser in the repo, switchable at run time
    pipe = sepme_adapter.attach(StableDiffusionPipeline.from_pretrained(args.model))
    names = pipe.load_sepme(args.repo)
    pipe.set_erased(names)
    image = pipe(args.prompt, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0)).images[0]
    image.save("erased-sepme.png")

    # 3. the same erasure with plain diffusers: the lora/ files are standard LoRAs (scale 1)
    plain = StableDiffusionPipeline.from_pretrained(args.model)
    for file in args.files:
        name = sepme_adapter.Eraser.load(file).name
        plain.load_lora_weights(args.repo, subfolder="lora", weight_name=Path(file).name, adapter_name=name)
    plain.set_adapters(names)  # adapter weights 1.0: the increments add up, exactly as set_erased
    image = plain(args.prompt, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0)).images[0]
    image.save("erased-plain-diffusers.png")
    print("wrote erased-sepme.png and erased-plain-diffusers.png; erased:", names)


if __name__ == "__main__":
    try:
        main()
    except Exception as error:  # one line, as the `sepme` command prints it; SEPME_DEBUG=1 shows the traceback
        if os.environ.get("SEPME_DEBUG"):
            raise
        from sepme_adapter.cli.errors import describe_error

        message, status = describe_error(error, argparse.Namespace())
        print(f"push_and_pull.py: error: {message}", file=sys.stderr)
        sys.exit(status)
