"""The throughput benchmarks on tiny configs (CPU): every system's rows appear, vlm's rows are stated against
each transformers LLaVA reference that ran (eager and compiled), and each ratio is the division of the two
rows it compares, not a copied figure."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import eval_throughput, packing_throughput, train_throughput
from benchmarks.common import _cell, against_references

LLAVA, LLAVA_COMPILED, VLM_EAGER = "llava (transformers)", "llava compiled (transformers)", "vlm eager"


def tables(text: str) -> list[list[dict]]:
    """The Markdown tables print_table wrote to `text`, each as a list of {column: cell}."""
    found, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip()[1:-1].split("|")])
        elif block:
            header, _, *body = block
            found.append([dict(zip(header, cells, strict=True)) for cells in body] or [dict.fromkeys(header)])
            block = []
    return found


def find(rows: list[dict], **fields) -> dict:
    (row,) = [row for row in rows if all(str(row[k]) == str(v) for k, v in fields.items())]
    return row


def assert_ratio(cell: str, numerator: float, denominator: float) -> None:
    """A printed ratio cell is the division of the two measured figures (nan for CPU memory)."""
    assert cell == _cell(numerator / denominator), (cell, numerator, denominator)


def test_against_references_divides_each_row_by_each_reference_that_ran():
    references = {"llava": "llava", "llava compiled": "llava compiled"}
    rows = [
        {"system": "llava", "stage": 1, "rate": 10.0},
        {"system": "llava compiled", "stage": 1, "rate": 20.0},
        {"system": "vlm", "stage": 1, "rate": 50.0},
        {"system": "llava", "stage": 2, "rate": 4.0},
        {"system": "vlm", "stage": 2, "rate": 8.0},  # stage 2 ran without the compiled reference
        {"system": "vlm", "stage": 3, "rate": 1.0},  # no reference at all: left out
    ]
    out = against_references(rows, references, ["stage"], {"rate": "speed"})
    assert out == [
        {"stage": 1, "system": "llava compiled", "speed vs llava": 2.0},
        {"stage": 1, "system": "vlm", "speed vs llava": 5.0, "speed vs llava compiled": 2.5},
        {"stage": 2, "system": "vlm", "speed vs llava": 2.0},
    ]


def test_train_throughput_states_every_vlm_row_against_eager_and_compiled_llava(tmp_path, capsys):
    out = tmp_path / "rows.json"
    train_throughput.main(["--tiny", "--pairs", "vit-b16:smollm2-135m", "--stages", "1", "--steps", "1",
                           "--warmup", "1", "--device", "cpu", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [row["system"] for row in rows] == [LLAVA, LLAVA_COMPILED, "vlm", "vlm + feature cache", "vlm compiled",
                                               "vlm compiled + feature cache"]
    assert all(row["samples/s"] > 0 and row["MFU %"] > 0 for row in rows)

    *_, table, ratio_table = tables(capsys.readouterr().out)
    assert [row["system"] for row in table] == [row["system"] for row in rows]
    assert list(ratio_table[0]) == ["backbones", "stage", "system", "samples/s vs llava",
                                    "samples/s vs llava compiled", "peak memory vs llava",
                                    "peak memory vs llava compiled"]
    eager, compiled = find(rows, system=LLAVA), find(rows, system=LLAVA_COMPILED)
    assert [row["system"] for row in ratio_table] == [LLAVA_COMPILED, *[r["system"] for r in rows[2:]]]
    for row in rows[2:]:
        ratio = find(ratio_table, system=row["system"])
        assert_ratio(ratio["samples/s vs llava"], row["samples/s"], eager["samples/s"])
        assert_ratio(ratio["samples/s vs llava compiled"], row["samples/s"], compiled["samples/s"])
        assert_ratio(ratio["peak memory vs llava"], row["peak GiB"], eager["peak GiB"])  # nan on the CPU
        assert_ratio(ratio["peak memory vs llava compiled"], row["peak GiB"], compiled["peak GiB"])
    compiled_ratio = find(ratio_table, system=LLAVA_COMPILED)
    assert_ratio(compiled_ratio["samples/s vs llava"], compiled["samples/s"], eager["samples/s"])
    assert compiled_ratio["samples/s vs llava compiled"] == ""  # never against itself


def test_train_throughput_ratio_columns_follow_the_references_in_the_run(tmp_path, capsys):
    out = tmp_path / "rows.json"
    train_throughput.main(["--tiny", "--pairs", "vit-b16:smollm2-135m", "--stages", "2", "--steps", "1",
                           "--warmup", "1", "--device", "cpu", "--systems", "vlm", "llava", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [row["system"] for row in rows] == [LLAVA, "vlm", "vlm + feature cache"]
    ratio_table = tables(capsys.readouterr().out)[-1]
    assert list(ratio_table[0]) == ["backbones", "stage", "system", "samples/s vs llava", "peak memory vs llava"]
    for row in rows[1:]:
        assert_ratio(find(ratio_table, system=row["system"])["samples/s vs llava"], row["samples/s"],
                     rows[0]["samples/s"])


EVAL_ARGS = ["--tiny", "--device", "cpu", "--batches", "1", "2", "--questions", "2", "--new-tokens", "2",
             "--stream-tokens", "3"]


def test_eval_throughput_states_vlm_against_eager_and_compiled_llava(tmp_path, capsys):
    out = tmp_path / "eval.json"
    eval_throughput.main([*EVAL_ARGS, "--json", str(out)])
    result = json.loads(out.read_text())
    rows, stream = result["batched"], result["stream"]
    systems = ["vlm", LLAVA, LLAVA_COMPILED, VLM_EAGER]
    assert [(row["system"], row["batch"]) for row in rows] == [(name, batch) for name in systems for batch in (1, 2)]
    assert [row["system"] for row in stream] == systems

    printed = capsys.readouterr().out
    assert "left out" not in printed
    batched_table, batch_ratios, stream_table, stream_ratios = tables(printed)[-4:]
    assert [row["system"] for row in batched_table] == [row["system"] for row in rows]
    assert list(batch_ratios[0]) == ["system", "batch", "questions/s vs llava", "questions/s vs llava compiled",
                                     "questions/s vs vlm eager"]
    for batch in (1, 2):
        vlm, ratio = find(rows, system="vlm", batch=batch), find(batch_ratios, system="vlm", batch=batch)
        for column, reference in (("questions/s vs llava", LLAVA), ("questions/s vs llava compiled", LLAVA_COMPILED),
                                  ("questions/s vs vlm eager", VLM_EAGER)):
            assert_ratio(ratio[column], vlm["questions/s"], find(rows, system=reference, batch=batch)["questions/s"])
        eager_ratio = find(batch_ratios, system=VLM_EAGER, batch=batch)
        assert eager_ratio["questions/s vs vlm eager"] == ""  # never against itself
        saved = find(result["batched ratios"], system="vlm", batch=batch)
        assert saved["questions/s vs llava compiled"] == (
            vlm["questions/s"] / find(rows, system=LLAVA_COMPILED, batch=batch)["questions/s"]
        )
    assert list(stream_ratios[0]) == ["system", *(f"{measure} vs {name}" for measure in ("time to first token",
                                      "decoding tokens/s") for name in ("llava", "llava compiled", "vlm eager"))]
    vlm, ratio = find(stream, system="vlm"), find(stream_ratios, system="vlm")
    for name, reference in (("llava", LLAVA), ("llava compiled", LLAVA_COMPILED), ("vlm eager", VLM_EAGER)):
        ref = find(stream, system=reference)
        assert_ratio(ratio[f"time to first token vs {name}"], vlm["time to first token ms"],
                     ref["time to first token ms"])
        assert_ratio(ratio[f"decoding tokens/s vs {name}"], vlm["tokens/s"], ref["tokens/s"])
    assert [row["system"] for row in stream_table] == systems


def test_eval_throughput_leaves_out_compiled_llava_when_its_generation_fails(tmp_path, capsys, monkeypatch):
    """Compiled generation is transformers' to support: a failure costs its row, not the run."""
    generate = eval_throughput.LlavaChat.generate

    def failing(self, *args, **kwargs):
        if self.compiled:
            raise RuntimeError("static cache unsupported here\nsecond line")
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(eval_throughput.LlavaChat, "generate", failing)
    out = tmp_path / "eval.json"
    eval_throughput.main([*EVAL_ARGS, "--systems", "vlm", "llava", "llava compiled", "--json", str(out)])
    result = json.loads(out.read_text())
    assert {row["system"] for row in result["batched"]} == {"vlm", LLAVA}
    printed = capsys.readouterr().out
    why = "llava compiled: left out, compiled generation failed: RuntimeError: static cache unsupported here\n"
    assert why in printed
    assert list(tables(printed)[-3][0]) == ["system", "batch", "questions/s vs llava"]


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 8])
def test_eval_warm_up_meets_every_prompt_the_timed_pass_does(batch):
    """A compiled reference must not compile (or record a CUDA graph) while it is timed."""
    calls = []

    class Recorder:
        def chat(self, images, conversations, **_):
            calls.append(tuple(messages[0]["content"] for messages in conversations))

    images, conversations = eval_throughput.make_questions(13)
    eval_throughput.questions_per_second(Recorder(), images, conversations, batch, 2, "cpu")
    timed = calls[-len(range(0, 13, batch)):]
    assert set(timed) <= set(calls[:-len(timed)])
    assert len(calls) - len(timed) <= 5  # not a second full pass


