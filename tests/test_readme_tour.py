"""The README's tour runs as written, top to bottom, from a fresh clone, and leaves its outputs under runs/.

The quick tests check every line without running it: each parses with the CLI (flags and values),
each file it reads exists in the repository or is made by an earlier line, MNIST is fetched before
it is used, and every output goes under runs/. The slow test really runs the tour in a `git clone`
of this checkout and prints each line's wall time (the README quotes them); it downloads MNIST,
so it only runs when asked: `SPARSIFY_TOUR=1 pytest -m slow -s tests/test_readme_tour.py`.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_COMMANDS = {"transform", "run"}           # commands that make a run directory (--out)
READS_RUN = {"inspect", "train", "export", "bench", "fit-profile"}


def tour_lines() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## A tour of the CLI"):]
    block = re.search(r"```\n(.+?)\n```", section, flags=re.S).group(1)
    return [argv for line in block.splitlines() if (argv := shlex.split(line, comments=True))]


def _option(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_tour_lines_parse_with_the_cli():
    import typer.main

    from sparsify.cli import app

    root = typer.main.get_command(app)
    lines = tour_lines()
    assert len(lines) >= 15
    for argv in lines:
        if argv[0] == "python":
            assert (ROOT / argv[1]).is_file(), argv
            continue
        assert argv[0] == "sparsify", argv
        ctx = root.make_context("sparsify", argv[1:], resilient_parsing=False)
        sub = root.get_command(ctx, argv[1])
        rest = argv[2:]
        while hasattr(sub, "get_command") and rest and sub.get_command(ctx, rest[0]) is not None:
            sub, rest = sub.get_command(ctx, rest[0]), rest[1:]
        sub.make_context(argv[1], rest, parent=ctx)  # raises on an unknown flag or a bad value


def test_tour_reads_only_what_exists_or_an_earlier_line_made_and_writes_under_runs():
    made: set[str] = set()
    fetched: set[str] = set()
    for argv in tour_lines():
        if argv[0] == "python":
            made.add(argv[2])
            continue
        command, args = argv[1], argv[2:]
        out = _option(args, "--out")
        if out is not None:
            assert out.startswith("runs/"), argv
        if command == "data":
            fetched.add(args[1])
        data = _option(args, "--data")
        if data in ("mnist", "fashion-mnist"):
            assert data in fetched, f"{' '.join(argv)} runs before `sparsify data fetch {data}`"
        elif data is not None and data not in ("digits", "synthetic"):
            assert data in made, argv
        weights = _option(args, "--weights")
        if weights is not None:
            assert weights.split("/weights")[0] in made, argv
        positional = [a for a in args if not a.startswith("-")][:1]
        if command in READS_RUN and positional and not positional[0].startswith("zoo:"):
            target = positional[0]
            assert target in made or (ROOT / target).is_file(), f"{' '.join(argv)} reads {target}, made by no line"
        if command == "transform" and not args[0].startswith("zoo:"):
            assert (ROOT / args[0].split(":")[0]).is_file(), argv
        if out is not None:
            made.add(out)
        plot = _option(args, "--plot")
        if plot is not None:
            assert plot.startswith("runs/"), argv
    assert "runs/" in (ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SPARSIFY_TOUR"), reason="downloads MNIST and takes ~15 min: SPARSIFY_TOUR=1")
def test_tour_runs_as_written_from_a_fresh_clone(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    sparsify = shutil.which("sparsify") or f"{sys.executable} -m sparsify"
    env = dict(os.environ, COLUMNS="80")
    times = []
    for argv in tour_lines():
        cmd = ([sys.executable] + argv[1:]) if argv[0] == "python" else (shlex.split(sparsify) + argv[1:])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=3600)
        times.append((time.perf_counter() - t0, " ".join(argv)))
        assert proc.returncode == 0, (argv, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, proc.stderr
    status = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=clone, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    untracked = [line for line in status if line.startswith("??")]
    ignored = sorted({line[3:].split("/")[0] for line in status if line.startswith("!!")} - {"__pycache__"})
    assert not untracked and ignored == ["runs"], status
    for seconds, line in times:
        print(f"{seconds:7.1f} s  {line}")
