"""`vlm eval` end to end on a tiny random model, and scoring against hand-computed values."""

import hashlib
import json

import pytest
import torch

from vlm.cli import main
from vlm.config import ModelConfig
from vlm.evaluate import score
from vlm.metrics import exact_match, extract_choice, pope_scores, vqa_accuracy


def _eval(checkpoint, out, *extra, short=True):
    # 4 new tokens keep the tiny model fast; the default budgets are checked where short=False.
    budget = ["--max-new-tokens", "4"] if short else []
    assert main(["eval", "--checkpoint", str(checkpoint), "--output", str(out), "--batch-size", "2",
                 *budget, *extra]) == 0
    results = json.loads((out / "results.json").read_text())
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return results, predictions


def _recompute(metric, predictions):
    """The benchmark's metric straight from vlm.metrics over predictions.jsonl."""
    if metric == "vqa_accuracy":
        scores = [vqa_accuracy(p["prediction"], p["answers"]) for p in predictions]
    elif metric == "exact_match":
        scores = [exact_match(p["prediction"], p["answers"][0]) for p in predictions]
    elif "choices" not in predictions[0]:  # POPE
        return pope_scores([p["prediction"] for p in predictions], [p["label"] for p in predictions])[metric]["value"]
    else:
        scores = [float(extract_choice(p["prediction"], len(p["choices"]), p["choices"]) == p["label"])
                  for p in predictions]
    return sum(scores) / len(scores)


# benchmark, fixture folder, extra flags, primary metric, scored, skipped
RUNS = [
    ("vqav2", "vqav2", [], "vqa_accuracy", 7, 1),
    ("gqa", "gqa", [], "exact_match", 4, 1),
    ("textvqa", "textvqa", [], "vqa_accuracy", 4, 1),
    ("scienceqa_img", "scienceqa_img", [], "accuracy", 3, 1),
    ("mmstar", "mmstar", [], "accuracy", 3, 1),
    ("pope_adversarial", "pope_imagefolder", ["--split", "train"], "accuracy", 2, 0),
]


@pytest.mark.parametrize("name, folder, extra, metric, scored, skipped", RUNS)
def test_eval_scores_every_fixture_benchmark(
    checkpoint, benchmark_data, tmp_path, name, folder, extra, metric, scored, skipped
):
    results, predictions = _eval(checkpoint, tmp_path, "--benchmark", name, "--data", str(benchmark_data[folder]),
                                 "--limit", "0", *extra)
    assert (results["n"], results["n_skipped"], results["n_selected"]) == (scored, skipped, scored + skipped)
    assert len(predictions) == scored and len(results["skipped"]) == skipped
    assert results["metrics"][metric]["n"] == scored
    assert results["metrics"][metric]["value"] == pytest.approx(_recompute(metric, predictions))
    low, high = results["metrics"][metric]["ci95"]
    assert low <= results["metrics"][metric]["value"] <= high
    assert all(p["prediction"] == p["prediction"].strip() and "score" in p and p["question"] for p in predictions)
    table = (tmp_path / "results.md").read_text()
    assert f"| {metric} |" in table and f"{scored} scored, {skipped} malformed skipped" in table


def test_pope_metrics_match_pope_scores_over_the_predictions(checkpoint, benchmark_data, tmp_path):
    results, predictions = _eval(checkpoint, tmp_path, "--benchmark", "pope_random",
                                 "--data", str(benchmark_data["pope"]), "--limit", "0")
    assert (results["n"], results["n_skipped"]) == (3, 1)
    assert "'yes' or 'no'" in results["skipped"][0]["error"]
    expected = pope_scores([p["prediction"] for p in predictions], [p["label"] for p in predictions])
    assert {k: results["metrics"][k]["value"] for k in expected} == pytest.approx(
        {k: m["value"] for k, m in expected.items()}
    )


