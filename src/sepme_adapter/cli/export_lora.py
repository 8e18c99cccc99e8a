"""Write each eraser as a standard diffusers/PEFT LoRA file: lora_A = S_p^T, lora_B = beta * w, scale 1.
load_sepme reads these files too.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..hub import export_lora
from .options import add_eraser_files, new_command


def register(subparsers: Any) -> None:
    parser = new_command(subparsers, "export-lora", __doc__, run,
                         help="write erasers as standard diffusers LoRA files (pipe.load_lora_weights)")
    add_eraser_files(parser)
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="output folder (one file per eraser, same names), or a .safetensors file for one eraser")


def run(args: argparse.Namespace) -> int:
    for path in export_lora(args.files, args.output):
        print(path)
    return 0
