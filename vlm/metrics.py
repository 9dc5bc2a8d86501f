"""Benchmark scoring that reproduces the official VQA evaluator and lmms-eval.

Answer normalisation (:func:`normalize_answer`) is the EvalAI / VQA API one
(``vqaEval.py`` of GT-Vision-Lab/VQA, ``processPunctuation`` followed by
``processDigitArticle``), which lmms-eval re-exports as ``EvalAIAnswerProcessor``:

1. newlines and tabs become spaces, then the text is stripped;
2. punctuation: if the text contains a digit-comma-digit group ("1,000"), or a
   punctuation mark touches a space somewhere in the text, that mark is deleted,
   otherwise it is replaced by a space ("t-shirt" -> "t shirt");
3. a period is deleted unless a digit follows it ("3.5" stays, "dog." and "5."
   lose it);
4. lower-case, whitespace split, number words "none"/"zero".."ten" become digits,
   the articles "a", "an", "the" are dropped, and the contractions table restores
   apostrophes ("dont" -> "don't", "whats" -> "what's").

Where the official script and lmms-eval differ, and what this module does:

* Ground truth. The official ``vqaEval.py`` fully normalises only the prediction;
  the ten human answers get ``processPunctuation`` alone (no lower-casing, digit
  or article handling) and only when they disagree among themselves. lmms-eval
  (``vqav2_process_results``) runs the full processor on the prediction and
  punctuation + digit/article on the ground truth, again only when the ground
  truth answers disagree. This module normalises prediction and every ground-truth
  answer alike, always. The released VQA annotations are already in normal form,
  so all three agree on them; they differ only on raw ground truth such as ten
  "Two" answers (official and lmms-eval: a prediction "two" scores 0, here 1).
* Prediction pre-tokenisation. lmms-eval's processor first lower-cases, deletes
  every "," and "?" and splits "'s" into " 's" before the official steps, so
  "man's" becomes "man 's" and "x,y" becomes "xy" there, where the official
  script (and this module) gives "man's" and "x y". This module follows the
  official script.
* The EvalAI server copy (Cloud-CV/VQA-Challenge) at one point replaced
  ``processPunctuation`` with a set of regexes; its results agree with the
  GT-Vision-Lab version on ordinary answers. This module follows GT-Vision-Lab.
"""

from __future__ import annotations

import re

import numpy as np

# The official table, verbatim. Lookups happen after lower-casing, so the keys with
# capitals ("Im", "Ive", "Id've", "I'dve") never match in the official script either.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

_ARTICLES = frozenset({"a", "an", "the"})

# Apostrophe, colon and period are deliberately absent: apostrophes must survive
# for the contractions table, and periods have their own rule.
_PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
    ">", "<", "@", "`", ",", "?", "!",
)

_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")

# The official pattern is "(?!<=\d)(\.)(?!\d)": its "(?!<=" is a mistyped
# look-behind that never fires, so the only condition is that no digit follows.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

# The official script calls periodStrip.sub("", text, re.UNICODE), which passes the
# flag's value (32) as the substitution count; lmms-eval copied the call.
_MAX_PERIODS_STRIPPED = int(re.UNICODE)


def _process_punctuation(text: str) -> str:
    strip_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        # The official test looks at the original text, not the partly cleaned one.
        if strip_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_STRIPPED)


