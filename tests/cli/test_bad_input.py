"""Every kind of bad input a user can give is one `error:` line, exit code 2, and nothing left on disk.

One test (or parametrised test) per kind named in issue #11; the good-input half of a kind is
checked where it could regress into an error (a damaged summary.json must not stop a command).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from cli_checks import assert_ok, assert_one_error_line, invoke

FAST_BENCH = ["--no-memory", "--min-time", "0", "--repeats", "1", "--warmup", "0", "-q"]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def made_run(tmp_path_factory) -> Path:
    from sparsify.api import transform_to_dir

    out = tmp_path_factory.mktemp("bad-input") / "lenet"
    transform_to_dir("zoo:lenet5", "sparse-random", density=0.1, out=out)
    return out


@pytest.fixture
def run(made_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(made_run, dst)
    return dst


@pytest.fixture(scope="module")
def sparse_onnx(made_run, tmp_path_factory) -> Path:
    from sparsify.runtime.export import export_run

    out = tmp_path_factory.mktemp("onnx") / "lenet.onnx"
    export_run(made_run, out, verify=False)
    return out


# ---------------------------------------------------------------- outputs that cannot be written


@pytest.mark.parametrize("args, flag", [
    (["transform", "zoo:mlp", "--density", "0.1", "--out", "/proc/sparsify-test/run"], "--out"),
    (["run", "--out", "/proc/sparsify-test/run", "-q"], "--out"),
    (["bench", "missing.onnx", "--plot", "/proc/sparsify-test.png"], "--plot"),
    (["bench", "missing.onnx", "--json-file", "/proc/sparsify-test.json"], "--json-file"),
    (["bench", "missing.onnx", "--plot", "/nonexistent-sparsify-dir/p.png"], "does not exist"),
    (["data", "fetch", "mnist", "--data-dir", "/proc/sparsify-test", "--force"], "--data-dir"),
])
def test_unwritable_output_is_refused_before_the_work(args, flag):
    # bench names a file that does not exist: the output check comes before reading it
    assert_one_error_line(invoke(*args), flag)
    assert not Path("runs").exists()


def test_an_output_under_a_file_says_the_file_is_one(run, sparse_onnx, tmp_path):
    """`export --out model.onnx/x.onnx` and `compare --plot spec.toml/p.png` said "directory
    model.onnx does not exist" of a file that exists."""
    (tmp_path / "f.toml").write_text("")
    for args in (["export", sparse_onnx, "--out", tmp_path / "f.toml" / "x.onnx"],
                 ["export", run, "--out", tmp_path / "f.toml" / "x.onnx"],
                 ["compare", run, "--plot", tmp_path / "f.toml" / "p.png"]):
        line = assert_one_error_line(invoke(*args), "f.toml is a file, not a directory")
        assert "does not exist" not in line


def test_export_out_ending_in_a_slash_is_not_written_as_a_file(run, sparse_onnx):
    """`--out nodir/` wrote a file named nodir: Path() drops the slash that says "a directory"."""
    for source in (run, sparse_onnx):
        assert_one_error_line(invoke("export", source, "--out", "nodir/"), "--out nodir/ ends in a slash",
                              nothing_at=(Path("nodir"),))
    # an existing file with a slash: the advice was "such as a.onnx/model.onnx", which cannot be written
    Path("a.onnx").write_bytes(b"kept")
    line = assert_one_error_line(invoke("export", run, "--out", "a.onnx/"), "a.onnx is a file", "--out a.onnx")
    assert "model.onnx" not in line and Path("a.onnx").read_bytes() == b"kept"


