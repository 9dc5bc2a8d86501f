"""The llava-1.5-recipe preset and the README section that says which files it reads: the two cannot drift apart."""

import re
import shlex
from pathlib import Path

from vlm.config import load_config
from vlm.train.trainer import check_config

ROOT = Path(__file__).resolve().parent.parent
PRESET = "llava-1.5-recipe"
DESTINATION = re.compile(r"`data\.(align|instruct)\.(path|image_root)`")


def section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Train on LLaVA-1.5's data")
    return text[start: text.index("\n## ", start + 1)]


def table() -> list[dict]:
    """The section's table of downloads: stage, file, from, and where it goes (which data key)."""
    rows = []
    for line in section().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in ("align", "instruct"):
            stage, file, source, goes_to = cells
            (destination,) = DESTINATION.findall(goes_to)
            assert destination[0] == stage, line
            rows.append({"stage": stage, "file": file, "from": source, "key": destination[1]})
    return rows


def overrides() -> list[str]:
    """The key=value overrides of the section's `vlm train` command, which names its data folder $DATA."""
    (block,) = [b for b in re.findall(r"```bash\n(.*?)\n```", section(), re.S) if f"--config {PRESET}" in b]
    words = shlex.split(block[block.index("vlm train"):].replace("\\\n", " "))
    assert words[:4] == ["vlm", "train", "--config", PRESET]
    return words[4:]


def test_the_readme_names_every_file_the_preset_reads_and_the_command_points_at_them(tmp_path):
    rows = table()
    preset = load_config(PRESET)
    named = {(r["stage"], r["key"]) for r in rows}
    assert named == {(stage, key) for stage in ("align", "instruct") for key in ("path", "image_root")}
    for row in rows:
        if row["key"] == "path":
            assert Path(getattr(preset.data, row["stage"]).path).name == row["file"].strip("`")
            assert re.fullmatch(r"Hub dataset `liuhaotian/LLaVA-[\w-]+`", row["from"])

    config = load_config(PRESET, [o.replace("$DATA", str(tmp_path)) for o in overrides()])
    for stage in ("align", "instruct"):
        given, default = getattr(config.data, stage), getattr(preset.data, stage)
        # The command moves the preset's data/ folder elsewhere and changes nothing else.
        for key in ("path", "image_root"):
            assert Path(getattr(given, key)).relative_to(tmp_path) == Path(getattr(default, key)).relative_to("data")
    # Laid out as the table says, the command's locations are what `vlm train` checks before loading anything.
    for row in rows:
        source = getattr(config.data, row["stage"])
        if row["key"] == "path":
            Path(source.path).parent.mkdir(parents=True, exist_ok=True)
            Path(source.path).write_text("[]")
        else:
            Path(source.image_root).mkdir(parents=True, exist_ok=True)
    assert config.train.stage == "both"
    check_config(config, ["align", "instruct"])  # raises on a location the table got wrong


def test_the_preset_is_llava_15s_recipe_with_the_global_batches_reached_on_one_gpu():
    config = load_config(PRESET)
    assert config.model.vision.name == "openai/clip-vit-large-patch14-336" and config.model.vision.drop_cls
    assert config.model.vision.feature_layer == -2 and config.data.max_length == 2048
    align, instruct = config.train.align, config.train.instruct
    # LLaVA-1.5: stage 1 at 1e-3 with global batch 256, stage 2 (LoRA variant) at 2e-4 with 128, one epoch each.
    assert (align.lr, align.batch_size * align.grad_accum, align.epochs, align.train_lm) == (1e-3, 256, 1, "none")
    assert (instruct.lr, instruct.batch_size * instruct.grad_accum, instruct.epochs) == (2e-4, 128, 1)
    assert (instruct.train_lm, instruct.lora_r, instruct.lora_alpha) == ("lora", 128, 256)
    per_step = re.search(r"\((\d+) x (\d+) and (\d+) x (\d+)\)", section()).groups()
    assert [int(n) for n in per_step] == [align.batch_size, align.grad_accum, instruct.batch_size, instruct.grad_accum]
