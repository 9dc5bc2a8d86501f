import pytest

from vlm.cli import EXAMPLES_DIR, main


@pytest.mark.parametrize("args, message", [
    (["chat", "--image", "no/such.png", "--question", "hi"], "does not exist"),
    (["chat", "--question", "hi", "--config", "no-such-preset"], "unknown preset"),
    (["chat", "--question", "hi", "--checkpoint", "no/such/dir"], "does not exist"),
])
def test_bad_input_is_one_clear_line_and_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_not_an_image_is_rejected(tmp_path, capsys):
    fake = tmp_path / "notes.png"
    fake.write_text("not really a png")
    assert main(["chat", "--image", str(fake), "--question", "hi"]) == 2
    assert "not an image" in capsys.readouterr().err


def test_a_question_past_the_lms_context_is_one_clear_line(checkpoint, capsys):
    assert main(["chat", "--checkpoint", str(checkpoint), "--question", "circle " * 600, "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vlm chat: the prompt is ") and "context of 512 tokens" in err and "shorten" in err


def test_image_placeholders_in_a_question_are_text_and_get_an_answer(checkpoint, capsys):
    from vlm.images import load_image
    from vlm.model import VisionLanguageModel

    question = "<image> and <image>: what shape?"
    assert main(["chat", "--checkpoint", str(checkpoint), "--question", question, "--max-new-tokens", "6"]) == 0
    expected = VisionLanguageModel.from_pretrained(checkpoint).chat(
        [load_image(EXAMPLES_DIR / "shape_0.png")], [[{"role": "user", "content": question}]], max_new_tokens=6)[0]
    assert capsys.readouterr().out.strip() == expected


@pytest.mark.parametrize("command, flag, value, valid", [
    ("chat", "--max-new-tokens", "0", "at least 1"),
    ("chat", "--max-new-tokens", "-5", "at least 1"),
    ("chat", "--top-p", "2", "(0, 1]"),
    ("chat", "--top-p", "0", "(0, 1]"),
    ("chat", "--temperature", "-1", "at least 0"),
    ("chat", "--temperature", "nan", "at least 0"),
    ("eval", "--max-new-tokens", "0", "at least 1"),
])
def test_generation_settings_out_of_range_are_one_line_naming_the_flag_and_range(
    checkpoint, capsys, command, flag, value, valid
):
    question = ["--question", "hi"] if command == "chat" else []
    assert main([command, "--checkpoint", str(checkpoint), *question, flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1  # refused before the model loads, which would announce itself
    assert err.startswith(f"vlm {command}: {flag} ") and valid in err and value in err


def test_a_disk_that_refuses_a_write_is_one_line(checkpoint, tmp_path, monkeypatch, capsys):
    import errno
    import os

    import vlm.files

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(vlm.files.tempfile, "mkdtemp", disk_full)  # atomic_dir's staging folder
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "llava")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"vlm export: cannot write {tmp_path / 'llava'}: No space left on device"