def test_force_replaces_only_run_directories(run):
    """`transform --out d --force` deleted a folder of the user's files (no recipe.json in it);
    `--out .` / `""` / `..` with --force crashed (ValueError, OSError) after the work."""
    Path("d").mkdir()
    Path("d", "important.txt").write_text("keep me")
    for cmd in (["transform", "zoo:lenet5", "-m", "none", "--out", "d", "--force"],
                ["run", "zoo:lenet5", "--epochs", "1", "--out", "d", "--force"]):
        assert_one_error_line(invoke(*cmd), "d holds files but no recipe.json", "not a run directory")
        assert Path("d", "important.txt").read_text() == "keep me"
    for out in (".", "", ".."):
        assert_one_error_line(invoke("transform", "zoo:lenet5", "-m", "none", "--out", out, "--force"),
                              "is the current directory or one above it")
    assert Path("d", "important.txt").is_file()
    # a run directory is still replaced
    assert_ok(invoke("transform", "zoo:lenet5", "-m", "none", "--out", "r"))
    assert_ok(invoke("transform", "zoo:lenet5", "--density", "0.3", "--out", "r", "--force"))
    assert json.loads(Path("r", "recipe.json").read_text())["method"] == "sparse-random"


def test_export_options_that_would_be_ignored_are_refused(run, sparse_onnx):
    """Converting an .onnx file took --no-fold-bn and --channel-align and ignored them (while
    --dense and --compact were refused); --dense --autotune ignored --autotune."""
    for flags, words in ((["--no-fold-bn"], "--no-fold-bn applies"), (["--channel-align", "4"], "--channel-align"),
                         (["--dense", "--fold-bn"], "--dense, --fold-bn apply")):
        assert_one_error_line(invoke("export", sparse_onnx, "--out", "c.onnx", *flags), words, "only converted",
                              nothing_at=(Path("c.onnx"),))
    assert_one_error_line(invoke("export", run, "--out", "d.onnx", "--dense", "--autotune"), "--autotune",
                          "give one of them", nothing_at=(Path("d.onnx"),))
    assert_ok(invoke("export", run, "--out", "e.onnx", "--no-fold-bn", "--channel-align", "1"))


def test_inspect_options_that_would_be_ignored_are_refused(run, sparse_onnx):
    """inspect x.onnx --model-args '{...}' and inspect RUN --model-args were taken and ignored."""
    assert_one_error_line(invoke("inspect", sparse_onnx, "--model-args", '{"a": 1}'), "--model-args applies",
                          "inspected as it is")
    assert_one_error_line(invoke("inspect", sparse_onnx, "--input-shape", "1,1,8,8", "--leaf", "Conv2d"),
                          "--input-shape, --leaf apply")
    assert_one_error_line(invoke("inspect", run, "--model-args", '{"num_classes": 3}'), "--model-args",
                          "its recipe's")


def test_export_to_an_unwritable_place(run):
    assert_one_error_line(invoke("export", run, "--out", "/proc/sparsify-test.onnx"), "--out", "/proc")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_one_error_line(invoke("transform", "zoo:mlp", "--density", "0.1", "--out", ro / "run"), "--out",
                              nothing_at=(ro / "run",))
    finally:
        ro.chmod(0o755)


def test_export_out_existing_directory_does_not_advise_force(run, tmp_path):
    (tmp_path / "d").mkdir()
    for extra in ([], ["--force"]):
        line = assert_one_error_line(invoke("export", run, "--out", tmp_path / "d", *extra), "is a directory")
        assert "--force" not in line


# ---------------------------------------------------------------- values that cannot work


def test_negative_seed(run):
    assert_one_error_line(invoke("transform", "zoo:mlp", "--density", "0.1", "--seed", "-1", "--out", "S"),
                          "--seed", nothing_at=(Path("S"),))
    assert_one_error_line(invoke("train", run, "--seed", "-1", "--epochs", "1", "-q"), "--seed")
    # --lr inf trained, diverged, and then advised "retry with a lower learning rate: --lr inf"
    for lr in ("inf", "nan"):
        assert_one_error_line(invoke("train", run, "--lr", lr, "--epochs", "1", "-q"), "--lr", "finite")
    # past float32: torch's optimisers ended in "cannot be converted to type float without overflow"
    for flag, optimizer in (("--lr", "sgd"), ("--lr", "adam"), ("--weight-decay", "sgd")):
        assert_one_error_line(invoke("train", run, flag, "1e308", "--optimizer", optimizer, "--epochs", "1", "-q"),
                              f"{flag} must be at most 3.4e+38")
    assert not (run / "checkpoints").exists()
    assert_one_error_line(invoke("run", "--seed", "-1", "--out", "R", "-q"), "--seed", nothing_at=(Path("R"),))


