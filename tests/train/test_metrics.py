"""lorakit.train.metrics: against scikit-learn / scipy on seeded random cases, hand-worked cases, answer extraction."""

from __future__ import annotations

import math
import random
import warnings

import pytest

from lorakit.train import metrics
from lorakit.train.metrics import (
    AnswerPattern,
    accuracy,
    answers_match,
    classification_metrics,
    compile_answer_pattern,
    extract_answer,
    f1,
    matthews,
    pearson,
    regression_metrics,
    spearman,
    whole_completion_match,
)
from lorakit.train.tasks import exact_match

TOL = 1e-9


def _class_cases(seed: int, count: int):
    """(predictions, labels, num_classes): binary, 3- and 5-class, lengths 1..50, some skewed to one class."""
    rng = random.Random(seed)
    for i in range(count):
        k = (2, 3, 5)[i % 3]
        n = rng.randint(1, 50)
        skew = rng.random() < 0.3  # mostly one class: exercises absent classes and zero denominators

        def draw():
            return 0 if skew and rng.random() < 0.8 else rng.randrange(k)

        labels = [draw() for _ in range(n)]
        predictions = [y if rng.random() < 0.5 else draw() for y in labels]
        yield predictions, labels, k


def test_classification_against_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    for predictions, labels, k in _class_cases(seed=1, count=150):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want_acc = sk.accuracy_score(labels, predictions)
            if k == 2:
                want_f1 = sk.f1_score(labels, predictions, average="binary", zero_division=0)
            else:
                want_f1 = sk.f1_score(labels, predictions, average="macro", labels=list(range(k)), zero_division=0)
            want_mcc = sk.matthews_corrcoef(labels, predictions)
        got = classification_metrics(predictions, labels, k)
        assert set(got) == set(metrics.CLASSIFY_METRICS)
        assert got["accuracy"] == pytest.approx(want_acc, abs=TOL), (predictions, labels)
        assert got["f1"] == pytest.approx(want_f1, abs=TOL), (predictions, labels, k)
        assert got["mcc"] == pytest.approx(want_mcc, abs=TOL), (predictions, labels)
        assert accuracy(predictions, labels) == got["accuracy"]
        assert f1(predictions, labels, k) == got["f1"]
        assert matthews(predictions, labels) == got["mcc"]


def _regress_cases(seed: int, count: int):
    """(predictions, targets): floats, or small integers (many ties), lengths 1..50, sometimes constant."""
    rng = random.Random(seed)
    for i in range(count):
        n = rng.randint(1, 50)
        kind = i % 4
        if kind == 0:
            targets = [rng.uniform(0, 5) for _ in range(n)]
            predictions = [t + rng.gauss(0, 1.5) for t in targets]
        elif kind == 1:  # ties on both sides
            targets = [float(rng.randint(0, 5)) for _ in range(n)]
            predictions = [float(rng.randint(0, 3)) for _ in range(n)]
        elif kind == 2:  # anti-correlated, with ties
            targets = [rng.randint(-3, 3) for _ in range(n)]
            predictions = [-t + rng.choice((0, 0, 1)) for t in targets]
        else:  # occasionally constant
            targets = [rng.uniform(-1, 1) for _ in range(n)]
            predictions = [2.5] * n if rng.random() < 0.3 else [rng.uniform(-1, 1) for _ in range(n)]
        yield predictions, targets


def test_regression_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    defined = 0
    for predictions, targets in _regress_cases(seed=2, count=300):
        got = regression_metrics(predictions, targets)
        assert set(got) == {*metrics.REGRESS_METRICS, "mse"}
        want_mse = sum((p - t) ** 2 for p, t in zip(predictions, targets)) / len(targets)
        assert got["mse"] == pytest.approx(want_mse, abs=TOL)
        constant = len(set(predictions)) == 1 or len(set(targets)) == 1
        if len(targets) < 2 or constant:  # scipy raises or gives NaN: we document 0.0
            assert got["pearson"] == 0.0 and got["spearman"] == 0.0
            continue
        defined += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want_p = stats.pearsonr(predictions, targets)[0]
            want_s = stats.spearmanr(predictions, targets)[0]
        assert got["pearson"] == pytest.approx(want_p, abs=TOL), (predictions, targets)
        assert got["spearman"] == pytest.approx(want_s, abs=TOL), (predictions, targets)
        assert pearson(predictions, targets) == got["pearson"]
        assert spearman(predictions, targets) == got["spearman"]
    assert defined > 200  # the comparison above really ran


def test_average_ranks_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(3)
    for _ in range(100):
        values = [rng.randint(0, 6) for _ in range(rng.randint(1, 30))]
        assert metrics._average_ranks(values) == list(stats.rankdata(values, method="average"))


