import pytest

from vlm.cli import main


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
