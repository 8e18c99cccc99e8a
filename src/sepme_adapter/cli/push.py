"""Upload eraser files to a Hub repo (created if needed) in one commit, with plain-diffusers LoRA exports under
lora/ and a generated README.md model card.
"""

from __future__ import annotations

import argparse
from typing import Any

from .options import add_eraser_files


def register(parser: argparse.ArgumentParser, argv: Any = ()) -> None:
    parser.set_defaults(func=run)
    add_eraser_files(parser)
    parser.add_argument("repo_id", metavar="REPO_ID", help="the Hub repo, e.g. someone/sd15-erasers")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`)")
    parser.add_argument("-m", "--message", default=None, help="commit message")
    parser.add_argument("--no-lora", action="store_true", help="do not upload the lora/ exports")


def run(args: argparse.Namespace) -> int:
    """Offline, refused, or unauthorised pushes end in one line (`cli.errors.describe_error`)."""
    from ..hub import push_to_hub

    info = push_to_hub(args.files, args.repo_id, private=args.private, token=args.token,
                       commit_message=args.message, include_lora=not args.no_lora)
    print(f"pushed {len(args.files)} eraser(s) to {args.repo_id}: {info.commit_url}")
    return 0