# --- hand-worked cases, no library --------------------------------------------------------------------------


def test_binary_confusion_matrix_by_hand():
    # labels:      1 1 1 1 0 0 0 0 0 0
    # predictions: 1 1 1 0 1 1 0 0 0 0   ->  TP=3 FN=1 FP=2 TN=4
    labels = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    predictions = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    assert accuracy(predictions, labels) == pytest.approx(7 / 10)
    # precision 3/5, recall 3/4, F1 = 2*3 / (2*3 + 2 + 1) = 6/9
    assert f1(predictions, labels, 2) == pytest.approx(2 / 3)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (12 - 2) / sqrt(5*4*6*5)
    assert matthews(predictions, labels) == pytest.approx(10 / math.sqrt(600))


def test_macro_f1_by_hand():
    # 3 classes; class 2 never true and never predicted -> F1 0 and it still counts in the mean.
    labels = [0, 0, 1, 1]
    predictions = [0, 1, 1, 1]
    # class 0: TP=1 FP=0 FN=1 -> 2/3 ; class 1: TP=2 FP=1 FN=0 -> 4/5 ; class 2: 0
    assert f1(predictions, labels, 3) == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)
    assert f1(predictions, labels, 2) == pytest.approx(4 / 5)  # binary: class 1 only


def test_mcc_extremes_and_undefined():
    labels = [0, 1, 1, 0, 1, 0, 0]
    assert matthews(labels, labels) == pytest.approx(1.0)
    assert matthews([1 - y for y in labels], labels) == pytest.approx(-1.0)
    assert matthews([0] * 7, labels) == 0.0  # constant predictions: undefined -> 0.0
    assert matthews(labels, [1] * 7) == 0.0  # constant labels
    assert matthews([2, 0, 1, 2], [2, 0, 1, 2]) == pytest.approx(1.0)  # multi-class perfect


def test_f1_when_class_one_never_predicted_or_present():
    assert f1([0, 0, 0], [1, 0, 1], 2) == 0.0
    assert f1([0, 0, 0], [0, 0, 0], 2) == 0.0  # no positives anywhere: zero_division=0
    assert f1([1, 1], [1, 1], 2) == 1.0


