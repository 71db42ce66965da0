"""Whether a model's answer reads as English about Python: the check that tells a trained model from gibberish."""

from __future__ import annotations

import re
from functools import cache
from typing import Any

# Short words any sentence of English prose about Python is bound to use.
FUNCTION_WORDS = {"the", "is", "a", "an", "of", "to", "in", "and", "or", "be", "are", "that", "it", "as", "by", "if"}


@cache
def documentation_words() -> frozenset[str]:
    """Every word of the CPython documentation that ships with Python (``pydoc_data.topics``)."""
    from pydoc_data.topics import topics

    return frozenset(w.lower() for text in topics.values() for w in re.findall(r"[A-Za-z]+", text))


def english_problems(text: str, min_words: int = 10, known_share: float = 0.9) -> list[str]:
    """Why ``text`` does not read as English about Python; empty when it does.

    Words must be real words (found in the documentation), varied, and joined by the
    small words of English sentences. A random-weight model strings subword pieces
    together and fails all three.
    """
    words = [w.lower() for w in re.findall(r"[A-Za-z]+", text)]
    problems = []
    if len(words) < min_words:
        problems.append(f"only {len(words)} words")
    known = [w for w in words if w in documentation_words()]
    if len(known) < known_share * len(words):
        problems.append(f"only {len(known)} of {len(words)} words are words of the documentation")
    if len(set(words)) < min(6, min_words):
        problems.append(f"only {len(set(words))} different words")
    # A one-line answer may hold a single one ("Return the number of items.").
    needed = 2 if len(words) >= 10 else 1
    if len(FUNCTION_WORDS.intersection(words)) < needed:
        problems.append(f"fewer than {needed} of the small words of English sentences")
    return problems


def notebook_answers(nb: Any) -> list[tuple[str, str]]:
    """(cell source, answer text) of each ``%%mlx`` cell of an executed notebook that asks in prose
    (not ``-f code`` or ``-f json``, which ask for something else, nor ``--logprobs``, whose text
    is followed by a table of tokens); the answer is the cell's first output carrying the
    answer's ``mlx`` metadata (the footer is the second)."""
    found = []
    for cell in nb.cells:
        first_line = cell.source.splitlines()[0] if cell.cell_type == "code" and cell.source else ""
        if not first_line.startswith("%%mlx") or re.search(r"-f (code|json)|--logprobs", first_line):
            continue
        answers = [o for o in cell.get("outputs", []) if "mlx" in o.get("metadata", {})]
        found.append((cell.source, answers[0]["data"]["text/plain"] if answers else ""))
    return found