def test_model_args_that_empty_a_layer():
    for command in (["transform", "zoo:lenet5", "--density", "0.1", "--out", "Z"], ["inspect", "zoo:lenet5"]):
        assert_one_error_line(invoke(*command, "--model-args", '{"num_classes": 0}'), "empty layer", "classifier",
                              nothing_at=(Path("Z"),))


def test_leaf_that_names_no_module():
    assert_one_error_line(invoke("transform", "zoo:lenet5", "--density", "0.1", "--leaf", "NoSuchModule",
                                 "--out", "L"), "--leaf NoSuchModule", "Conv2d", nothing_at=(Path("L"),))


def test_negative_sigma_for_psn():
    assert_one_error_line(invoke("transform", "zoo:mlp", "--method", "psn", "--density", "0.1",
                                 "--profile-param", "sigma=-1", "--out", "P"), "sigma", ">= 0",
                          nothing_at=(Path("P"),))


def test_density_far_below_what_keeps_channels_connected_gets_a_note():
    r = invoke("transform", "zoo:lenet5", "--density", "1e-9", "--out", "T")
    assert_ok(r)
    note = next(line for line in r.output.splitlines() if "--density 1e-09" in line)
    reached = float(note.split("reach ")[1].split()[0])
    summary = json.loads(Path("T/summary.json").read_text())
    live = sum(layer["live"] for layer in summary["pass_layers"].values())
    entries = sum(layer["entries"] for layer in summary["pass_layers"].values())
    assert reached == pytest.approx(live / entries, rel=1e-2) and reached > 0.01


@pytest.mark.parametrize("args, flag", [
    (["transform", "zoo:lenet5", "--density", "abc"], "--density"),
    (["train", "somewhere", "--epochs", "abc"], "--epochs"),
    (["export", "somewhere", "--out", "x.onnx", "--dense-threshold", "2"], "--dense-threshold"),
    (["export", "somewhere", "--out", "x.onnx", "--channel-align", "0"], "--channel-align"),
    (["data", "fetch"], "Missing argument"),
    (["runtime", "nosuch"], "nosuch"),
    (["transform", "zoo:lenet5", "--no-such-flag"], "--no-such-flag"),
])
def test_values_the_parser_rejects_are_one_line(args, flag):
    line = assert_one_error_line(invoke(*args), flag)
    assert "--help" in line  # says where the usage is, instead of printing it


# ---------------------------------------------------------------- files that are damaged


@pytest.mark.parametrize("recipe", [
    {"input_shape": "abc"}, {"seed": "zero"}, {"model": 5}, {"params": [1, 2]}, {"num_classes": -3},
    {"params": {"density": "abc", "allocation": "uniform"}}, [1, 2, 3],
])
def test_recipe_with_valid_json_of_the_wrong_types(run, recipe):
    data = json.loads((run / "recipe.json").read_text())
    data = recipe if isinstance(recipe, list) else {**data, **recipe}
    (run / "recipe.json").write_text(json.dumps(data))
    before = (run / "weights.safetensors").read_bytes()
    assert_one_error_line(invoke("inspect", run), "recipe.json")
    assert_one_error_line(invoke("train", run, "--epochs", "1", "-q"), "recipe.json")
    assert_one_error_line(invoke("export", run, "--out", "x.onnx"), "recipe.json", nothing_at=(Path("x.onnx"),))
    assert (run / "weights.safetensors").read_bytes() == before and not (run / "checkpoints").exists()


