"""A word-level CLIP tokenizer whose vocabulary the package writes itself.

`transformers.CLIPTokenizer` needs a `vocab.json` and a `merges.txt`. We write merges that
build every listed word from any split of it, so each known word is one token (as in CLIP's
real BPE for common words) and unknown words fall back to characters.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def write_word_tokenizer(folder: str | Path, words: Iterable[str], model_max_length: int) -> CLIPTokenizer:
    """Write `vocab.json`, `merges.txt` and the tokenizer config into `folder`; return the tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ".,'-!?")
    vocab: dict[str, int] = {}
    for token in [*chars, *(c + "</w>" for c in chars)]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    merged_pairs: set[str] = set()
    for word in sorted({w.lower() for w in words}):
        if not word or any(c not in chars for c in word):
            raise ValueError(f"tokenizer words must use {''.join(chars)!r}; got {word!r}")
        # A merge for every split of every substring: whichever merges BPE applies first
        # (other words' merges included), two neighbouring pieces of this word can always
        # merge again, so the word always ends as one token.
        end = len(word)
        for length in range(2, end + 1):
            for start in range(end - length + 1):
                for cut in range(start + 1, start + length):
                    left = word[start:cut]
                    right = word[cut : start + length] + ("</w>" if start + length == end else "")
                    merge = f"{left} {right}"
                    if merge not in merged_pairs:
                        merged_pairs.add(merge)
                        merges.append(merge)
                    vocab.setdefault(left + right, len(vocab))
    for token in SPECIAL_TOKENS:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(
        folder, model_max_length=model_max_length, pad_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(folder)
    return tokenizer
