"""A concept to erase or keep, and the checks every trainer runs on the concepts it is given."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import TrainingError


@dataclass(frozen=True)
class Concept:
    """A concept to erase or to keep: a name (the adapter name) and its prompt (default: the name)."""

    name: str
    prompt: str

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


def prepare_concepts(
    concepts: Sequence[str | Concept | tuple[str, str]],
    known: Sequence[str | Concept | tuple[str, str]] | None,
    protected: Sequence[str],
) -> tuple[list[Concept], list[Concept], list[str]]:
    """Parse the concepts to erase and the known ones, and refuse sets no basis can serve."""
    parsed = [Concept.parse(c) for c in concepts]
    parsed_known = [Concept.parse(k) for k in (known or [])]
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
    erase_prompts = {c.prompt: c.name for c in concepts}
    for other in known:
        if other.prompt in erase_prompts:
            raise TrainingError(f"known concept {other.name!r} has the same prompt as concept "
                                f"{erase_prompts[other.prompt]!r} ({other.prompt!r}): its null space would "
                                f"exclude the very prompt to erase")
    prompts = [c.prompt for c in concepts]
    if len(set(prompts)) != len(prompts):
        raise TrainingError(f"two concepts share a prompt: {prompts}")
    for c in concepts:
        if not c.prompt.strip() or c.prompt in protected:
            raise TrainingError(f"concept {c.name!r} has prompt {c.prompt!r}, which is blank or protected: "
                                f"it cannot be erased without changing what must stay exact")
