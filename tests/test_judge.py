"""The answer normaliser and the judges loaded through the `atlasd.judges` entry points."""

from __future__ import annotations

import pytest

from trainers.judge import ExactMatchJudge, NumericAnswerJudge, extract_number, load_judge


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48/2 = 24 clips in May. 48 + 24 = 72.\n#### 72", 72),
        ("So the total is $72.", 72),
        ("Final Answer: $1,000", 1000),
        ("Final Answer: 72 dollars", 72),
        ("The answer is \\boxed{72}.", 72),
        ("\\boxed{\\frac{3}{4}}", 0.75),
        ("Final Answer: 72.0", 72),
        ("final answer = -5", -5),
        ("#### 3/4", 0.75),
        ("He pays 5 + 3 = 8 dollars, so 8.", 8),
        ("Final Answer: 0.5", 0.5),
        ("it costs .5 dollars", 0.5),
        ("Step 1: 2 + 2 = 4\nFinal Answer: 4\nThen some rambling 99", 4),
        ("no digits here", None),
    ],
)
def test_extract_number(text, expected):
    got = extract_number(text)
    assert got == pytest.approx(expected) if expected is not None else got is None


@pytest.mark.parametrize(
    ("generation", "reference", "ok"),
    [
        ("#### $72", "72", True),
        ("\\boxed{72}", "72", True),
        ("Final Answer: 72.0", "72", True),
        ("Final Answer: 1,000", "1000", True),
        ("Final Answer: 72 dollars", "#### 72", True),
        ("Final Answer: 73", "72", False),
        ("I think 72 then 71", "72", False),  # the last number counts
        ("", "72", False),
        ("Final Answer: Paris.", "paris", True),  # no number: normalised text
        ("Final Answer: Rome", "Paris", False),
    ],
)
def test_numeric_judge(generation, reference, ok):
    assert NumericAnswerJudge()(generation, reference) is ok


def test_exact_judge_is_strict_about_number_formats():
    judge = ExactMatchJudge()
    assert judge("Final Answer: 72.", "72")
    assert not judge("Final Answer: $72", "72")
    assert not judge("Final Answer: 72.0", "72")


def test_judges_load_through_entry_points():
    assert isinstance(load_judge("numeric"), NumericAnswerJudge)
    assert isinstance(load_judge("exact"), ExactMatchJudge)
    with pytest.raises(ValueError, match="unknown judge 'os.system'.*numeric"):
        load_judge("os.system")
