"""What a user expects of any CLI: umask, --version/-h, flags shown as flags, one meaning of --json, 80 columns."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from cli_checks import assert_ok, assert_one_error_line, invoke


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def narrow(monkeypatch):
    """The consoles render at 80 columns, as in a default terminal."""
    from sparsify.cli import _common

    monkeypatch.setattr(_common.out, "width", 80)
    monkeypatch.setattr(_common.err, "width", 80)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.stat().st_mode)
            for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600),
                                                        (0o002, 0o775, 0o664)])
def test_outputs_respect_the_umask(umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        assert_ok(invoke("transform", "zoo:mlp", "--density", "0.1", "--out", "runs/m"))
        assert_ok(invoke("export", "runs/m", "--out", "m.onnx", "--no-verify"))
    finally:
        os.umask(old)
    modes = _modes(Path("runs/m"))
    assert modes["m"] == dir_mode, modes
    assert all(mode == file_mode for name, mode in modes.items() if name != "m"), modes
    assert stat.S_IMODE(Path("m.onnx").stat().st_mode) == file_mode
    assert stat.S_IMODE(Path("runs").stat().st_mode) == dir_mode


def test_version_and_short_help():
    from sparsify import __version__

    r = invoke("--version")
    assert_ok(r)
    assert r.stdout.strip() == f"sparsify {__version__}"
    for args in (["-h"], ["train", "-h"], ["data", "fetch", "-h"]):
        r = invoke(*args)
        assert_ok(r)
        assert "Usage:" in r.stdout


@pytest.mark.parametrize("command", ["train", "transform", "export", "bench", "run", "inspect", "fit-profile"])
def test_help_shows_flags_as_flags(command):
    r = invoke(command, "--help", env={"COLUMNS": "200"})
    assert_ok(r)
    assert "<bool>" not in r.stdout, r.stdout
    assert "--json" in r.stdout


def test_json_means_print_json_in_every_command(tmp_path):
    """--json prints the command's result as JSON on stdout (nothing else there); files are written by other flags."""
    results = {}
    for name, args in {
        "transform": ["transform", "zoo:lenet5", "--density", "0.1", "--out", "runs/l"],
        "inspect": ["inspect", "runs/l"],
        "train": ["train", "runs/l", "--epochs", "1", "--train-limit", "100", "--schedule", "rigl", "-q"],
        "fit-profile": ["fit-profile", "runs/l"],
        "export": ["export", "runs/l", "--out", "runs/l.onnx", "--no-verify"],
        "inspect-onnx": ["inspect", "runs/l.onnx"],
        "bench": ["bench", "runs/l.onnx", "--no-memory", "--min-time", "0", "--repeats", "1", "--warmup", "0",
                  "-q", "--json-file", "runs/b.json"],
        "runtime": ["runtime", "info"],
        "zoo": ["zoo"],
    }.items():
        r = invoke(*args, "--json")
        assert_ok(r)
        results[name] = json.loads(r.stdout)
    assert results["transform"]["run_dir"] == "runs/l"
    assert results["train"]["epochs"] == 1 and results["bench"]["baseline"] == "l"
    assert json.loads(Path("runs/b.json").read_text())["rows"][0]["label"] == "l"
    assert {"model": "zoo:lenet5", "input_shape": [1, 1, 28, 28]}.items() <= next(
        e for e in results["zoo"] if e["model"] == "zoo:lenet5").items()


def test_bench_json_with_a_file_name_says_json_file():
    Path("a.onnx").write_bytes(b"")
    assert_one_error_line(invoke("bench", "a.onnx", "--json", "out.json"), "--json-file out.json")


def test_run_batch_size_old_spelling_is_noted_and_means_the_bench_batch():
    r = invoke("run", "--batch-size", "0", "--out", "R", "-q")
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 2, r.output
    assert lines[0].startswith("note:") and "--bench-batch-size" in lines[0] and "--train-batch-size" in lines[0]
    assert lines[1].startswith("error: --bench-batch-size '0'")
    assert_one_error_line(invoke("run", "--batch-size", "1", "--bench-batch-size", "2", "--out", "R"),
                          "--bench-batch-size only")
    assert not Path("R").exists()


