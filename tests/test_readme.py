import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_install_step_and_test_command():
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    main_job, tests = blocks[0], blocks[1]
    install = main_job.split(" && vlm ")[0]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci_lines and tests in ci_lines
    assert ci_lines.index(install) < ci_lines.index(tests)
