"""The retain distribution: prompts an eraser must leave alone, drawn from the model itself.

An eraser is exact on the prompts it is told about (Eq. 8) and, by itself, unconstrained everywhere
else. Containment needs a sample of "everything else", and the model carries one: its tokenizer's
vocabulary. `retain_prompts` draws

- **vocabulary prompts**: random 1-5-word prompts from the tokenizer's own words, and
- **stems**: each of the concept's prompts with its name replaced by other vocabulary words
  ("a painting by X", "X style" for many X), so an eraser learns the name, not the phrasing
  every other concept shares,

never containing the name of a concept being erased. The sample is split in two: the training part
shapes the basis (`basis.contrastive_basis`) and the containment term; the held-out part is never
trained on and measures the collateral certificate (`certificate.collateral_certificate`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

SPECIAL = re.compile(r"^[a-z][a-z'-]*[a-z]$")
MIN_WORD = 3  # shorter vocabulary entries are mostly word pieces


def vocabulary_words(tokenizer: Any, exclude: Sequence[str] = ()) -> list[str]:
    """Whole words of a CLIP-style tokenizer's vocabulary (entries ending in `</w>`, letters only, at least 3
    long), sorted, without any word that contains or is contained in an excluded name."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else dict(tokenizer)
    banned = [e.lower() for e in exclude if e]
    words = set()
    for token in vocab:
        if not token.endswith("</w>"):
            continue
        word = token[: -len("</w>")].lower()
        if len(word) < MIN_WORD or not SPECIAL.match(word):
            continue
        if any(b in word or word in b for b in banned):
            continue
        words.add(word)
    return sorted(words)


def name_span(prompt: str, name: str) -> tuple[int, int] | None:
    """Where `name` occurs in `prompt` (case-insensitive; `_` / `-` in the name read as spaces), or None."""
    for variant in dict.fromkeys((name, name.replace("_", " "), name.replace("-", " "))):
        index = prompt.lower().find(variant.lower().strip())
        if variant.strip() and index >= 0:
            return index, index + len(variant.strip())
    return None


def stems(prompt: str, name: str) -> list[str]:
    """The prompt with its name cut out as a template (`"a painting by {}"`); when the name is not spelled in the
    prompt, one template per word of the prompt (each word in turn replaced)."""
    span = name_span(prompt, name)
    if span is not None:
        return [prompt[: span[0]] + "{}" + prompt[span[1]:]]
    words = prompt.split()
    return [" ".join(words[:i] + ["{}"] + words[i + 1:]) for i in range(len(words))] if len(words) > 1 else []


def anchor_prompt(prompt: str, name: str) -> str:
    """The prompt with its name cut out (`"a painting by pimsa"` -> `"a painting by"`): what the prompt says
    without the concept, the anchor of `--objective anchor`; the blank prompt when the name is not spelled."""
    span = name_span(prompt, name)
    return "" if span is None else " ".join((prompt[: span[0]] + prompt[span[1]:]).split())


def first_row_after(tokenizer: Any, prompt: str, name: str) -> int | None:
    """The index of the first text-encoder row after `name` in `prompt` (row 0 is the start token), or None when
    the name is not spelled. With a causal encoder these rows (the words after the name, the end and padding
    tokens) carry the name mixed with whatever follows it: in "a NAME by OTHER", OTHER's own row."""
    span = name_span(prompt, name)
    if span is None:
        return None
    ids = tokenizer(prompt[: span[1]], truncation=False)["input_ids"]
    return len(ids) - 1  # the prefix's tokens with the start token, less its end token


def fits(tokenizer: Any, prompt: str) -> bool:
    """Whether the tokenizer encodes `prompt` without truncating it (start and end tokens included)."""
    limit = getattr(tokenizer, "model_max_length", None)
    if not limit or limit > 100_000:
        return True
    return len(tokenizer(prompt, truncation=False)["input_ids"]) <= limit


@dataclass(frozen=True)
class RetainSet:
    """Prompts to leave alone: `train` shapes the basis and the containment term, `held_out` is only measured.
    `contexts`: per concept name, the name said in random vocabulary contexts (its own paired retain prompts,
    the same contexts with another word, are in `train`)."""

    train: tuple[str, ...]
    held_out: tuple[str, ...]
    contexts: dict[str, tuple[str, ...]] = field(default_factory=dict)


def retain_prompts(tokenizer: Any, concepts: Sequence[tuple[str, Sequence[str]]], user: Sequence[str] = (),
                   vocabulary: int = 400, stems_per_prompt: int = 60, held_out: int = 400, seed: int = 0,
                   max_words: int = 5, contexts: int = 0) -> RetainSet:
    """The retain distribution for erasing `concepts` (`(name, prompts)` pairs), drawn once from `seed`.

    `vocabulary` random 1-`max_words`-word prompts and `stems_per_prompt` substitutes in each concept prompt's
    stem go to the training part, the user's prompts too; `held_out` more of each kind, disjoint from training,
    go to the held-out part. No prompt spells a concept's name or equals one of its prompts. `contexts` > 0:
    for each concept whose prompts spell its name, that many random vocabulary prompts with the name inserted
    at a random place (`RetainSet.contexts`), and the same prompts with a random vocabulary word in its place
    (in `train`): what the name itself adds to any context, for the contrastive basis."""
    names = [name for name, _ in concepts]
    words = vocabulary_words(tokenizer, exclude=names)
    if not words:
        return RetainSet(tuple(user), ())
    rng = random.Random(seed * 7_919 + 17)
    own = {p.lower() for _, prompts in concepts for p in prompts}

    def draw_vocabulary(n: int) -> list[str]:
        return [" ".join(rng.choice(words) for _ in range(rng.randint(1, max_words))) for _ in range(n)]

    templates = list(dict.fromkeys(s for name, prompts in concepts for p in prompts for s in stems(p, name)))

    def draw_stems(n: int) -> list[str]:
        return [t.format(rng.choice(words)) for t in templates for _ in range(n)]

    said: dict[str, list[str]] = {}
    paired: list[str] = []
    for name, prompts in concepts:
        spans = [(p, name_span(p, name)) for p in prompts]
        spelled = next((p[a:b] for p, (a, b) in ((p, s) for p, s in spans if s is not None)), None)
        if spelled is None or contexts <= 0:
            continue
        for _ in range(contexts):
            around = draw_vocabulary(1)[0].split()
            at = rng.randint(0, len(around))
            said.setdefault(name, []).append(" ".join(around[:at] + [spelled] + around[at:]))
            paired.append(" ".join(around[:at] + [rng.choice(words)] + around[at:]))
    train = draw_vocabulary(vocabulary) + draw_stems(stems_per_prompt) + paired + list(user)
    seen = {p.lower() for p in train}
    extra = [p for p in draw_vocabulary(held_out) + draw_stems(max(1, held_out // max(len(templates), 1) // 2))
             if p.lower() not in seen]

    def clean(prompts: list[str]) -> tuple[str, ...]:
        kept = dict.fromkeys(" ".join(p.split()) for p in prompts)
        return tuple(p for p in kept if p and p.lower() not in own and fits(tokenizer, p))

    fit = {name: tuple(p for p in prompts if fits(tokenizer, p)) for name, prompts in said.items()}
    return RetainSet(clean(train), clean(extra), {name: p for name, p in fit.items() if p})