def test_inspect_fits_80_columns(narrow):
    for target in ("zoo:resnet18", "zoo:inception-mini"):  # ResNet-18: ImageNet-size counts, Inception: long names
        r = invoke("inspect", target)
        assert_ok(r)
        widths = [len(line) for line in r.stdout.splitlines()]
        assert max(widths) <= 80, (target, max(widths))
        # no name is cut: every layer's name is in the output, whole or folded onto the next line
        flat = r.stdout.replace("\n", "")
        data = json.loads(invoke("inspect", target, "--json").stdout)
        assert all(layer["name"] in flat or layer["name"][:10] in flat for layer in data["layers"])
        assert "…" not in r.stdout


def test_inspect_onnx_fits_80_columns(narrow):
    assert_ok(invoke("transform", "zoo:resnet20", "--density", "0.1", "--out", "runs/r"))
    assert_ok(invoke("export", "runs/r", "--out", "r.onnx", "--no-verify"))
    r = invoke("inspect", "r.onnx")
    assert_ok(r)
    assert max(len(line) for line in r.stdout.splitlines()) <= 80
    assert "layers.3.conv1.0" in r.stdout and "…" not in r.stdout


def test_training_lines_fit_80_columns(narrow):
    from sparsify.cli.train import epoch_line

    widest = {"epoch": 100, "train_loss": 12.3456, "train_acc": 0.9999, "val_loss": 1234.5, "val_acc": 1.0,
              "lr": 0.123456, "pruned": 123456, "grown": 123455, "epoch_time_s": 1234.5}
    assert len(epoch_line(widest, 100)) <= 80, epoch_line(widest, 100)
    assert_ok(invoke("transform", "zoo:lenet5", "--density", "0.1", "--out", "runs/l"))
    r = invoke("train", "runs/l", "--epochs", "2", "--train-limit", "100", "--schedule", "set")
    assert_ok(r)
    table = [line for line in r.output.splitlines() if not line.startswith(("warning:", "note:"))]
    assert max(len(line) for line in table) <= 80, r.output
    assert "epoch 2/2" in r.output and "moved" in r.output


def test_user_text_is_printed_as_written():
    """Paths and names are the user's: rich markup ("[red]") and emoji codes (":A:") in them are text."""
    out_dir = "runs/[red]x:A:y"
    r = invoke("transform", "zoo:lenet5", "--density", "0.1", "--out", out_dir)
    assert_ok(r)
    assert Path(out_dir).is_dir()
    assert out_dir in r.output, r.output
    line = assert_one_error_line(invoke("transform", "zoo:[bold]nosuch:A:", "--density", "0.1", "--out", "o"))
    assert "[bold]nosuch:A:" in line, line


