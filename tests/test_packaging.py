"""What `pip install .` puts into site-packages: everything under the `vlm` name, nothing else."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_the_wheel_installs_everything_under_vlm_and_nothing_else(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("vlm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"vlm"}
    for module in ("vlm/cli.py", "vlm/data/sources.py", "vlm/train/trainer.py", "vlm/demo/app.py",
                   "vlm/configs/offline.yaml", "vlm/examples/shape_0.png"):
        assert module in names, f"{module} is missing from the wheel"
    presets = {p.name for p in (ROOT / "configs").glob("*.yaml")}
    assert presets == {Path(n).name for n in names if n.startswith("vlm/configs/")}
