"""Verifiable judges: did a generation reach the approved session's final answer?

Judges are registered in the Python entry-point group ``atlasd.judges`` (name -> class) and
loaded by name with :func:`load_judge`; a policy string is never evaluated. A judge is a class
with a no-argument constructor and ``__call__(generation, reference) -> bool``. To add one,
declare it in your package's ``pyproject.toml``::

    [project.entry-points."atlasd.judges"]
    mine = "my_package.judges:MyJudge"
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from importlib.metadata import entry_points

GROUP = "atlasd.judges"

_MARKER = re.compile(r"(?:Final Answer|####)\s*[:=]?\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|-?\.\d+")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")


def _boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces allowed)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def final_answer_text(text: str) -> str:
    """The answer span: after the first ``Final Answer:``/``####``, else the last ``\\boxed{}``,
    else the whole text."""
    m = _MARKER.search(text)
    if m:
        return m.group(1).strip().splitlines()[0] if m.group(1).strip() else ""
    boxed = _boxed(text)
    return boxed if boxed is not None else text


def parse_number(text: str) -> float | None:
    """First number in ``text``: ``$1,000`` -> 1000, ``72.0`` -> 72, ``3/4`` and ``\\frac{3}{4}`` -> 0.75."""
    text = _FRAC.sub(lambda m: f"{m[1]}/{m[2]}", text)
    m = _NUMBER.search(text)
    if not m:
        return None
    token = m.group(0).replace(",", "").replace(" ", "")
    try:
        if "/" in token:
            num, den = token.split("/")
            return float(Fraction(num) / Fraction(den)) if float(den) != 0 else None
        return float(token)
    except (ValueError, ZeroDivisionError):
        return None


def extract_number(text: str) -> float | None:
    """The final answer of a GSM8K-style text as a number: the marked/boxed answer's first number,
    else the last number anywhere in the text."""
    span = final_answer_text(text)
    if span is not text:
        value = parse_number(span)
        if value is not None:
            return value
    numbers = list(_NUMBER.finditer(_FRAC.sub(lambda m: f"{m[1]}/{m[2]}", text)))
    return parse_number(numbers[-1].group(0)) if numbers else None


def normalise_text(text: str) -> str:
    return " ".join(text.strip().rstrip(".").split()).casefold()


class NumericAnswerJudge:
    """Numbers compared as numbers (``$72``, ``72.0``, ``72 dollars``, ``\\boxed{72}`` all equal 72);
    texts without a number fall back to normalised exact match of the answer span."""

    name = "numeric"

    def __call__(self, generation: str, reference: str) -> bool:
        ref = extract_number(reference)
        if ref is None:
            return ExactMatchJudge()(generation, reference)
        got = extract_number(generation)
        return got is not None and math.isclose(got, ref, rel_tol=1e-6, abs_tol=1e-9)


class ExactMatchJudge:
    """Atlas Core's rule with whitespace, a trailing period and case normalised: the answer span
    of generation and reference must be equal strings."""

    name = "exact"

    def __call__(self, generation: str, reference: str) -> bool:
        return normalise_text(final_answer_text(generation)) == normalise_text(final_answer_text(reference))


def available_judges() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=GROUP))


def load_judge(name: str):
    """Instantiate the judge registered as ``name`` in the ``atlasd.judges`` entry-point group."""
    found = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not found:
        raise ValueError(f"eval.judge: unknown judge {name!r}; registered: {', '.join(available_judges()) or 'none'}")
    judge = found[0].load()()
    if not callable(judge):
        raise TypeError(f"judge {name!r} ({found[0].value}) is not callable")
    return judge