@pytest.mark.parametrize("script", [train_throughput, eval_throughput])
def test_compiled_references_are_in_the_default_systems(script):
    assert {"llava", "llava compiled"} <= set(script.build_parser().parse_args([]).systems)


def test_eval_throughput_preset_sets_the_shape_and_flags_override_it():
    args = eval_throughput.parse_args(["--preset", "easy-vqa-gpu", "--batches", "64"])
    assert (args.vision, args.lm, args.image_side, args.batches, args.new_tokens) == (
        "efficientnet-lite0", "smollm2-135m", 64, [64], 8)
    assert eval_throughput.parse_args([]).vision == "vit-l14-336"


def test_packing_throughput_states_padded_and_packed_vlm_against_llava_on_the_same_supervised_tokens(
        tmp_path, capsys):
    out = tmp_path / "rows.json"
    packing_throughput.main(["--tiny", "--examples", "24", "--device", "cpu", "--systems", "llava", "vlm packed",
                             "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [row["system"] for row in rows] == [LLAVA, "vlm packed", "vlm packed + feature cache"]
    assert len({row["supervised"] for row in rows}) == 1 and len({row["real"] for row in rows}) == 1
    packed = find(rows, system="vlm packed")
    assert packed["batches"] < rows[0]["batches"]  # rows of several examples: fewer, fuller batches
    ratio_table = tables(capsys.readouterr().out)[-1]
    assert list(ratio_table[0]) == ["system", "tokens/s vs llava", "supervised tokens/s vs llava",
                                    "peak memory vs llava"]
    for row in rows[1:]:
        ratio = find(ratio_table, system=row["system"])
        assert_ratio(ratio["tokens/s vs llava"], row["tokens/s"], rows[0]["tokens/s"])
        assert_ratio(ratio["supervised tokens/s vs llava"], row["supervised tokens/s"], rows[0]["supervised tokens/s"])


def test_packing_benchmark_lengths_have_the_665k_mix_percentiles():
    words = packing_throughput.text_lengths(20_000, scale=1.0) * packing_throughput.WORDS_PER_TOKEN
    for q, expected in ((10, 48), (50, 143), (90, 403), (99, 772)):
        assert abs(np.percentile(words, q) / expected - 1) < 0.05