def _process_digit_article(text: str) -> str:
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    """Normalise an answer the way the official VQA evaluator does (see module doc)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Official VQA accuracy of one prediction against the human answers.

    For each human answer left out in turn, the prediction scores
    min(1, matches among the remaining answers / 3); the result is the mean over
    the left-out answers. With the usual 10 answers, k matching answers give
    0, 0.3, 0.6, 0.9 for k = 0..3 and 1.0 from k = 4 on. Any number of answers works
    the same way, except a single answer, where the leave-one-out set is empty and
    the score is exact match after normalisation instead.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    pred = normalize_answer(prediction)
    truths = [normalize_answer(answer) for answer in answers]
    n = len(truths)
    if n == 1:
        return float(truths[0] == pred)
    k = sum(truth == pred for truth in truths)
    # Leaving out one of the k matching answers leaves k - 1 matches, leaving out
    # one of the n - k others leaves k. Counting in thirds keeps the sum an integer,
    # so 0.3 / 0.6 / 0.9 come out as the nearest floats rather than as float sums.
    thirds = k * min(3, max(k - 1, 0)) + (n - k) * min(3, k)
    return thirds / (3 * n)


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when prediction and answer agree after normalisation (GQA style), else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def pope_says_yes(prediction: str) -> bool:
    # LLaVA's eval_pope.py, the script behind the published POPE numbers: keep the
    # first sentence, and answer 'no' iff it contains the word "no" or "not",
    # 'yes' otherwise (so an empty or off-topic reply counts as 'yes'). Matching on
    # the normalised words makes "No", "NO" and "no!" all count as 'no', where
    # LLaVA only recognises "No", "no" and "not" exactly.
    first_sentence = prediction.split(".", 1)[0]
    words = normalize_answer(first_sentence).split()
    return "no" not in words and "not" not in words


def pope_scores(predictions: list[str], labels: list[str], seed: int = 0) -> dict:
    """POPE accuracy, precision, recall, F1 and yes-ratio, each {"value", "n", "ci95"}; the positive class is 'yes'.

    Predictions are mapped to yes/no with LLaVA's eval_pope.py rule (first
    sentence contains "no" or "not" -> 'no', else 'yes'), and yes_ratio is the share
    of 'yes' predictions, as there. lmms-eval's POPE task differs: it compares the
    lower-cased, stripped reply to "yes"/"no" exactly (a reply that is neither is
    wrong for accuracy and left out of precision and recall), and its yes_ratio is
    the share of 'yes' labels, not predictions. Precision, recall and F1 are 0.0
    when their denominator is 0, as in lmms-eval. Intervals are 95% percentile
    bootstraps; F1, which is not a mean, is bootstrapped as a whole.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("pope_scores needs at least one prediction")
    labels = [label.strip().lower() for label in labels]
    bad = next((label for label in labels if label not in ("yes", "no")), None)
    if bad is not None:
        raise ValueError(f"POPE labels are 'yes' or 'no', got {bad!r}")
    says_yes = np.array([pope_says_yes(p) for p in predictions])
    positive = np.array([label == "yes" for label in labels])
    correct = says_yes == positive
    return {
        "accuracy": summarize(correct.astype(float).tolist(), seed=seed),
        "precision": _mean_or_zero(correct[says_yes], seed),
        "recall": _mean_or_zero(says_yes[positive], seed),
        "f1": _f1_with_interval(says_yes, positive, seed),
        "yes_ratio": summarize(says_yes.astype(float).tolist(), seed=seed),
    }


def _mean_or_zero(values: np.ndarray, seed: int) -> dict:
    if values.size == 0:  # no 'yes' predicted or labelled
        return {"value": 0.0, "n": 0, "ci95": None}
    return summarize(values.astype(float).tolist(), seed=seed)


def _f1_with_interval(says_yes: np.ndarray, positive: np.ndarray, seed: int, n_resamples: int = 1000) -> dict:
    def f1(tp, fp, fn):
        denominator = 2 * tp + fp + fn
        return np.divide(2 * tp, denominator, out=np.zeros_like(denominator, dtype=float), where=denominator > 0)

    n = says_yes.size
    tp_items, fp_items, fn_items = says_yes & positive, says_yes & ~positive, ~says_yes & positive
    resamples = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    boot = f1(tp_items[resamples].sum(1), fp_items[resamples].sum(1), fn_items[resamples].sum(1))
    low, high = np.quantile(boot, [0.025, 0.975])
    value = f1(np.array([tp_items.sum()]), np.array([fp_items.sum()]), np.array([fn_items.sum()]))[0]
    return {"value": float(value), "n": int(n), "ci95": [float(low), float(high)]}


_LETTER = r"[A-Za-z]"
# "B", "(B)", "B.", "b)" as the whole reply.
_WHOLE_REPLY_LETTER = re.compile(rf"^\(?({_LETTER})\)?[.:)]?$")
# "B. cat", "(B) cat", "b) cat", "B: cat" at the start of the reply.
_LEADING_LETTER = re.compile(rf"^(?:\(({_LETTER})\)|({_LETTER})[.:)])\s")
# "The answer is B", "answer: (c)", "Option C", "the correct choice is d."
_MARKED_LETTER = re.compile(
    rf"\b(?:answer|option|choice)\b\s*(?:is\b|would be\b)?\s*[:：]?\s*"
    rf"(?:\(({_LETTER})\)|({_LETTER})(?![A-Za-z0-9'])(\s*\S?))",
    re.IGNORECASE,
)
_PARENTHESISED_LETTER = re.compile(rf"\(({_LETTER})\)")
_STANDALONE_CAPITAL = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])(\s+[a-z])?")


def _as_option(letter: str | None, num_options: int) -> str | None:
    if letter is None:
        return None
    letter = letter.upper()
    return letter if ord(letter) - ord("A") < num_options else None


def _unique_option(letters: list[str | None], num_options: int) -> str | None:
    found = {_as_option(letter, num_options) for letter in letters} - {None}
    return found.pop() if len(found) == 1 else None