@pytest.mark.parametrize("summary", ["[1, 2]", '{"original_totals": "x", "train": 5}', "{}"])
def test_damaged_summaries_read_as_what_they_still_hold_and_are_noted(run, summary):
    from sparsify.rundir import read_summary, summary_note

    (run / "summary.json").write_text(summary)
    assert "original_totals" not in read_summary(run) and "train" not in read_summary(run)
    assert "summary.json is damaged" in summary_note(run)


@pytest.mark.parametrize("summary", ["{not json"])
def test_damaged_summary_does_not_stop_any_command(run, summary):
    (run / "summary.json").write_text(summary)
    assert_ok(invoke("inspect", run))
    exported = invoke("export", run, "--out", "x.onnx", "--no-verify")
    assert_ok(exported)
    # it was ignored silently, the note on how the inputs were normalised with it
    assert "summary.json is damaged" in exported.output
    assert_ok(invoke("bench", run, "--variants", "sparse", *FAST_BENCH))
    assert_ok(invoke("train", run, "--epochs", "1", "--train-limit", "100", "--schedule", "rigl", "-q"))
    assert json.loads((run / "summary.json").read_text())["train"]["epochs"] == 1  # rewritten whole
    assert_ok(invoke("fit-profile", run))


def test_model_file_calling_sys_exit_at_import():
    Path("exits.py").write_text("import sys\nimport torch.nn as nn\nsys.exit(3)\n")
    assert_one_error_line(invoke("transform", "exits.py", "--density", "0.1", "--out", "E"), "sys.exit(3)",
                          "exits.py:3", nothing_at=(Path("E"),))
    assert_one_error_line(invoke("inspect", "exits.py"), "sys.exit(3)")


def test_empty_onnx_file():
    Path("empty.onnx").write_bytes(b"")
    for args in (["inspect", "empty.onnx"], ["bench", "empty.onnx", *FAST_BENCH],
                 ["export", "empty.onnx", "--out", "y.onnx"]):
        assert_one_error_line(invoke(*args), "empty.onnx", nothing_at=(Path("y.onnx"),))


