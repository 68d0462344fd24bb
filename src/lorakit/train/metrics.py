"""Held-out metrics for lorakit's tasks, in pure Python (plain lists in, float out).

Classification (predicted class ids against label ids):
    accuracy   fraction of predictions equal to the label.
    f1         binary (num_classes == 2): F1 of class 1, as scikit-learn's ``f1_score(average="binary")``;
               more classes: the unweighted mean of the per-class F1 over classes 0..num_classes-1
               (``average="macro", labels=range(num_classes), zero_division=0``). A class with no true and
               no predicted example scores 0, as scikit-learn with ``zero_division=0``.
    mcc        Matthews correlation coefficient, multi-class form (scikit-learn's ``matthews_corrcoef``);
               GLUE's metric for CoLA.

Regression (predicted scores against targets):
    pearson    Pearson's linear correlation.
    spearman   Spearman's rank correlation: Pearson of the ranks, tied values sharing their mean rank
               (``scipy.stats.rankdata(method="average")``). Pearson and Spearman are GLUE's metrics for STS-B.
    mse        mean squared error (reported by ``regression_metrics``).

Generation (generated text against a reference):
    whole_completion_match   the generation's first lines (as many as the reference has), stripped, equal the
                             reference's lines.
    answers_match            the answers pulled out of both texts by an answer pattern are equal after
                             normalisation (GSM8K's "#### 72", the last number in the text, or a user regex).

Undefined values are 0.0, never NaN and never an error: a correlation of fewer than 2 points or of a
constant input (where scipy gives NaN or raises), an MCC whose denominator is zero (as scikit-learn),
and every metric of an empty input (where scikit-learn raises). Sequences of different lengths raise
``ValueError``.

Answer patterns: ``compile_answer_pattern(spec)`` turns a built-in name (``BUILTIN_ANSWER_PATTERNS``) or a
user regex into an ``AnswerPattern``: the compiled regex, whether the last match counts (``last-number``)
or the first (everything else), and a name for messages. ``extract_answer`` and ``answers_match`` take an
``AnswerPattern`` or the spec string itself.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from decimal import Decimal

__all__ = [
    "BUILTIN_ANSWER_PATTERNS",
    "CLASSIFY_METRICS",
    "REGRESS_METRICS",
    "AnswerPattern",
    "accuracy",
    "answers_match",
    "classification_metrics",
    "compile_answer_pattern",
    "extract_answer",
    "f1",
    "matthews",
    "normalize_answer",
    "pearson",
    "regression_metrics",
    "spearman",
    "whole_completion_match",
]

CLASSIFY_METRICS = ("accuracy", "f1", "mcc")
REGRESS_METRICS = ("pearson", "spearman")


def _check_lengths(a: Sequence, b: Sequence, what: str) -> int:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions but {len(b)} {what}: they must pair up one to one")
    return len(a)


# --- classification ---------------------------------------------------------------------------------------


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to their label (0.0 for no examples)."""
    n = _check_lengths(predictions, labels, "labels")
    return sum(p == y for p, y in zip(predictions, labels)) / n if n else 0.0


def _class_f1(predictions: Sequence[int], labels: Sequence[int], cls: int) -> float:
    tp = sum(p == cls and y == cls for p, y in zip(predictions, labels))
    fp = sum(p == cls and y != cls for p, y in zip(predictions, labels))
    fn = sum(p != cls and y == cls for p, y in zip(predictions, labels))
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def f1(predictions: Sequence[int], labels: Sequence[int], num_classes: int) -> float:
    """F1 score: of class 1 when ``num_classes == 2``, else the macro average over classes 0..num_classes-1.

    A class never predicted and never true scores 0 (scikit-learn's ``zero_division=0``); ids outside
    0..num_classes-1 count only as wrong predictions of the other classes.
    """
    _check_lengths(predictions, labels, "labels")
    if num_classes < 2:
        raise ValueError(f"f1 needs num_classes >= 2, got {num_classes}")
    if num_classes == 2:
        return _class_f1(predictions, labels, 1)
    return sum(_class_f1(predictions, labels, c) for c in range(num_classes)) / num_classes


def matthews(predictions: Sequence[Hashable], labels: Sequence[Hashable]) -> float:
    """Matthews correlation coefficient over all classes present (scikit-learn's ``matthews_corrcoef``).

    1 for perfect predictions, -1 for perfectly inverted binary ones, 0.0 when undefined (all predictions
    or all labels one class, or no examples).
    """
    n = _check_lengths(predictions, labels, "labels")
    true_counts, pred_counts = Counter(labels), Counter(predictions)
    correct = sum(p == y for p, y in zip(predictions, labels))
    # Integer arithmetic up to the final division: exact for any size.
    cov_tp = correct * n - sum(true_counts[k] * pred_counts[k] for k in true_counts)
    cov_tt = n * n - sum(c * c for c in true_counts.values())
    cov_pp = n * n - sum(c * c for c in pred_counts.values())
    if cov_tt == 0 or cov_pp == 0:
        return 0.0
    return cov_tp / math.sqrt(cov_tt * cov_pp)


def classification_metrics(predictions: Sequence[int], labels: Sequence[int], num_classes: int) -> dict[str, float]:
    """{"accuracy", "f1", "mcc"} (the names in ``CLASSIFY_METRICS``) of one set of predictions."""
    return {
        "accuracy": accuracy(predictions, labels),
        "f1": f1(predictions, labels, num_classes),
        "mcc": matthews(predictions, labels),
    }


# --- regression -------------------------------------------------------------------------------------------