def extract_choice(
    text: str, num_options: int, options: list[str] | None = None
) -> str | None:
    """Option letter ("A", "B", ...) chosen by a free-text reply, or None.

    Tried in order, first hit wins: the reply is just a letter ("B", "(B)", "b.");
    it starts with a labelled letter ("B. cat", "(b) cat"); the last "answer" /
    "option" / "choice" marker is followed by a letter ("The answer is B",
    "answer: (c)"); the reply equals one option's text after normalisation; exactly
    one distinct parenthesised letter; exactly one distinct stand-alone capital
    letter; exactly one option's text occurs in the reply. A bare lower-case letter
    is accepted only where it cannot be a word: alone, labelled, in parentheses, or
    after a marker when no word follows ("the answer is a cat" gives nothing).
    Letters beyond ``num_options`` are ignored.
    """
    if not 1 <= num_options <= 26:
        raise ValueError(f"num_options must be in 1..26, got {num_options}")
    # Markdown emphasis ("**B**") carries no meaning for the choice.
    reply = text.replace("*", "").strip()
    if not reply:
        return None

    match = _WHOLE_REPLY_LETTER.match(reply)
    if match and (choice := _as_option(match.group(1), num_options)):
        return choice

    match = _LEADING_LETTER.match(reply)
    if match and (choice := _as_option(match.group(1) or match.group(2), num_options)):
        return choice

    for match in reversed(list(_MARKED_LETTER.finditer(reply))):
        in_parentheses, bare, after = match.groups()
        # A lower-case letter followed by a word is an article or pronoun.
        if bare and bare.islower() and after.strip()[:1].isalpha():
            continue
        if choice := _as_option(in_parentheses or bare, num_options):
            return choice

    normalized_options = [normalize_answer(option) for option in options or []]
    normalized_reply = normalize_answer(reply)
    if normalized_reply:
        for index, option in enumerate(normalized_options[:num_options]):
            if option == normalized_reply:
                return chr(ord("A") + index)

    choice = _unique_option(_PARENTHESISED_LETTER.findall(reply), num_options)
    if choice:
        return choice

    # "A" and "I" followed by a lower-case word are the article and the pronoun.
    capitals = [
        letter
        for letter, next_word in _STANDALONE_CAPITAL.findall(reply)
        if not (letter in "AI" and next_word)
    ]
    choice = _unique_option(capitals, num_options)
    if choice:
        return choice

    padded_reply = f" {normalized_reply} "
    contained = {
        index: option
        for index, option in enumerate(normalized_options[:num_options])
        if option and f" {option} " in padded_reply
    }
    # An option contained in another contained option ("cat" in "black cat") is
    # not evidence on its own.
    maximal = [
        index
        for index, option in contained.items()
        if not any(option != other and f" {option} " in f" {other} "
                   for other in contained.values())
    ]
    return chr(ord("A") + maximal[0]) if len(maximal) == 1 else None


_FINAL_ANSWER_MARKER = re.compile(
    r"final\s+answer(?:\s+is)?\s*[:：]?|answer\s+is\s*[:：]?|answer\s*[:：]",
    re.IGNORECASE,
)
_ANSWER_DECORATION = " \t*`\"'"


def extract_final_answer(text: str) -> str:
    """The answer part of a chain-of-thought reply.

    Takes the text after the last "final answer" / "answer is" / "answer:" marker
    (case-insensitive), up to the end of its line, or the next non-empty line when
    the marker ends a line; without a marker, the last non-empty line. Surrounding
    spaces, markdown emphasis, quotes and a trailing period are removed.
    """
    markers = list(_FINAL_ANSWER_MARKER.finditer(text))
    rest = text[markers[-1].end():] if markers else ""
    lines = [line.strip(_ANSWER_DECORATION) for line in rest.splitlines()]
    lines = [line for line in lines if line]
    if lines:
        answer = lines[0]
    else:
        all_lines = [line.strip(_ANSWER_DECORATION) for line in text.splitlines()]
        all_lines = [line for line in all_lines if line]
        answer = all_lines[-1] if all_lines else ""
    return answer.rstrip(".").strip(_ANSWER_DECORATION)


# Cap on resample-by-item index matrix entries per chunk (~80 MB of int64), so
# benchmarks with 100k+ items do not build a 1000 x N matrix at once.
_BOOTSTRAP_CHUNK_ENTRIES = 10_000_000


def bootstrap_ci(
    scores: list[float],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean of per-item scores.

    Deterministic for a given seed and input.
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1-D list of scores")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    n = values.size
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, _BOOTSTRAP_CHUNK_ENTRIES // n)
    means = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, rows_per_chunk):
        stop = min(start + rows_per_chunk, n_resamples)
        indices = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[indices].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1.0 - alpha / 2])
    return float(low), float(high)


def summarize(scores: list[float], seed: int = 0) -> dict:
    """{"value": mean, "n": number of items, "ci95": [low, high]} for a score list."""
    low, high = bootstrap_ci(scores, confidence=0.95, seed=seed)
    return {"value": float(np.mean(scores)), "n": len(scores), "ci95": [low, high]}