def _damaged(src: Path, dst: Path, how: str) -> Path:
    model = onnx.load(str(src))
    node = next(n for n in model.graph.node if n.domain == "ai.sparsify")
    inits = {t.name: t for t in model.graph.initializer}
    name = node.input[3] if how == "column" else node.input[2]
    a = numpy_helper.to_array(inits[name]).copy()
    if how == "column":
        a[len(a) // 2] = 10_000                 # an input channel that does not exist
    else:
        a[2], a[3] = a[3] + 1, a[2]             # row pointers that go down
    inits[name].CopyFrom(numpy_helper.from_array(a, name))
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("how, needle", [("column", "col_idx"), ("row", "row_ptr decreases")])
def test_malformed_sparse_conv_index_arrays(sparse_onnx, how, needle):
    bad = _damaged(sparse_onnx, Path("bad.onnx"), how)
    for args in (["inspect", bad], ["bench", bad, *FAST_BENCH], ["export", bad, "--out", "y.onnx"]):
        assert_one_error_line(invoke(*args), needle, "bad.onnx", nothing_at=(Path("y.onnx"),))
    assert_ok(invoke("inspect", sparse_onnx))  # the undamaged file passes the same checks


def test_every_file_export_writes_passes_the_validator(made_run, tmp_path):
    from sparsify.runtime.export import export_run
    from sparsify.runtime.onnx_inspect import validate_model

    for options in ({"dense_threshold": 1.0}, {"dense": True}, {"compact": False}):
        out = tmp_path / f"v{len(options)}-{next(iter(options))}.onnx"
        export_run(made_run, out, verify=False, **options)
        validate_model(onnx.load(str(out)), out)


# ---------------------------------------------------------------- options checked only after long work


def test_run_min_time_is_checked_before_transforming():
    assert_one_error_line(invoke("run", "--min-time", "-1", "--out", "R"), "--min-time", nothing_at=(Path("R"),))


@pytest.mark.parametrize("flag, value", [("--warmup", "-1"), ("--repeats", "0"), ("--min-time", "nan")])
def test_bench_timing_options_name_their_flag_before_exporting(run, flag, value):
    keep = Path("variants")
    assert_one_error_line(invoke("bench", run, flag, value, "--keep", keep, "--no-memory", "-q"), flag,
                          nothing_at=(keep,))


def test_bench_of_two_run_directories_says_one_run(run):
    other = Path("other-run")
    shutil.copytree(run, other)
    line = assert_one_error_line(invoke("bench", run, other, *FAST_BENCH), "give one run directory, not 2",
                                 "bench the .onnx files")
    assert "not both" not in line


@pytest.mark.heavy  # 12 s: kept out of CI's 15 minutes
def test_bench_of_a_run_does_not_compare_the_depth_models_outputs(run):
    """The depth variant is another model: no output difference is shown for it (it read 1e+00, like
    a wrong export); the compacted and sparse exports are still compared with the dense one."""
    r = invoke("bench", run, "--variants", "dense,sparse,depth", *FAST_BENCH, "--json")
    assert_ok(r)
    rows = {row["label"]: row for row in json.loads(r.stdout)["rows"]}
    assert rows["depth"]["max_rel_diff"] is None and rows["sparse"]["max_rel_diff"] < 1e-4
    table = invoke("bench", run, "--variants", "dense,depth", *FAST_BENCH)
    assert_ok(table)
    assert "outputs are not compared" in table.output
    depth_row = next(line for line in table.output.splitlines() if line.strip().startswith("depth "))
    assert depth_row.rstrip().endswith("-")


def test_resume_message_names_the_flag_and_the_default(run):
    assert_ok(invoke("train", run, "--epochs", "1", "--train-limit", "100", "-q"))
    line = assert_one_error_line(invoke("train", run, "--resume", "--lr", "0.05", "-q"), "--lr 0.05",
                                 "its default")
    assert "None" not in line


def test_resume_and_force_together_are_refused(run):
    # the resume silently won over --force
    assert_ok(invoke("train", run, "--epochs", "1", "--train-limit", "100", "-q"))
    before = (Path(run) / "weights.safetensors").read_bytes()
    assert_one_error_line(invoke("train", run, "--resume", "--force", "-q"), "--resume", "--force")
    assert (Path(run) / "weights.safetensors").read_bytes() == before


def test_native_library_error_names_the_cli_flag(tmp_path):
    import onnxruntime as ort

    from sparsify.errors import RuntimeBackendError
    from sparsify.runtime import native

    lib = tmp_path / "libbroken.so"
    lib.write_bytes(b"not a library")
    with pytest.raises(RuntimeBackendError, match="--no-native") as e:
        native._register(ort.SessionOptions(), lib)
    assert "native=False in the API" in str(e.value)


def test_a_training_data_folder_that_is_not_one(run):
    Path("empty-folder").mkdir()
    assert_one_error_line(invoke("train", run, "--data", "empty-folder", "-q"), "no images")
    assert_one_error_line(invoke("train", run, "--data", "nothing.npz", "-q"), "nothing.npz")
    assert not (run / "checkpoints").exists()


def test_weights_that_do_not_fit(tmp_path):
    import torch

    from sparsify import zoo

    torch.save(zoo.get("lenet5").build(num_classes=5).state_dict(), "five.pt")
    line = assert_one_error_line(invoke("transform", "zoo:lenet5", "--density", "0.1", "--weights", "five.pt",
                                        "--out", "W"), "five.pt", "classifier.weight", nothing_at=(Path("W"),))
    assert "[5, 256]" in line and "[10, 256]" in line
    torch.save(zoo.get("lenet5").build(), "pickled.pt")  # a whole module: pickled code, refused
    assert_one_error_line(invoke("transform", "zoo:lenet5", "--density", "0.1", "--weights", "pickled.pt",
                                 "--out", "W"), "pickled", nothing_at=(Path("W"),))
    Path("notes.pt").write_text("hello, these are not weights\n")  # was called "pickled objects"
    line = assert_one_error_line(invoke("transform", "zoo:lenet5", "--density", "0.1", "--weights", "notes.pt",
                                        "--out", "W"), "is not a file torch.save wrote", nothing_at=(Path("W"),))
    assert "pickled" not in line
    torch.save({"epoch": 3, "optimizer": {}}, "no-weights.pt")
    assert_one_error_line(invoke("transform", "zoo:lenet5", "--density", "0.1", "--weights", "no-weights.pt",
                                 "--out", "W"), "not a state dict", nothing_at=(Path("W"),))
    assert_one_error_line(invoke("transform", "zoo:lenet5", "--method", "depth-multiplier", "--alpha", "0.5",
                                 "--weights", "five.pt", "--out", "W"), "depth-multiplier", nothing_at=(Path("W"),))


def test_weights_with_nan_or_inf_are_refused(tmp_path):
    import torch

    from sparsify import zoo

    state = zoo.get("lenet5").build().state_dict()
    names = [k for k, v in state.items() if v.is_floating_point()]
    state[names[1]].view(-1)[:3] = float("nan")
    state[names[2]].view(-1)[0] = float("inf")
    torch.save(state, "nan.pt")
    line = assert_one_error_line(invoke("transform", "zoo:lenet5", "--density", "0.1", "--weights", "nan.pt",
                                        "--out", "W"), "nan.pt", names[1], "3 ", nothing_at=(Path("W"),))
    assert names[2] not in line


def test_npz_given_as_data_with_pickled_objects(run):
    np.savez("objects.npz", x=np.array([{"a": 1}] * 4, dtype=object), y=np.zeros(4, dtype=int))
    assert_one_error_line(invoke("train", run, "--data", "objects.npz", "-q"), "objects.npz")


def test_npz_given_as_data_that_is_no_npz_or_has_labels_beyond_int64(run):
    """A text file read as a pickle ("... using the `", cut), and labels * 1e20 cast to -2**63 and
    blamed on the model ("the model fails in training ... Target -9223372036854775808")."""
    Path("g.npz").write_bytes(b"garbage")
    line = assert_one_error_line(invoke("train", run, "--data", "g.npz", "-q"), "g.npz", "not a NumPy .npz archive")
    assert "pickled" not in line
    np.savez("big.npz", x=np.zeros((20, 28, 28), dtype=np.float32), y=(np.arange(20) % 10) * 1e20)
    line = assert_one_error_line(invoke("train", run, "--data", "big.npz", "-q"), "big.npz: y", "beyond")
    assert "model" not in line
    assert not (run / "checkpoints").exists()


def test_bench_notes_files_that_compute_different_models(sparse_onnx, tmp_path):
    """Two files of one input shape but different models: the speed-up is noted as comparing different work."""
    from sparsify.api import transform_to_dir
    from sparsify.runtime.export import export_run

    other = tmp_path / "other"
    transform_to_dir("zoo:lenet5", "sparse-random", density=0.5, out=other, seed=3)
    export_run(other, tmp_path / "other.onnx", verify=False)
    r = invoke("bench", sparse_onnx, tmp_path / "other.onnx", *FAST_BENCH)
    assert_ok(r)
    assert "do not compute the same model" in r.output and "other" in r.output, r.output
    shutil.copy(sparse_onnx, tmp_path / "copy.onnx")
    same = invoke("bench", sparse_onnx, tmp_path / "copy.onnx", *FAST_BENCH)
    assert_ok(same)
    assert "same model" not in same.output, same.output


def test_a_misspelt_zoo_model_is_named_before_the_methods_options():
    # `transform zoo:nope` said "--density is required" first
    assert_one_error_line(invoke("transform", "zoo:lenet", "--out", "R"), "unknown zoo model 'lenet'",
                          "did you mean 'lenet5'", nothing_at=(Path("R"),))