def test_easy_vqa_default_output_hash_and_fixed_seed_subset(checkpoint, capsys):
    assert main(["eval", "--checkpoint", str(checkpoint), "--limit", "6", "--seed", "0", "--batch-size", "4"]) == 0
    out = checkpoint / "eval" / "easy_vqa"
    results = json.loads((out / "results.json").read_text())
    first = [json.loads(line)["question_id"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert results["config_hash"] == hashlib.sha256((checkpoint / "vlm_config.json").read_bytes()).hexdigest()
    assert (results["benchmark"], results["split"], results["n"], results["seed"]) == ("easy_vqa", "test", 6, 0)
    assert results["wall_time_s"] > 0 and results["questions_per_s"] > 0
    # "auto" keeps a CPU's float32; on a GPU with bfloat16 the LM computes in it
    dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    assert results["generation"] == {"greedy": True, "max_new_tokens": 16, "batch_size": 4,
                                     "decoding": "dynamic", "dtype": dtype}
    assert "vqa_accuracy" in capsys.readouterr().out
    predictions = (out / "predictions.jsonl").read_text()

    if not torch.cuda.is_available():  # compiled decoding needs a GPU: one line saying so, no traceback
        assert main(["eval", "--checkpoint", str(checkpoint), "--limit", "6", "--decoding", "compiled"]) != 0
        assert "--decoding compiled: compiled decoding records CUDA graphs" in capsys.readouterr().err
    # A static KV cache on request gives the same answers.
    assert main(["eval", "--checkpoint", str(checkpoint), "--limit", "6", "--seed", "0", "--batch-size", "4",
                 "--decoding", "static"]) == 0
    assert json.loads((out / "results.json").read_text())["generation"]["decoding"] == "static"
    assert (out / "predictions.jsonl").read_text() == predictions
    again = [json.loads(line)["question_id"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert main(["eval", "--checkpoint", str(checkpoint), "--limit", "6", "--seed", "1"]) == 0
    other = [json.loads(line)["question_id"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert first == again and first != other


def test_eval_asks_each_question_as_the_checkpoint_was_trained_to_read_it(tiny_model_config, tmp_path):
    import dataclasses

    from vlm.model import VisionLanguageModel
    from vlm.prompts import SHORT_ANSWER

    lm = dataclasses.replace(tiny_model_config.lm, short_answer_prompt="")
    VisionLanguageModel.from_config(dataclasses.replace(tiny_model_config, lm=lm)).save_pretrained(tmp_path / "bare")
    VisionLanguageModel.from_config(tiny_model_config).save_pretrained(tmp_path / "older")
    # A checkpoint saved before the setting existed has no such key: it keeps LLaVA's prompt.
    config_file = tmp_path / "older" / "vlm_config.json"
    saved = json.loads(config_file.read_text())
    del saved["model"]["lm"]["short_answer_prompt"]
    config_file.write_text(json.dumps(saved))
    bare_results, bare = _eval(tmp_path / "bare", tmp_path / "bare-eval", "--limit", "3")
    older_results, older = _eval(tmp_path / "older", tmp_path / "older-eval", "--limit", "3")
    assert [p["prompt"] for p in bare] == [p["question"] for p in bare]
    assert [p["prompt"] for p in older] == [f"{p['question']}\n{SHORT_ANSWER}" for p in older]
    # The results say how the questions were asked, so a score is never read as LLaVA-prompted when it was not.
    assert bare_results["prompt"]["short_answer"] == ""
    assert older_results["prompt"]["short_answer"] == SHORT_ANSWER
    assert "without LLaVA-1.5's instruction" in (tmp_path / "bare-eval" / "results.md").read_text()
    assert "- prompt: LLaVA-1.5 suffixes" in (tmp_path / "older-eval" / "results.md").read_text()


def test_textvqa_ocr_prompt_is_recorded(checkpoint, benchmark_data, tmp_path):
    out = tmp_path / "ocr"
    results, predictions = _eval(checkpoint, out, "--benchmark", "textvqa", "--data", str(benchmark_data["textvqa"]),
                                 "--limit", "0", "--ocr")
    assert results["prompt"]["ocr_tokens"] is True
    assert "\nReference OCR token: nokia, connecting\n" in predictions[0]["prompt"]
    assert "OCR tokens in the prompt" in (out / "results.md").read_text()


class ScriptedModel:
    """Stands in for the model: replies with a fixed chain of thought."""

    def __init__(self, reply):
        self.reply = reply
        self.max_new_tokens = []

    device = torch.device("cpu")
    config = ModelConfig()  # prompts ask as the default model was trained to read them
    lm = torch.nn.Module()  # to_accelerator casts nothing on a CPU; the results name the LM's dtype
    lm.dtype = torch.float32

    def encode_batch(self, images, conversations):
        return {"conversations": len(conversations)}

    def answer(self, batch, max_new_tokens, decoding):
        self.max_new_tokens.append(max_new_tokens)
        return [self.reply] * batch["conversations"]

    def resolve_decoding(self, decoding):
        return decoding or "dynamic"

    def check_prompt_fits(self, image, messages, max_new_tokens):
        pass

    def eval(self):
        return self

    def to(self, device):
        return self


def test_chain_of_thought_scores_the_final_answer(checkpoint, benchmark_data, tmp_path, monkeypatch):
    model = ScriptedModel("The square is uniformly coloured.\nIt looks blue.\nAnswer: blue")
    monkeypatch.setattr("vlm.evaluate.load_model", lambda *args, **kwargs: model)
    results, predictions = _eval(checkpoint, tmp_path, "--benchmark", "vqav2", "--data", str(benchmark_data["vqav2"]),
                                 "--limit", "0", "--cot", short=False)
    assert set(model.max_new_tokens) == {256}
    assert all(p["prediction"] == "blue" and p["reply"].endswith("Answer: blue") for p in predictions)
    assert "Think step by step" in predictions[0]["prompt"]
    # Only the fixture question whose ten answers are all "blue" scores.
    assert [p["score"] for p in predictions] == [0, 0, 0, 0, 1, 0, 0]
    assert results["prompt"]["chain_of_thought"] is True


def test_compare_prints_both_results(checkpoint, benchmark_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("vlm.evaluate.load_model", lambda *args, **kwargs: ScriptedModel("blue"))
    _eval(checkpoint, tmp_path / "a", "--benchmark", "vqav2", "--data", str(benchmark_data["vqav2"]), "--limit", "0")
    monkeypatch.setattr("vlm.evaluate.load_model", lambda *args, **kwargs: ScriptedModel("red"))
    _eval(checkpoint, tmp_path / "b", "--benchmark", "vqav2", "--data", str(benchmark_data["vqav2"]), "--limit", "0")
    capsys.readouterr()
    assert main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b" / "results.json")]) == 0
    table = capsys.readouterr().out
    # "blue" matches 10 of 10 answers on one of 7 questions, "red" on another: 1/7 each, as percentages.
    row = next(line for line in table.splitlines() if line.startswith("| vqa_accuracy |"))
    assert row.count("14.29") == 2
    assert "| n | 7 | 7 |" in table


@pytest.mark.parametrize("args, message", [
    (["--benchmark", "vqa2"], "unknown benchmark 'vqa2'"),
    (["--benchmark", "vqav2", "--data", "no/such/dir"], "no such file or folder"),
    (["--benchmark", "easy_vqa", "--ocr"], "--ocr"),
])
def test_bad_input_is_one_line_and_exit_2(checkpoint, args, message, capsys):
    assert main(["eval", "--checkpoint", str(checkpoint), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_dtype_out_of_the_choices_is_named_before_anything_loads(checkpoint, monkeypatch):
    from vlm.config import ConfigError
    from vlm.evaluate import run_eval

    monkeypatch.setattr("vlm.evaluate.load_model", lambda *args, **kwargs: pytest.fail("the model loaded"))
    with pytest.raises(ConfigError, match=r"--dtype must be one of auto, float32, bfloat16, float16, got 'float8'"):
        run_eval(checkpoint, dtype="float8")


def test_missing_checkpoint_and_bad_compare_file(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "x.json").write_text("{}")
    assert main(["eval", "--compare", str(tmp_path / "x.json"), str(tmp_path / "x.json")]) == 2
    assert "not a `vlm eval` results.json" in capsys.readouterr().err


# ---- scoring known predictions, values worked out by hand --------------------------------------


def test_vqa_accuracy_scoring_of_known_predictions():
    items = [
        # 2 of 10 humans said "dog": each left-out set has 1 or 2 matches -> (2*1/3 + 8*2/3)/10 = 0.6
        {"prediction": "Dog.", "answers": ["dog"] * 2 + ["cat"] * 8},
        # 1 of 10 said "no": 9 of the 10 left-out sets hold it once -> 9/3/10 = 0.3
        {"prediction": "No", "answers": ["yes"] * 9 + ["no"]},
        # "two" normalises to "2", which 3 humans gave, plus 2 gave "two": 5 matches -> 1.0
        {"prediction": "two", "answers": ["2"] * 3 + ["two"] * 2 + ["3"] * 5},
    ]
    metrics = score("vqa", items)
    assert [i["score"] for i in items] == pytest.approx([0.6, 0.3, 1.0])
    assert metrics["vqa_accuracy"]["value"] == pytest.approx(1.9 / 3)
    assert metrics["vqa_accuracy"]["n"] == 3


def test_gqa_exact_match_scoring_of_known_predictions():
    items = [{"prediction": "Yes.", "answers": ["yes"]}, {"prediction": "the green", "answers": ["green"]},
             {"prediction": "blue", "answers": ["green"]}, {"prediction": "left side", "answers": ["left"]}]
    metrics = score("exact", items)
    assert [i["score"] for i in items] == [1.0, 1.0, 0.0, 0.0]
    assert metrics["exact_match"]["value"] == 0.5


def test_pope_scoring_of_known_predictions():
    # LLaVA's rule: 'no' iff the first sentence has "no" or "not"; anything else is 'yes'.
    items = [
        {"prediction": "Yes, there is a dog.", "label": "yes"},  # TP
        {"prediction": "No.", "label": "yes"},  # FN
        {"prediction": "yes", "label": "no"},  # FP
        {"prediction": "There is no cup.", "label": "no"},  # TN
        {"prediction": "I think so", "label": "yes"},  # TP (no "no"/"not")
        {"prediction": "NO", "label": "no"},  # TN
    ]
    metrics = score("pope", items)
    values = {name: m["value"] for name, m in metrics.items()}
    # TP=2 FP=1 TN=2 FN=1: accuracy 4/6, precision 2/3, recall 2/3, F1 2/3, yes-ratio 3/6
    assert values == pytest.approx(
        {"accuracy": 4 / 6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 0.5}
    )
    assert (metrics["precision"]["n"], metrics["recall"]["n"], metrics["f1"]["n"]) == (3, 3, 6)
    assert [i["score"] for i in items] == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]


def test_pope_f1_interval_brackets_the_value_and_collapses_when_perfect():
    import random

    rng = random.Random(0)
    items = [{"prediction": rng.choice(["yes", "no"]), "label": rng.choice(["yes", "no"])} for _ in range(200)]
    f1 = score("pope", items)["f1"]
    tp = sum(i["prediction"] == i["label"] == "yes" for i in items)
    fp = sum(i["prediction"] == "yes" != i["label"] for i in items)
    fn = sum(i["prediction"] == "no" != i["label"] for i in items)
    assert f1["value"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert f1["ci95"][0] < f1["value"] < f1["ci95"][1]
    perfect = score("pope", [{"prediction": label, "label": label} for label in ["yes", "no"] * 10])["f1"]
    assert perfect == {"value": 1.0, "n": 20, "ci95": [1.0, 1.0]}


def test_pope_without_yes_predictions_reports_zero_precision():
    metrics = score("pope", [{"prediction": "no", "label": "yes"}, {"prediction": "no", "label": "no"}])
    assert metrics["precision"] == {"value": 0.0, "n": 0, "ci95": None}
    assert metrics["f1"]["value"] == 0.0 and metrics["accuracy"]["value"] == 0.5


def test_multiple_choice_scoring_of_known_predictions():
    choices = ["red", "blue", "green"]
    items = [{"prediction": p, "choices": choices, "label": "B"}
             for p in ["B", "The answer is (C).", "blue", "I don't know"]]
    metrics = score("choice", items)
    assert [i["choice"] for i in items] == ["B", "C", "B", None]
    assert metrics["accuracy"]["value"] == 0.5 and metrics["accuracy"]["n"] == 4


def test_a_question_past_the_lms_context_is_skipped_with_its_reason_and_the_rest_answered(tiny_model, images):
    from vlm.evaluate import generate
    from vlm.vqa_benchmarks import get_benchmark

    class Selection(list):
        benchmark = get_benchmark("vqav2")

    def record(i, question):
        return {"index": i, "question_id": i, "image": images[i], "question": question, "answers": ["red"] * 10}

    selection = Selection([record(0, "what color?"), record(1, "circle " * 600), record(2, "what shape?")])
    items, skipped = generate(tiny_model, selection, cot=False, ocr=False, batch_size=2, max_new_tokens=4)
    assert [i["question_id"] for i in items] == [0, 2]
    assert [(s["index"], s["question_id"]) for s in skipped] == [(1, 1)]
    assert "context of 512 tokens" in skipped[0]["error"] and json.dumps(skipped)  # results.json holds it
    alone = tiny_model.chat([images[2]], [[{"role": "user", "content": items[1]["prompt"]}]], max_new_tokens=4)[0]
    assert items[1]["prediction"] == alone


def test_loading_in_worker_processes_gives_the_same_answers_in_the_same_order(tiny_model, images):
    from vlm.evaluate import generate
    from vlm.vqa_benchmarks import get_benchmark

    class Selection(list):
        benchmark = get_benchmark("vqav2")

    questions = ["what color?", "what shape?", "is it round?", "how many?", "where is it?"]
    selection = Selection({"index": i, "question_id": i, "image": images[i % len(images)], "question": q,
                           "answers": ["red"] * 10} for i, q in enumerate(questions))
    here, _ = generate(tiny_model, selection, cot=False, ocr=False, batch_size=2, max_new_tokens=4, num_workers=0)
    workers, _ = generate(tiny_model, selection, cot=False, ocr=False, batch_size=2, max_new_tokens=4, num_workers=2)
    assert [i["question_id"] for i in workers] == list(range(len(questions)))
    assert [i["prediction"] for i in workers] == [i["prediction"] for i in here]
    assert all("image" not in i for i in workers)
