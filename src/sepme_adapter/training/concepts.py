"""A concept to erase or keep, and the checks every trainer runs on the concepts it is given."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import TrainingError

# The standard phrasings erasure work uses (ESD's and the paper's prompt files): `--templates style|object`.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "style": ("a painting by {}", "in the style of {}", "{} style", "an artwork by {}"),
    "object": ("a {}", "a photo of a {}", "a picture of a {}", "an image of a {}"),
}


@dataclass(frozen=True)
class Concept:
    """A concept to erase or to keep: a name (the adapter name) and its prompts (default: the name).

    `prompt` is the first of `prompts`; `Concept("vangogh", "a painting by van gogh")` and
    `Concept("vangogh", prompts=["a painting by van gogh", "van gogh style"])` both work.
    """

    name: str
    prompt: str = ""
    prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str):
            raise TrainingError(f"Concept.prompts must be a list of prompts, got the string {self.prompts!r}")
        prompts = tuple(dict.fromkeys(p for p in (self.prompt, *self.prompts) if p)) or (self.name,)
        object.__setattr__(self, "prompts", prompts)
        object.__setattr__(self, "prompt", prompts[0])

    @classmethod
    def parse(cls, text: str | Concept | tuple[str, str]) -> Concept:
        """`"vangogh=a painting by van gogh"`, `"Van Gogh"` (prompt = name) or `(name, prompt)`."""
        if isinstance(text, Concept):
            return text
        if isinstance(text, tuple):
            return cls(*text)
        name, _, prompt = text.partition("=")
        name, prompt = name.strip(), prompt.strip()
        if not name:
            raise TrainingError(f"concept {text!r} has an empty name; write NAME or NAME=PROMPT")
        return cls(name, prompt or name)

    @classmethod
    def from_templates(cls, name: str, kind: str, word: str | None = None) -> Concept:
        """`name` phrased with every template of `kind` (`style` or `object`); `word` defaults to the name."""
        if kind not in TEMPLATES:
            raise TrainingError(f"templates must be one of {sorted(TEMPLATES)}, got {kind!r}")
        return cls(name, prompts=tuple(t.format(word or name) for t in TEMPLATES[kind]))


def derived_phrasings(concept: Concept, keep: Callable[[str], bool] = lambda prompt: True) -> Concept:
    """One prompt is enough to start: a concept given by one prompt that spells its name also gets the name in
    the standard templates (`TEMPLATES`) of its kind, the kind read off the prompt (its stem is an object or a
    style template's), both kinds when the stem is neither. A concept with several prompts, or whose prompt does
    not spell its name, is returned as it is."""
    if len(concept.prompts) != 1 or concept.name.lower() not in concept.prompt.lower():
        return concept
    index = concept.prompt.lower().index(concept.name.lower())
    word = concept.prompt[index: index + len(concept.name)]
    stem = " ".join((concept.prompt[:index] + "{}" + concept.prompt[index + len(word):]).split())
    kinds = [kind for kind, templates in TEMPLATES.items() if stem in templates] or list(TEMPLATES)
    derived = [t.format(word) for k in kinds for t in TEMPLATES[k]]
    return Concept(concept.name, prompts=(concept.prompt, *(p for p in derived if keep(p))))


def template_stems(concepts: Sequence[Concept]) -> list[str]:
    """The phrasings around the names: each concept's prompts with its name removed (where the prompt spells the
    name), then the stems of the standard style templates ("a painting by", "in the style of", "style", ...),
    without duplicates, blanks or prompts of the concepts themselves."""
    stems = []
    for concept in concepts:
        for prompt in concept.prompts:
            if concept.name.lower() in prompt.lower():
                index = prompt.lower().index(concept.name.lower())
                stems.append(" ".join((prompt[:index] + prompt[index + len(concept.name):]).split()))
    stems += [" ".join(t.replace("{}", "").split()) for t in TEMPLATES["style"]]
    own = {p for c in concepts for p in c.prompts}
    return [s for s in dict.fromkeys(stems) if s and s not in own]


def read_concepts_csv(path: str | Path) -> list[Concept]:
    """Concepts from a CSV file with columns `name,prompt` (a header row; repeated names add prompts)."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"concepts file {str(path)!r} does not exist")
    try:  # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the first column's name
        with open(path, newline="", encoding="utf-8-sig") as stream:
            reader = csv.reader(stream, skipinitialspace=True)
            first = next(reader, [])
            header = [column.strip().lower() for column in first]
            rows = [dict(zip(header, row)) for row in reader if any(cell.strip() for cell in row)]
    except UnicodeDecodeError as error:
        raise TrainingError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8 "
                            f"CSV") from None
    if not {"name", "prompt"} <= set(header):
        found = f"its first row is {','.join(first)!r}" if first else "it is empty"
        raise TrainingError(f"{path}: expected a header row 'name,prompt' and one row per prompt, but {found}")
    if not rows:
        raise TrainingError(f"{path}: the header 'name,prompt' is followed by no rows")
    bad = [i + 2 for i, row in enumerate(rows) if not row.get("name", "").strip() or not row.get("prompt", "").strip()]
    if bad:
        raise TrainingError(f"{path}: rows {bad} have an empty name or prompt")
    return merge_concepts([Concept(row["name"].strip(), row["prompt"].strip()) for row in rows])


def merge_concepts(concepts: Sequence[Concept]) -> list[Concept]:
    """Concepts that share a name become one concept with all their prompts (first-seen order)."""
    merged: dict[str, list[str]] = {}
    for concept in concepts:
        merged.setdefault(concept.name, []).extend(concept.prompts)
    return [Concept(name, prompts=tuple(prompts)) for name, prompts in merged.items()]


def prepare_concepts(
    concepts: Sequence[str | Concept | tuple[str, str]],
    known: Sequence[str | Concept | tuple[str, str]] | None,
    protected: Sequence[str],
) -> tuple[list[Concept], list[Concept], list[str]]:
    """Parse the concepts to erase and the known ones, and refuse sets no basis can serve."""
    parsed = merge_concepts([Concept.parse(c) for c in concepts])
    parsed_known = merge_concepts([Concept.parse(k) for k in (known or [])])
    protected = list(protected)
    check_concepts(parsed, parsed_known, protected)
    return parsed, parsed_known, protected


def check_concepts(concepts: list[Concept], known: list[Concept], protected: list[str]) -> None:
    """Unique names; no known concept with an erased prompt; erased prompts distinct, not blank or protected."""
    if not concepts:
        raise TrainingError("no concept to erase: pass at least one concept")
    names = [c.name for c in concepts] + [k.name for k in known]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TrainingError(f"concept names must be unique (each is an adapter name); repeated: {duplicates}; "
                            f"a concept to erase must not also be listed as known")
    erase_prompts = {p: c.name for c in concepts for p in c.prompts}
    for other in known:
        for prompt in other.prompts:
            if prompt in erase_prompts:
                raise TrainingError(f"known concept {other.name!r} has the same prompt as concept "
                                    f"{erase_prompts[prompt]!r} ({prompt!r}): its basis would "
                                    f"exclude the very prompt to erase")
    prompts = [p for c in concepts for p in c.prompts]
    if len(set(prompts)) != len(prompts):
        raise TrainingError(f"two concepts share a prompt: {prompts}")
    for c in concepts:
        for prompt in c.prompts:
            if not prompt.strip() or prompt in protected:
                raise TrainingError(f"concept {c.name!r} has prompt {prompt!r}, which is blank or protected: "
                                    f"it cannot be erased without changing what must stay exact")
