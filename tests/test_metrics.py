"""Hand-computed cases for vlm.metrics against the official VQA evaluator's behaviour."""

import pytest

from vlm.metrics import (
    bootstrap_ci,
    exact_match,
    extract_choice,
    extract_final_answer,
    normalize_answer,
    pope_scores,
    summarize,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),  # number word -> digit, after lower-casing
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # the official map stops at ten
        ("the dog.", "dog"),  # article dropped, final period stripped
        ("An apple", "apple"),
        ("dont", "don't"),  # contractions table
        ("whats", "what's"),
        ("yes!", "yes"),  # "!" touches no space -> becomes a space -> split away
        ("Yes\n", "yes"),
        ("yes\tsir", "yes sir"),
        ("1,000", "1000"),  # digit,digit present -> every mark deleted, digits joined
        ("1,000 (approx)", "1000 approx"),  # ...and that holds for "(" and ")" too
        ("red, white", "red white"),  # "," touches a space -> deleted
        ("x,y", "x y"),  # "," touches no space -> replaced by a space
        ("t-shirt", "t shirt"),
        ("3.5", "3.5"),  # a period followed by a digit is kept
        ("5.", "5"),  # official periodStrip's look-behind is a no-op: "5." loses it
        ("man's", "man's"),  # apostrophes survive (lmms-eval would give "man 's")
        ("Im", "im"),  # official quirk: capitalised keys never match after lower()
        ("  The   Two  ", "2"),
        ("", ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_period_strip_is_capped_at_32_like_the_official_call():
    # periodStrip.sub("", text, re.UNICODE) passes 32 as the count, so only the
    # first 32 of 40 sentence-final periods go.
    assert normalize_answer("x." * 40) == "x" * 32 + "x." * 8


TEN_ANSWERS_BASE = ["cat"] * 10


def _ten_with(k, match="2"):
    return [match] * k + TEN_ANSWERS_BASE[k:]


@pytest.mark.parametrize(
    "k, expected",
    [
        # k of the 10 human answers match. Leaving out a matching answer leaves k-1
        # matches among 9, leaving out another leaves k; each scores min(1, m/3).
        (0, 0.0),
        (1, 0.3),  # (1*min(1,0/3) + 9*min(1,1/3)) / 10 = (0 + 3) / 10
        (2, 0.6),  # (2*(1/3) + 8*(2/3)) / 10 = (2/3 + 16/3) / 10 = 6/10
        (3, 0.9),  # (3*(2/3) + 7*1) / 10 = (2 + 7) / 10
        (4, 1.0),  # (4*1 + 6*1) / 10
        (10, 1.0),
    ],
)
def test_vqa_accuracy_ten_answers(k, expected):
    assert vqa_accuracy("Two", _ten_with(k)) == expected


def test_vqa_accuracy_normalises_prediction_and_answers():
    # "The two." -> "2"; answers "2", "two" and "Two!" all normalise to "2": 3 matches.
    answers = ["2", "two", "Two!"] + ["3"] * 7
    assert vqa_accuracy("The two.", answers) == 0.9


def test_vqa_accuracy_unanimous_raw_ground_truth_is_normalised_too():
    # The official script leaves unanimous ground truth untouched (10 x "Two" vs
    # prediction "2" would score 0); this module normalises both sides.
    assert vqa_accuracy("2", ["Two"] * 10) == 1.0


def test_vqa_accuracy_single_answer_is_exact_match():
    assert vqa_accuracy("the dog.", ["dog"]) == 1.0
    assert vqa_accuracy("cat", ["dog"]) == 0.0


def test_vqa_accuracy_other_lengths_follow_the_leave_one_out_formula():
    # 5 answers, 2 matching: (2*min(1,1/3) + 3*min(1,2/3)) / 5 = (2/3 + 2) / 5 = 8/15
    assert vqa_accuracy("yes", ["yes", "yes", "no", "no", "no"]) == pytest.approx(8 / 15)


def test_vqa_accuracy_matches_a_literal_leave_one_out_loop():
    answers = ["yes", "Yes", "no", "yes.", "nope", "no", "yes", "maybe", "no", "yes"]
    for prediction in ["yes", "no", "maybe", "nope", "other"]:
        pred = normalize_answer(prediction)
        truths = [normalize_answer(a) for a in answers]
        per_left_out = [
            min(1.0, sum(t == pred for j, t in enumerate(truths) if j != i) / 3)
            for i in range(len(truths))
        ]
        assert vqa_accuracy(prediction, answers) == pytest.approx(sum(per_left_out) / 10)


def test_vqa_accuracy_rejects_empty_answers():
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


def test_exact_match():
    assert exact_match("Yes!", "yes") == 1.0
    assert exact_match("The dog.", "dog") == 1.0
    assert exact_match("two", "2") == 1.0
    assert exact_match("dogs", "dog") == 0.0


def test_pope_scores_on_hand_built_confusion_matrix():
    predictions = [
        # label yes: 3 TP, 2 FN
        "Yes",
        "Yes, there is a dog in the image.",
        "Yes. There is no cat.",  # only the first sentence counts -> yes
        "No.",
        "There is not a dog.",
        # label no: 1 FP, 4 TN
        "yes",
        "no",
        "NO!",  # normalised words -> "no"
        "No, there is none.",
        "There is no bench.",
    ]
    labels = ["yes"] * 5 + ["No"] * 5
    scores = {name: m["value"] for name, m in pope_scores(predictions, labels).items()}
    # TP=3 FN=2 FP=1 TN=4, N=10
    assert scores["accuracy"] == pytest.approx(7 / 10)
    assert scores["precision"] == pytest.approx(3 / 4)
    assert scores["recall"] == pytest.approx(3 / 5)
    # 2 * 0.75 * 0.6 / (0.75 + 0.6) = 0.9 / 1.35 = 2/3
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["yes_ratio"] == pytest.approx(4 / 10)  # predicted yes: 3 TP + 1 FP


def test_pope_scores_all_no_predictions_give_zero_precision_and_f1():
    scores = {name: m["value"] for name, m in pope_scores(["no", "no"], ["yes", "no"]).items()}
    assert scores == {
        "accuracy": 0.5,
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "yes_ratio": 0.0,
    }


def test_pope_scores_rejects_bad_labels_and_lengths():
    with pytest.raises(ValueError):
        pope_scores(["yes"], ["maybe"])
    with pytest.raises(ValueError):
        pope_scores(["yes", "no"], ["yes"])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B. cat", "B"),
        ("(B) cat", "B"),
        ("b) cat", "B"),
        ("The answer is B", "B"),
        ("The answer is B because the cat is black.", "B"),
        ("answer: (c)", "C"),
        ("the answer is d.", "D"),
        ("**C**", "C"),
        ("c", "C"),
        ("a", "A"),
        ("Option D", "D"),
        ("I think B is correct.", "B"),  # "I" followed by a word is the pronoun
        ("Looking at it, (A) fits best.", "A"),
        ("E", None),  # out of range for 4 options
        ("", None),
        ("I am not sure.", None),
        ("the answer is a cat", None),  # lower-case "a" followed by a word is an article
    ],
)
def test_extract_choice_letters(text, expected):
    assert extract_choice(text, 4) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("cat", "B"),  # repeats option text
        ("A cat.", "B"),  # normalises to "cat": option text, not letter A
        ("It is a black cat", "C"),  # "cat" is inside "black cat": the longer wins
        ("It shows a dog", "A"),
        ("dog or cat", None),  # two options named: ambiguous
        ("The answer is C", "C"),  # an explicit letter wins over option text
    ],
)
def test_extract_choice_option_text(text, expected):
    assert extract_choice(text, 3, options=["dog", "cat", "black cat"]) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Two cats on a sofa. The answer is 2.", "2"),
        ("Let me think.\nThe answer is: Yes", "Yes"),
        ("Answer: blue\nBecause the sky is blue.", "blue"),
        ("First answer is 3, but recounting, the final answer is 4.", "4"),
        ("**Final Answer:** 3.5", "3.5"),
        ("Counting the apples\nFinal answer:\nseven", "seven"),
        ("I count them one by one.\n\nthree\n", "three"),  # no marker: last line
        ("", ""),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_bootstrap_ci_of_constant_scores_is_a_point():
    assert bootstrap_ci([0.7] * 20) == pytest.approx((0.7, 0.7))


