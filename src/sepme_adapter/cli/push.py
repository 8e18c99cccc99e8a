"""Upload eraser files to a Hub repo (created if needed) in one commit, with plain-diffusers LoRA exports under
lora/ and a generated README.md model card.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..hub import push_to_hub
from .options import add_eraser_files, new_command


def register(subparsers: Any) -> None:
    parser = new_command(subparsers, "push", __doc__, run,
                         help="upload eraser files, LoRA exports and a model card to a Hugging Face Hub repo")
    add_eraser_files(parser)
    parser.add_argument("repo_id", metavar="REPO_ID", help="the Hub repo, e.g. someone/sd15-erasers")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`)")
    parser.add_argument("-m", "--message", default=None, help="commit message")
    parser.add_argument("--no-lora", action="store_true", help="do not upload the lora/ exports")


def run(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError  # huggingface_hub is imported only to push

    try:
        info = push_to_hub(args.files, args.repo_id, private=args.private, token=args.token,
                           commit_message=args.message, include_lora=not args.no_lora)
    except HfHubHTTPError as error:
        print(f"sepme push: error: the Hub refused the upload: {error}", file=sys.stderr)
        return 1
    print(f"pushed {len(args.files)} eraser(s) to {args.repo_id}: {info.commit_url}")
    return 0
