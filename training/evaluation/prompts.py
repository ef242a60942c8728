"""The evaluation prompts (ConsistentID paper, Table II) and the class word put into them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROMPTS_FILE = Path(__file__).with_name("prompts.txt")
PLACEHOLDER = "<class>"

# The class word comes from the reference's estimated gender (fgid's attribute stage writes
# "male" / "female"). Age is not used: estimated ages are too rough to pick boy/girl reliably,
# and the paper's table reports man/woman prompts. Unknown gender falls back to "person".
CLASS_WORDS = {"male": "man", "female": "woman"}
UNKNOWN_CLASS_WORD = "person"


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt: its position in the file, category and `<class>` template."""

    index: int
    category: str
    template: str

    def text(self, class_word: str) -> str:
        return self.template.replace(PLACEHOLDER, class_word)


def class_word(gender: str | None) -> str:
    """'man' for male, 'woman' for female, 'person' when the gender is unknown."""
    return CLASS_WORDS.get((gender or "").lower(), UNKNOWN_CLASS_WORD)


def parse_prompts(text: str) -> list[Prompt]:
    """`category<TAB>template` lines; blank lines and `#` comments are skipped."""
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        category, sep, template = line.partition("\t")
        if not sep or not category.strip() or PLACEHOLDER not in template:
            raise ValueError(f"prompt line {number}: expected 'category<TAB>... {PLACEHOLDER} ...'")
        prompts.append(Prompt(len(prompts), category.strip(), template.strip()))
    return prompts


def load_prompts(
    path: str | Path | None = None,
    categories: list[str] | None = None,
    per_category: int | None = None,
) -> list[Prompt]:
    """The prompts of `path` (default: the paper's 45), optionally only some categories and the
    first `per_category` of each. Indexes stay those of the file, so results stay comparable."""
    prompts = parse_prompts(Path(path or PROMPTS_FILE).read_text(encoding="utf-8"))
    if categories:
        unknown = set(categories) - {p.category for p in prompts}
        if unknown:
            raise ValueError(f"no prompts in categories {sorted(unknown)}")
        prompts = [p for p in prompts if p.category in categories]
    if per_category is not None:
        seen: dict[str, int] = {}
        kept = []
        for prompt in prompts:
            seen[prompt.category] = seen.get(prompt.category, 0) + 1
            if seen[prompt.category] <= per_category:
                kept.append(prompt)
        prompts = kept
    return prompts
