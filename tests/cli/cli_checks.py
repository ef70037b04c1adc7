"""Helpers shared by the CLI tests: invoke the app, and assert the one-line error contract."""
from __future__ import annotations

import textwrap
from pathlib import Path

from typer.testing import CliRunner

from sparsify.cli import app


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def assert_ok(r) -> None:
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output, r.output


def assert_one_error_line(r, *needles: str, nothing_at: tuple[Path, ...] = ()) -> str:
    """Exit 2, exactly one non-empty line, 'error: ...', no traceback; no output or temporary file left."""
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output, r.output
    assert len(lines) == 1, r.output
    assert lines[0].startswith("error: ") and len(lines[0]) > len("error: ") + 10, r.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    for path in nothing_at:
        assert not path.exists(), f"{path} was left behind"
        if path.parent.is_dir():
            stray = [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]
            assert not stray, stray
    return lines[0]


def write(name: str, body: str) -> Path:
    """Write a dedented model file ``name`` in the current directory (the tests run in tmp)."""
    path = Path(name)
    path.write_text(textwrap.dedent(body).lstrip("\n"))
    return path
