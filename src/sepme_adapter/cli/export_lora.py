"""Write each eraser as a standard LoRA file: lora_A = S_p^T (rank r: A S_p^T), lora_B = beta * w, scale 1.
--format diffusers (default): PEFT keys for pipe.load_lora_weights; --format kohya: lora_unet_... keys
(lora_down / lora_up / alpha) for ComfyUI and Automatic1111 (diffusers loads them too). load_sepme reads both.
"""

from __future__ import annotations

import argparse
from typing import Any

from .options import add_eraser_files

LORA_FORMATS = ("diffusers", "kohya")  # = hub.LORA_FORMATS (a test checks)


def register(parser: argparse.ArgumentParser, argv: Any = ()) -> None:
    parser.set_defaults(func=run)
    add_eraser_files(parser)
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="output folder (one file per eraser, same names), or a .safetensors file for one eraser")
    parser.add_argument("--format", choices=LORA_FORMATS, default="diffusers",
                        help="diffusers: PEFT keys (pipe.load_lora_weights); kohya: lora_unet_... keys for ComfyUI "
                             "and Automatic1111 (default diffusers)")


def run(args: argparse.Namespace) -> int:
    from ..hub import export_lora

    for path in export_lora(args.files, args.output, args.format):
        print(path)
    return 0