def test_bootstrap_ci_contains_mean_and_shrinks_with_n():
    small = [0.0, 1.0] * 50  # mean 0.5, N = 100
    large = [0.0, 1.0] * 5000  # mean 0.5, N = 10000
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s < 0.5 < hi_s
    assert lo_l < 0.5 < hi_l
    # Normal approximation: half-width 1.96 * sqrt(0.25 / N) = 0.098 at N = 100 and
    # 0.0098 at N = 10000; allow for bootstrap noise around those.
    assert 0.16 < hi_s - lo_s < 0.23
    assert 0.016 < hi_l - lo_l < 0.023
    assert hi_l - lo_l < (hi_s - lo_s) / 5


def test_bootstrap_ci_is_deterministic_with_seed():
    scores = [0.0, 0.3, 0.6, 1.0, 1.0, 0.0, 0.9, 1.0]
    assert bootstrap_ci(scores, seed=3) == bootstrap_ci(scores, seed=3)
    assert bootstrap_ci(scores, seed=3) != bootstrap_ci(scores, seed=4)


def test_bootstrap_ci_narrower_confidence_gives_narrower_interval():
    scores = [0.0, 1.0] * 200
    lo95, hi95 = bootstrap_ci(scores, confidence=0.95)
    lo50, hi50 = bootstrap_ci(scores, confidence=0.50)
    assert lo95 <= lo50 < hi50 <= hi95


def test_bootstrap_ci_rejects_empty():
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_summarize():
    scores = [1.0, 0.0, 1.0, 1.0]
    summary = summarize(scores, seed=0)
    assert summary["value"] == 0.75
    assert summary["n"] == 4
    assert summary["ci95"] == list(bootstrap_ci(scores, seed=0))
    lo, hi = summary["ci95"]
    assert 0.0 <= lo <= 0.75 <= hi <= 1.0
