"""CI must run exactly the README's commands, so that CI cannot pass where a newcomer fails.

The README has one install command (the bash block under "## Install") and one test
command (the bash block under "## Tests"); `.ci/run` must contain both verbatim (it may
prefix `python -m` to pip and export the environment variables the test command sets).
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _first_bash_block(markdown: str, heading: str) -> str:
    section = markdown.split(f"\n{heading}\n", 1)[1]
    return re.search(r"```bash\n(.*?)\n```", section, re.S).group(1).strip()


def _ci_commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_ci_runs_the_readme_install_command():
    readme = (ROOT / "README.md").read_text()
    install = _first_bash_block(readme, "## Install")
    assert "\n" not in install, "the README must have ONE install command"
    as_ci = install.replace("pip install", "python -m pip install --quiet")
    assert as_ci in _ci_commands(), f"{as_ci!r} is not a line of .ci/run"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = _first_bash_block(readme, "## Tests")
    env, _, pytest_cmd = command.rpartition(" python ")
    ci = _ci_commands()
    assert f"python {pytest_cmd}" == ci[-1], "the last command of .ci/run must be the tests"
    exports = " ".join(line for line in ci if line.startswith("export "))
    for assignment in env.split():
        assert assignment in exports, f"{assignment} (README test command) is not set in CI"