def test_ctrl_c_that_surfaces_as_an_error_or_is_swallowed_reports_interrupted():
    """A Ctrl-C whose KeyboardInterrupt a library turned into another error (a lazy import inside
    torch left half-initialised), or swallowed, is still reported as the interrupt: exit 130."""
    import signal
    import time

    import typer
    from typer.testing import CliRunner

    from sparsify.cli._common import SparsifyTyper, handle_errors
    from sparsify.errors import TraceError

    app = SparsifyTyper()

    @app.command()
    @handle_errors
    def work(mode: str = typer.Argument(...), interrupt: bool = typer.Option(True, "--interrupt/--no-interrupt")):
        if interrupt:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(2)  # the handler raises KeyboardInterrupt here
            except KeyboardInterrupt:
                pass  # swallowed, as inside a library
        if mode == "error":
            raise TraceError("torch.fx cannot trace M (AttributeError: module 'torch._dynamo' has no attribute 'guards')")

    @app.command()
    @handle_errors
    def term() -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # kill, timeout: it ended the process on the spot
        time.sleep(2)

    @app.command()
    def other() -> None:
        pass

    # Python's own SIGINT handler, as in a terminal: a process started in the background by a shell
    # (CI under `&`) inherits SIGINT ignored, and Ctrl-C cannot reach it at all
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for mode in ("error", "ok"):
            r = CliRunner().invoke(app, ["work", mode])
            assert r.exit_code == 130 and "interrupted" in r.output and "cannot trace" not in r.output, r.output
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        r = CliRunner().invoke(app, ["work", "error", "--no-interrupt"])
        assert r.exit_code == 2 and "cannot trace" in r.output, r.output
        assert CliRunner().invoke(app, ["work", "ok", "--no-interrupt"]).exit_code == 0
        r = CliRunner().invoke(app, ["term"])
        assert r.exit_code == 143 and "interrupted" in r.output, r.output
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        # a background job (`cmd &` in a script) has SIGINT ignored: SIGTERM still cleaned up (it
        # ended the process on the spot, leaving the temporary run directory behind)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        r = CliRunner().invoke(app, ["term"])
        assert r.exit_code == 143 and "interrupted" in r.output, r.output
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_full_disk_is_one_line():
    # onnx.save_model, Pillow and write_text raised OSError [Errno 28] as a traceback, exit 1
    import errno

    from typer.testing import CliRunner

    from sparsify.cli._common import SparsifyTyper, handle_errors

    app = SparsifyTyper()

    @app.command()
    @handle_errors
    def write(what: str) -> None:
        if what == "full":
            raise OSError(errno.ENOSPC, "No space left on device", "out/x.onnx")
        raise OSError(errno.EBADF, "Bad file descriptor")

    @app.command()
    def other() -> None:
        pass

    r = CliRunner().invoke(app, ["write", "full"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "No space left on device (out/x.onnx)" in r.output and "free some space" in r.output
    assert CliRunner().invoke(app, ["write", "other"]).exit_code == 1  # not the user's to fix: not hidden


def test_a_batch_that_cannot_be_allocated_is_one_line():
    # numpy's MemoryError ("Unable to allocate 10.9 PiB ...") was a traceback, exit 1
    import torch
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten()).eval()
    torch.onnx.export(model, (torch.randn(1, 3, 8, 8),), "t.onnx", dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})
    # 10^15 images of 3x8x8 floats: 768 PB, more than any address space (never overcommitted)
    r = invoke("bench", "t.onnx", "-b", str(10**15), "--no-memory", "--min-time", "0", "--repeats", "1")
    assert_one_error_line(r, "out of memory")
    assert "--batch-size" in r.output


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:121] . "
                                                                "DefaultCPUAllocator: can't allocate memory: "
                                                                "you tried to allocate 9 bytes."),
                                   RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : BFCArena::"
                                                "AllocateRawInternal Failed to allocate memory for requested "
                                                "buffer of size 9")])
def test_out_of_memory_from_torch_or_onnxruntime_is_one_line(error):
    from typer.testing import CliRunner

    from sparsify.cli._common import SparsifyTyper, handle_errors

    app = SparsifyTyper()

    @app.command()
    @handle_errors
    def allocate(what: str) -> None:
        raise error if what == "big" else RuntimeError("a bug")

    @app.command()
    def other() -> None:
        pass

    r = CliRunner().invoke(app, ["allocate", "big"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert r.output.startswith("error: out of memory") and "--batch-size" in r.output
    assert CliRunner().invoke(app, ["allocate", "small"]).exit_code == 1  # any other error is not hidden


def test_a_file_name_too_long_is_one_line():
    # transform --out LLL...(300) was an OSError [Errno 36] traceback
    r = invoke("transform", "zoo:mlp", "--method", "sparse-random", "--density", "0.5", "--out", "L" * 300)
    assert_one_error_line(r, "File name too long")
    assert "shorter name" in r.output


@pytest.mark.parametrize("value", ["1,,2", "0", "1,x", ""])
def test_bench_batch_sizes_are_checked_item_by_item(value):
    # "1,,2" was read as 1,2 (the empty item dropped), where run's own lists refuse it
    assert_one_error_line(invoke("bench", "a.onnx", "-b", value), "--batch-size")


def test_run_names_its_own_training_batch_option():
    r = invoke("run", "zoo:mlp", "--density", "0.5", "--train-batch-size", "0")
    assert_one_error_line(r, "--train-batch-size must be at least 1")


def test_options_a_method_or_optimizer_does_not_take_are_refused_not_dropped():
    # sparse-random dropped --profile-param and Adam dropped --momentum without a word
    assert_one_error_line(invoke("transform", "zoo:mlp", "--method", "sparse-random", "--density", "0.5",
                                 "--profile-param", "sigma=2", "--out", "r"), "--profile-param applies to --method psn")
    assert not Path("r").exists()
    assert_ok(invoke("transform", "zoo:mlp", "--method", "psn", "--density", "0.5", "--profile-param", "sigma=2",
                     "--out", "p"))
    assert_ok(invoke("transform", "zoo:mlp", "--method", "sparse-random", "--density", "0.5", "--out", "r"))
    assert_one_error_line(invoke("train", "r", "--optimizer", "adam", "--momentum", "0.5", "--epochs", "1"),
                          "--momentum applies to --optimizer sgd")