def test_empty_and_mismatched_inputs():
    assert classification_metrics([], [], 3) == {"accuracy": 0.0, "f1": 0.0, "mcc": 0.0}
    assert regression_metrics([], []) == {"pearson": 0.0, "spearman": 0.0, "mse": 0.0}
    with pytest.raises(ValueError):
        accuracy([1, 0], [1])
    with pytest.raises(ValueError):
        pearson([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError):
        f1([0], [0], 1)


def test_correlations_by_hand():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # x = 1,2,3 ; y = 1,3,2 -> centred (-1,0,1)·(-1,1,0) = 1, norms sqrt 2 each -> 0.5
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert pearson([0.1, 0.1, 0.1], [1, 2, 3]) == 0.0  # constant -> 0.0, even with inexact mean
    assert pearson([5.0], [1.0]) == 0.0  # one point
    # Spearman is monotone-invariant where Pearson is not
    x = [1, 2, 3, 4, 5]
    assert spearman(x, [v**3 for v in x]) == pytest.approx(1.0)
    assert pearson(x, [v**3 for v in x]) < 0.99
    # ties: ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4]
    assert metrics._average_ranks([3, 2, 1, 2]) == [4.0, 2.5, 1.0, 2.5]
    assert spearman([3, 2, 1, 2], [4.0, 2.5, 1.0, 2.5]) == pytest.approx(1.0)
    mse = regression_metrics([1.0, 2.0], [2.0, 4.0])["mse"]
    assert mse == pytest.approx((1 + 4) / 2)


# --- answer extraction ---------------------------------------------------------------------------------------

GSM8K_SOLUTION = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


def test_gsm8k_pattern():
    p = compile_answer_pattern("gsm8k")
    assert isinstance(p, AnswerPattern) and p.name == "gsm8k" and not p.take_last
    assert extract_answer(GSM8K_SOLUTION, p) == "72"
    assert extract_answer("so the total is #### 1,234", p) == "1234"
    assert extract_answer("#### -3", p) == "-3"
    assert extract_answer("####$18.50", p) == "18.5"
    assert extract_answer("#### 7\n\nQuestion: ... #### 9", p) == "7"  # first match
    assert extract_answer("The answer is 72", p) is None  # numbers but no ####
    assert extract_answer("#### seventy-two", p) is None


@pytest.mark.parametrize(
    "text, answer",
    [
        ("She has 3 apples and buys 5 more, so 8.", "8"),
        ("costs 1,234,567 in total", "1234567"),
        ("the temperature fell to -12 degrees", "-12"),
        ("pi is about 3.14", "3.14"),
        ("it costs $1,250.00", "1250"),
        ("change: -0.50", "-0.5"),
        ("5-3 = 2, and 10-7", "7"),  # a hyphen between digits is not a sign
        ("x = -4", "-4"),
        ("between 1,2345 and", "2345"),  # malformed thousands groups are not one number
        ("values 1, 2, 3", "3"),
        ("Total: 12. Done.", "12"),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_last_number(text, answer):
    p = compile_answer_pattern("last-number")
    assert p.take_last
    assert extract_answer(text, p) == answer
    assert extract_answer(text, "last-number") == answer  # the spec string is accepted too


def test_user_regex():
    one_group = compile_answer_pattern(r"The answer is (\w+)")
    assert one_group.name == r"The answer is (\w+)" and not one_group.take_last
    assert extract_answer("Thinking... The answer is blue. The answer is red.", one_group) == "blue"  # first
    assert extract_answer("The answer is 1,000", one_group) == "1"  # \w stops at the comma
    assert extract_answer("I do not know", one_group) is None
    no_group = compile_answer_pattern(r"[A-D]\)")
    assert extract_answer("I pick B) because C) is wrong", no_group) == "B)"  # whole match
    numeric = compile_answer_pattern(r"answer:\s*(\S+)")
    assert extract_answer("answer: $42.", numeric) == "42"  # normalised: $ and trailing dot dropped
    optional = compile_answer_pattern(r"x=(\d+)?;")
    assert extract_answer("x=; x=5;", optional) == "5"  # a match with an empty answer does not count
    assert extract_answer("x=;", optional) is None


@pytest.mark.parametrize(
    "spec, problem", [("(unclosed", "not a valid"), (r"(\d+)-(\d+)", "2 capturing groups"), ("", "empty")]
)
def test_bad_user_regex(spec, problem):
    with pytest.raises(ValueError) as info:
        compile_answer_pattern(spec)
    message = str(info.value)
    assert repr(spec) in message and problem in message
    assert "gsm8k" in message and "last-number" in message
    assert "\n" not in message


def test_normalize_answer():
    n = metrics.normalize_answer
    assert n(" 1,234.00 ") == "1234"
    assert n("-0.50") == "-0.5"
    assert n("3.") == "3"
    assert n("$5") == "5" and n("-$5") == "-5" and n("+7") == "7"
    assert n("1200") == "1200"  # not "1.2E+3"
    assert n("-0") == "0" and n("0.000") == "0"
    assert n(" Paris ") == "Paris"
    assert n("1e5") == "1e5" and n("nan") == "nan"  # only plain decimals are numbers


def test_answers_match():
    assert answers_match(GSM8K_SOLUTION, "#### 72", "gsm8k")
    assert answers_match("#### 72", "#### 72.0", "gsm8k")
    assert answers_match("#### 72", "72.0", "gsm8k")  # reference without ####: compared whole, normalised
    assert not answers_match("72", "#### 72", "gsm8k")  # prediction without an answer
    assert not answers_match("#### 71", "#### 72", "gsm8k")
    last = compile_answer_pattern("last-number")
    assert answers_match("so she paid $1,000.", "#### 1000", last)
    assert answers_match("72", "#### 72.0", last)
    assert not answers_match("I cannot tell", "72", last)
    assert not answers_match("1 2 3", "2", last)
    word = compile_answer_pattern(r"The answer is (\w+)")
    assert answers_match("The answer is blue.", "blue", word)
    assert not answers_match("The answer is blue.", "Blue", word)  # case matters


def test_whole_completion_match_matches_tasks_exact_match():
    cases = [
        (" ocean honey lamp tiger", "ocean honey lamp tiger"),
        (" ocean honey lamp tiger\nAnswer: more", " ocean honey lamp tiger"),
        ("ocean honey", "ocean honey lamp"),
        ("\nocean", "ocean"),  # first line is empty
        ("  a b  \r\nc", "a b"),
        ("", ""),
        ("x", " x\n"),
        ("48/2 = 24\n#### 72\nQuestion: next", "48/2 = 24\n#### 72"),  # a worked solution: all its lines
        ("48/2 = 24\n#### 71", "48/2 = 24\n#### 72"),
    ]
    expected = [True, True, False, False, True, True, True, True, False]
    for (prediction, answer), want in zip(cases, expected):
        assert whole_completion_match(prediction, answer) is want, (prediction, answer)
        assert exact_match(prediction, answer) is want  # the built-in task's metric is the same rule
