"""The README's two commands are the ones that CI and a new user actually run."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```\n(.+?)\n```", text, flags=re.S)[:2]


def test_readme_starts_with_the_pipeline_and_the_test_command():
    run, test = _readme_commands()
    assert run.strip().endswith("sparsify run")
    assert "constraints.txt" in run and "constraints.txt" in test
    assert test.strip().endswith("pytest -n 2")


def test_ci_runs_the_readme_test_command_verbatim():
    _, test = _readme_commands()
    assert test.strip() in (ROOT / ".ci" / "run").read_text()


def test_constraints_pin_the_cpu_torch_that_pyproject_admits():
    pins = (ROOT / "constraints.txt").read_text()
    assert re.search(r"^torch==2\.13\.0$", pins, flags=re.M)
    pyproject = (ROOT / "pyproject.toml").read_text()
    lo = re.search(r'"torch>=([\d.]+),<(\d+)"', pyproject)
    assert lo and tuple(map(int, lo.group(1).split("."))) <= (2, 13) and int(lo.group(2)) > 2