def pearson(predictions: Sequence[float], targets: Sequence[float]) -> float:
    """Pearson correlation; 0.0 when undefined (fewer than 2 points, or either side constant)."""
    n = _check_lengths(predictions, targets, "targets")
    if n < 2 or all(x == predictions[0] for x in predictions) or all(y == targets[0] for y in targets):
        return 0.0
    mean_x, mean_y = math.fsum(predictions) / n, math.fsum(targets) / n
    dx = [x - mean_x for x in predictions]
    dy = [y - mean_y for y in targets]
    sxx, syy = math.fsum(d * d for d in dx), math.fsum(d * d for d in dy)
    if sxx == 0.0 or syy == 0.0:
        return 0.0
    r = math.fsum(a * b for a, b in zip(dx, dy)) / (math.sqrt(sxx) * math.sqrt(syy))
    return max(-1.0, min(1.0, r))


def _average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, each run of tied values given the mean of the ranks it spans."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            ranks[i] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(predictions: Sequence[float], targets: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson of average ranks); 0.0 when undefined, as ``pearson``."""
    _check_lengths(predictions, targets, "targets")
    return pearson(_average_ranks(predictions), _average_ranks(targets))


def regression_metrics(predictions: Sequence[float], targets: Sequence[float]) -> dict[str, float]:
    """{"pearson", "spearman", "mse"} of one set of predictions (mse is 0.0 for no examples)."""
    n = _check_lengths(predictions, targets, "targets")
    return {
        "pearson": pearson(predictions, targets),
        "spearman": spearman(predictions, targets),
        "mse": math.fsum((p - t) ** 2 for p, t in zip(predictions, targets)) / n if n else 0.0,
    }


# --- generation -------------------------------------------------------------------------------------------

# A number in running text: optional minus (not when glued to a preceding word/digit, so "5-3" holds 5 and 3),
# optional "$", digits with well-formed thousands separators or plain digits, optional decimals.
_NUMBER = r"(?:(?<!\w)-)?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"

BUILTIN_ANSWER_PATTERNS: dict[str, str] = {
    "gsm8k": r"####\s*(" + _NUMBER + ")",  # GSM8K's convention: the final answer follows "####"
    "last-number": _NUMBER,  # the last number in the text
}
_TAKE_LAST = frozenset({"last-number"})


@dataclass(frozen=True)
class AnswerPattern:
    """How to pull an answer out of text: group 1 of ``regex`` if it has one, else the whole match;
    the last match when ``take_last``, else the first. ``name`` is the built-in name or the user's regex."""

    regex: re.Pattern
    take_last: bool
    name: str


@functools.lru_cache(maxsize=64)
def compile_answer_pattern(spec: str) -> AnswerPattern:
    """A built-in name from ``BUILTIN_ANSWER_PATTERNS``, or a user regex with at most one capturing group.

    Raises ``ValueError`` (one line, naming the pattern) for an empty or invalid regex or one with 2+ groups.
    """
    if spec in BUILTIN_ANSWER_PATTERNS:
        return AnswerPattern(re.compile(BUILTIN_ANSWER_PATTERNS[spec]), spec in _TAKE_LAST, spec)
    hint = f"use a built-in ({', '.join(BUILTIN_ANSWER_PATTERNS)}) or a regex with at most one capturing group"
    if not spec:
        raise ValueError(f"answer pattern {spec!r} is empty: {hint}")
    try:
        regex = re.compile(spec)
    except re.error as e:
        raise ValueError(
            f"answer pattern {spec!r} is not a valid regular expression ({e.msg} at position {e.pos}): {hint}"
        ) from None
    if regex.groups > 1:
        raise ValueError(
            f"answer pattern {spec!r} has {regex.groups} capturing groups: {hint} (write others as (?:...))"
        )
    return AnswerPattern(regex, False, spec)


def normalize_answer(answer: str) -> str:
    """Stripped text; a number in canonical form ("1,234.00" -> "1234", "-0.50" -> "-0.5", "$3." -> "3")."""
    text = answer.strip()
    number = text.replace(",", "")
    sign = ""
    if number[:1] in ("-", "+"):
        sign, number = number[0], number[1:]
    if number.startswith("$"):
        number = number[1:]
        if not sign and number[:1] in ("-", "+"):
            sign, number = number[0], number[1:]
    if not re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", number):
        return text
    value = Decimal(sign + number)
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def _as_pattern(pattern: AnswerPattern | str) -> AnswerPattern:
    return pattern if isinstance(pattern, AnswerPattern) else compile_answer_pattern(pattern)


def extract_answer(text: str, pattern: AnswerPattern | str) -> str | None:
    """The normalised answer in ``text``, or None when the pattern finds none.

    Of the matches that give a non-empty answer, the last one for ``last-number`` and the first otherwise.
    """
    pattern = _as_pattern(pattern)
    found = None
    for match in pattern.regex.finditer(text):
        raw = match.group(1) if pattern.regex.groups else match.group(0)
        answer = normalize_answer(raw) if raw is not None else ""
        if answer:
            found = answer
            if not pattern.take_last:
                break
    return found


def answers_match(prediction: str, reference: str, pattern: AnswerPattern | str) -> bool:
    """Whether the answers in both texts agree. False when the prediction has no answer; a reference
    without one is compared whole (stripped and normalised, so a bare "72.0" reference equals "72")."""
    predicted = extract_answer(prediction, pattern)
    if predicted is None:
        return False
    expected = extract_answer(reference, pattern)
    if expected is None:
        expected = normalize_answer(reference)
    return predicted == expected


def whole_completion_match(prediction: str, answer: str) -> bool:
    """The generation's first lines, as many as the stripped answer has, equal the answer's lines
    (each stripped): what the model writes after a complete answer does not count."""
    expected = [line.strip() for line in answer.strip().split("\n")]
    return [line.strip() for line in prediction.split("\n")[: len(expected)]] == expected
