"""The README's first two commands are the project's front door: CI must run the second one verbatim."""
from __future__ import annotations

from conftest import REPO_ROOT


def _readme_commands() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command_verbatim():
    install_and_run, tests = _readme_commands()[:2]
    assert install_and_run.startswith("pip install -e .") and "diffspec" in install_and_run
    assert "pytest" in tests and "pip install -e '.[test]'" in tests  # a fresh venv has no pytest
    ci = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in [line.strip() for line in ci]
