"""Run directories through the API and the CLI: train, resume after Ctrl-C, bad input, fit-profile."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sparsify.api import transform_to_dir
from sparsify.cli import app
from sparsify.train import train_run

runner = CliRunner()
QUICK = ["--data", "digits", "--epochs", "1", "--train-limit", "200", "--batch-size", "50", "--quiet"]


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "mlp"
    path, _ = transform_to_dir("zoo:lenet300-100", method="sparse-random", density=0.1, include_linear=True, out=out)
    return path


@pytest.fixture
def run(mlp_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(mlp_run, dst)
    return dst


def _weights(path):
    return load_file(str(path / "weights.safetensors"))


def test_cli_train_writes_weights_metrics_summary(run):
    before = _weights(run)
    res = runner.invoke(app, ["train", str(run), *QUICK, "--schedule", "set", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["schedule"] == "set" and 0 <= result["test_acc"] <= 1
    after = _weights(run)
    assert any(not (before[k] == after[k]).all() for k in before if k.endswith("weight"))
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [lines[0]["event"], lines[1]["event"], lines[-1]["event"]] == ["start", "epoch", "test"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train"]["config"]["schedule"] == "set"
    assert (run / "checkpoints" / "last.pt").is_file()
    # A second plain `train` must not silently discard the checkpoint; a finished training is not
    # offered --resume (it told the user to "continue" a run with nothing left to run).
    again = runner.invoke(app, ["train", str(run), *QUICK])
    assert again.exit_code == 2 and "is already trained (1 of 1 epochs" in again.output
    assert "--force" in again.output and "--resume" not in again.output


def test_a_training_stopped_before_its_results_were_saved_is_offered_resume(run, monkeypatch):
    """The last epoch ended but the process stopped before the weights and summary were written
    (a closed pipe, Ctrl-C): train said "already trained; pass --force", which would throw the
    finished training away. It now says the results were not saved and --resume saves them."""
    import sparsify.train.run as train_run_mod

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_run_mod, "_write_back", stopped)
    runner.invoke(app, ["train", str(run), *QUICK])
    monkeypatch.undo()
    assert "train" not in json.loads((run / "summary.json").read_text())
    again = runner.invoke(app, ["train", str(run), *QUICK])
    said = " ".join(again.output.split())
    assert again.exit_code == 2 and "its results were not saved" in said and "--resume to save them" in said
    saved = runner.invoke(app, ["train", str(run), "--resume"])
    assert saved.exit_code == 0, saved.output
    assert "train" in json.loads((run / "summary.json").read_text())
    assert "is already trained" in runner.invoke(app, ["train", str(run), *QUICK]).output


def test_input_normalisation_is_told_recorded_and_noted_at_export(run, tmp_path):
    """The deployed model needs the inputs normalised as in training: train says how, summary.json
    records it, export notes it; --no-normalize trains on the data as stored and records None.
    Before training, export says the weights are random initial ones (it said nothing)."""
    before = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "untrained.onnx")])
    assert before.exit_code == 0 and "was never trained" in " ".join(before.output.split()), before.output
    res = runner.invoke(app, ["train", str(run), *QUICK[:-1]])
    assert res.exit_code == 0, res.output
    norm = json.loads((run / "summary.json").read_text())["train"]["input_normalization"]
    assert norm["units"] == "as stored" and len(norm["mean"]) == 1 and norm["std"][0] > 0
    assert f"inputs normalised: {norm['text']}" in " ".join(res.output.split())
    exp = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "m.onnx")])
    assert exp.exit_code == 0 and "trained on inputs normalised as" in " ".join(exp.output.split()), exp.output
    assert "never trained" not in " ".join(exp.output.split())
    res = runner.invoke(app, ["train", str(run), *QUICK, "--no-normalize", "--force"])
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "summary.json").read_text())["train"]
    assert summary["input_normalization"] is None and summary["config"]["normalize"] is False


def test_ctrl_c_keeps_checkpoint_and_resume_matches_uninterrupted(mlp_run, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(mlp_run, a)
    shutil.copytree(mlp_run, b)
    cfg = dict(data="digits", epochs=2, train_limit=200, batch_size=50, schedule="rigl", update_every=2)
    train_run(a, **cfg)

    def interrupt(event):
        if event["kind"] == "step" and event["step"] == 6:  # in the middle of epoch 2
            raise KeyboardInterrupt

    initial = _weights(b)
    with pytest.raises(KeyboardInterrupt):
        train_run(b, progress=interrupt, **cfg)
    assert all((initial[k] == v).all() for k, v in _weights(b).items())  # weights untouched by the failed run
    plain = runner.invoke(app, ["train", str(b), "--quiet"])  # an unfinished training is offered --resume
    assert plain.exit_code == 2 and "has an unfinished training (1 of 2 epochs" in plain.output
    assert "--resume" in plain.output
    res = runner.invoke(app, ["train", str(b), "--resume", "--quiet"])
    assert res.exit_code == 0, res.output
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] == wb[k]).all(), k
    ma = [json.loads(s) for s in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(s) for s in (b / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]  # noqa: E731
    assert strip(ma) == strip(mb)


def _files(run):
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _stop_at_step(n):
    def progress(event):
        if event["kind"] == "step" and event["step"] == n:
            raise KeyboardInterrupt
    return progress


def test_forced_retrain_stopped_after_an_epoch_leaves_the_earlier_training_whole(run):
    """--force over a trained run, stopped in its second epoch: weights, summary.json and metrics.jsonl
    are still the earlier training's (what export / bench / sparsify.load read); the new training's
    epoch is in checkpoints/ (last.pt and its metrics.jsonl), and --resume completes it."""
    import sparsify

    cfg = dict(data="digits", epochs=2, train_limit=200, batch_size=50)  # 4 steps per epoch
    train_run(run, **cfg)
    earlier = _files(run)
    notes = []
    with pytest.raises(KeyboardInterrupt):
        train_run(run, force=True, lr=0.05, progress=_stop_at_step(6), log=notes.append, **cfg)
    now = _files(run)
    for name in ("weights.safetensors", "summary.json", "metrics.jsonl"):
        assert now[name] == earlier[name], name
    loaded = sparsify.load(run)
    assert loaded.summary["train"]["config"]["lr"] is None  # the earlier training's default, not 0.05
    staged = [json.loads(s) for s in (run / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in staged] == ["start", "epoch"] and staged[0]["schedule"] == "static"
    assert now["checkpoints/last.pt"] != earlier["checkpoints/last.pt"]
    assert any("stopped after epoch 1 of 2" in n and "--resume" in n for n in notes), notes

    res = runner.invoke(app, ["train", str(run), "--resume", "--quiet"])
    assert res.exit_code == 0, res.output
    assert not (run / "checkpoints" / "metrics.jsonl").exists()
    assert json.loads((run / "summary.json").read_text())["train"]["config"]["lr"] == 0.05
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in lines] == ["start", "epoch", "epoch", "test"]
    assert (run / "weights.safetensors").read_bytes() != earlier["weights.safetensors"]


def test_forced_retrain_that_diverges_before_an_epoch_leaves_the_earlier_training_whole(run):
    """--force over a trained run whose new training diverges in its first epoch: nothing of it is a
    result, so weights, summary.json, metrics.jsonl and the checkpoint stay the earlier training's
    (the divergence record used to replace metrics.jsonl beside the earlier weights)."""
    from sparsify.errors import DivergenceError

    cfg = dict(data="digits", epochs=1, train_limit=200, batch_size=50)
    train_run(run, **cfg)
    earlier = _files(run)
    with pytest.raises(DivergenceError, match="earlier training's, unchanged") as e:
        train_run(run, force=True, lr=1e6, momentum=0.0, clip_grad_norm=0, **{**cfg, "epochs": 2})
    assert "\n" not in str(e.value)
    assert _files(run) == earlier
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert "diverged" not in [r["event"] for r in lines]


def test_a_training_stopped_while_saving_its_result_changes_none_of_weights_summary_metrics(run, monkeypatch):
    """The trained weights, summary.json and metrics.jsonl replace the run's together: a stop while the
    result is being written (here: while its report is computed) leaves all three as they were, and
    --resume writes them from the last checkpoint."""
    import sparsify.train.run as run_module

    before = _files(run)
    real = run_module._refreshed_report

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "_refreshed_report", stop)
    notes = []
    with pytest.raises(KeyboardInterrupt):
        train_run(run, data="digits", epochs=1, train_limit=200, batch_size=50, log=notes.append)
    now = _files(run)
    for name in ("weights.safetensors", "summary.json"):
        assert now[name] == before[name], name
    assert "metrics.jsonl" not in now and "checkpoints/metrics.jsonl" in now
    assert any("stopped after epoch 1 of 1" in n for n in notes), notes
    monkeypatch.setattr(run_module, "_refreshed_report", real)
    assert runner.invoke(app, ["train", str(run), "--resume", "--quiet"]).exit_code == 0
    assert json.loads((run / "summary.json").read_text())["train"]["epochs"] == 1
    assert [json.loads(s)["event"] for s in (run / "metrics.jsonl").read_text().splitlines()][-1] == "test"


def test_a_schedule_that_moves_weights_between_layers_says_how_the_macs_changed(mlp_run, tmp_path):
    """Sparse momentum and rigl --init erk change per-layer densities, so the MACs (and the speed-up) are
    no longer what transform reported: train says so and summary.json keeps both (train.layer_change).
    A schedule that keeps each layer's count (set) says nothing; between linear layers (one MAC per
    weight) the MACs stay, and the note says that."""
    conv_run, _ = transform_to_dir("zoo:lenet5", method="sparse-random", density=0.1, out=tmp_path / "lenet5")
    quick = ["--epochs", "2", *[a for a in QUICK if a not in ("--epochs", "1", "--quiet")]]
    reports = {}
    for model, schedule in ((conv_run, ["set"]), (conv_run, ["sparse-momentum"]), (conv_run, ["rigl", "--init", "erk"]),
                            (mlp_run, ["sparse-momentum"])):
        run = tmp_path / "-".join([model.name, *schedule])
        shutil.copytree(model, run)
        transformed = json.loads((run / "summary.json").read_text())
        res = runner.invoke(app, ["train", str(run), *quick, "--schedule", *schedule])
        assert res.exit_code == 0, res.output
        reports[run.name] = (transformed, json.loads((run / "summary.json").read_text()), " ".join(res.output.split()))
    transformed, trained, output = reports["lenet5-set"]
    assert "layer_change" not in trained["train"] and "moved weights between" not in output
    assert trained["totals"]["macs"] == transformed["totals"]["macs"]
    for name, who in (("lenet5-sparse-momentum", "sparse-momentum"), ("lenet5-rigl---init-erk", "rigl --init erk")):
        transformed, trained, output = reports[name]
        change = trained["train"]["layer_change"]
        assert change["macs"] == {"before": transformed["totals"]["macs"], "after": trained["totals"]["macs"]}
        assert change["macs"]["before"] != change["macs"]["after"]
        ratio = change["macs_of_dense"]
        assert ratio == {"before": transformed["ratios"]["macs"], "after": trained["ratios"]["macs"]}
        assert (f"note: {who} moved weights between {len(change['layers'])} layers: MACs now {ratio['after']:.3f}x "
                f"of dense, not transform's {ratio['before']:.3f}x") in output, output
        was = {l["name"]: l["density"] for l in transformed["layers"]}
        now = {l["name"]: l["density"] for l in trained["layers"]}
        assert {n: c["density"] for n, c in change["layers"].items()} == {
            n: {"before": was[n], "after": now[n]} for n in now if was[n] != now[n]} != {}
    transformed, trained, output = reports["mlp-sparse-momentum"]
    change = trained["train"]["layer_change"]
    assert change["layers"] and change["macs"]["before"] == change["macs"]["after"]
    assert f"MACs unchanged at {trained['ratios']['macs']:.3f}x of dense" in output, output


@pytest.mark.parametrize("args,match", [
    (["--schedule", "nope"], "unknown schedule"),
    (["--data", "nope"], "unknown data set"),
    (["--schedule", "incremental", "--start-density", "0.5"], "start density"),
    (["--lr", "1e30", "--momentum", "0"], "loss became"),
    (["--data", "mnist", "--data-dir", "/nonexistent-dir"], "sparsify data fetch mnist --data-dir /nonexistent-dir"),
    (["--init-profile-param", "sigma"], "NAME=NUMBER"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_lost(run, args, match):
    before = (run / "weights.safetensors").read_bytes()
    quick = [a for a in QUICK if a not in ("--data", "digits")] if "--data" in args else QUICK
    res = runner.invoke(app, ["train", str(run), *quick, *args])
    assert res.exit_code == 2, res.output
    assert match in res.output
    assert res.output.strip().count("\n") == 0, res.output
    assert (run / "weights.safetensors").read_bytes() == before


def test_not_a_run_dir(tmp_path):
    res = runner.invoke(app, ["train", str(tmp_path), "--quiet"])
    assert res.exit_code == 2 and "not a run directory" in res.output


def test_resume_without_checkpoint(run):
    res = runner.invoke(app, ["train", str(run), "--resume", "--quiet"])
    assert res.exit_code == 2 and "no checkpoint" in res.output


def test_fit_profile_prints_psn_command(run):
    assert runner.invoke(app, ["train", str(run), *QUICK, "--schedule", "rigl", "--update-every", "1"]).exit_code == 0
    res = runner.invoke(app, ["fit-profile", str(run)])
    assert res.exit_code == 0, res.output
    assert "sparsify transform zoo:lenet300-100 --method sparse-random" in res.stdout
    assert "--include-linear" in res.stdout and "--schedule rigl --init erk --init-profile lognormal" in res.stdout
    data = json.loads(runner.invoke(app, ["fit-profile", str(run), "--json"]).stdout)
    assert data["lognormal"]["sigma"] > 0 and data["trained_with"] == "rigl"
    for name, sigma in data["sigma_per_layer"].items():  # one sigma per layer, each in the command
        assert sigma == data["layers"][name]["sigma"] and f"sigma@{name}={sigma:.3g}" in data["command"]


def test_the_psn_command_keeps_only_settings_rigl_reads(run):
    """An incremental pilot's --double-every went into the RigL command, which train then refused."""
    import shlex

    trained = runner.invoke(app, ["train", str(run), *QUICK, "--schedule", "set", "--update-every", "2"])
    assert trained.exit_code == 0, trained.output
    command = json.loads(runner.invoke(app, ["fit-profile", str(run), "--json"]).stdout)["command"]
    train = shlex.split(command.split(" && ")[1])
    assert "--update-every" not in train and train[train.index("--schedule") + 1] == "rigl"


def test_the_psn_command_fit_profile_prints_runs(tmp_path, monkeypatch):
    """Pasted, it failed: every command held `--model-output logits` (no such option), a run trained
    with --no-normalize gave `--normalize False`, and the transform lost the run's --input-shape,
    --block and --allocation (a model file without INPUT_SHAPE failed there)."""
    import shlex

    model = tmp_path / "tiny.py"
    model.write_text("import torch.nn as nn\n"
                     "def build_model():\n"
                     "    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),\n"
                     "                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10))\n")
    monkeypatch.chdir(tmp_path)
    made = runner.invoke(app, ["transform", str(model), "--density", "0.3", "--input-shape", "1,1,8,8", "--block", "2",
                               "--allocation", "erk", "--out", "runs/src"])
    assert made.exit_code == 0, made.output
    (tmp_path / "cache").mkdir()
    trained = runner.invoke(app, ["train", "runs/src", *QUICK, "--no-normalize", "--lr", "0.03", "--data-dir", "cache"])
    assert trained.exit_code == 0, trained.output
    data = json.loads(runner.invoke(app, ["fit-profile", "runs/src", "--json"]).stdout)
    transform, train = (shlex.split(part) for part in data["command"].split(" && "))
    assert "--model-output" not in train and "--no-normalize" in train and train[train.index("--lr") + 1] == "0.03"
    # beside the run (it was `--out src-psn` in the current directory), with the run's data folder
    assert transform[transform.index("--out") + 1] == "runs/src-psn" and train[2] == "runs/src-psn"
    assert train[train.index("--data-dir") + 1] == str(tmp_path / "cache")
    assert all(flag in transform for flag in ("--input-shape", "--block", "--allocation"))
    for part in (transform, train):
        assert part[0] == "sparsify"
        res = runner.invoke(app, part[1:])
        assert res.exit_code == 0, (part, res.output)
    recipe = json.loads((tmp_path / "runs" / "src-psn" / "recipe.json").read_text())
    assert recipe["params"]["block"] == 2 and recipe["params"]["allocation"] == "erk"
    assert json.loads((tmp_path / "runs" / "src-psn" / "summary.json").read_text())["train"]["config"]["normalize"] is False


def test_fit_profile_of_fan_ins_without_spread_says_so(tmp_path):
    # a density-1 (or untrained sparse-random) run printed exponent=inf and a command with sigma=6.66e-16
    path, _ = transform_to_dir("zoo:mlp", method="sparse-random", density=1.0, out=tmp_path / "r")
    res = runner.invoke(app, ["fit-profile", str(path)])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert "same fan-in" in res.output and "inf" not in res.output


def test_data_fetch_refuses_unknown():
    res = runner.invoke(app, ["data", "fetch", "cifar10"])
    assert res.exit_code == 2 and "only mnist, fashion-mnist" in res.output


@pytest.mark.slow
@pytest.mark.heavy  # 14 s in CI's slow lane: sparse momentum's learning runs by hand (-m heavy)
def test_lenet5_on_digits_learns_well_above_chance(tmp_path):
    path, _ = transform_to_dir("zoo:lenet5", method="sparse-random", density=0.2, out=tmp_path / "lenet5")
    result = train_run(path, data="digits", schedule="sparse-momentum", epochs=4, batch_size=32)
    assert result["test_acc"] > 0.8  # chance is 0.1


@pytest.mark.slow
@pytest.mark.heavy  # 14-25 s; the ranks' shared masks are checked in the default run (test_ddp_masks)
def test_torchrun_two_processes_cli(run):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "sparsify", "train", str(run), *QUICK, "--schedule", "rigl", "--update-every", "1", "--json"]
    # Own session: on a timeout the whole group (torchrun and its workers) is killed, no orphans.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-2000:]
    result = json.loads(stdout[stdout.index("{"):])
    assert result["schedule"] == "rigl" and (run / "metrics.jsonl").is_file()


def test_a_model_that_fails_in_a_training_step_is_one_error_line(tmp_path):
    """A forward that writes in place into a tensor autograd saved cannot be trained (PyTorch refuses
    its backward): one line naming the step and the fix, exit 2, the run as it was."""
    src = tmp_path / "net.py"
    src.write_text(
        "import torch, torch.nn as nn\n"
        "INPUT_SHAPE = (1, 1, 28, 28)\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.c0 = nn.Conv2d(1, 8, 3, padding=1)\n"
        "        self.fc = nn.Linear(8, 10)\n"
        "    def forward(self, x):\n"
        "        y = torch.relu(self.c0(x))\n"
        "        y.add_(1.0)\n"
        "        return self.fc(y.mean((2, 3)))\n"
        "def build_model():\n"
        "    return Net()\n")
    out = tmp_path / "run"
    transform_to_dir(str(src), method="sparse-random", density=0.5, out=out)
    before = _weights(out)
    res = runner.invoke(app, ["train", str(out), *QUICK])
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert len(lines) == 1 and "fails in training at epoch 1 step 1" in lines[0] and "out of place" in lines[0]
    assert all(torch.equal(v, _weights(out)[k]) for k, v in before.items())


def test_resume_on_data_rewritten_under_the_same_name_is_refused(run, tmp_path):
    # --resume checked --data by name only: the resumed epochs trained on the new contents
    import numpy as np

    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 200)
    x = (rng.integers(0, 100, (200, 1, 28, 28)) + 10 * y[:, None, None, None]).astype(np.uint8)
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=y)
    cfg = dict(data=str(data), epochs=2, batch_size=50)
    with pytest.raises(KeyboardInterrupt):
        train_run(run, progress=_stop_at_step(6), **cfg)
    np.savez(data, x=x // 2, y=y)  # the same name, other contents
    res = runner.invoke(app, ["train", str(run), "--data", str(data), "--epochs", "2", "--batch-size", "50",
                              "--resume", "--quiet"])
    assert res.exit_code == 2 and "is not the data the checkpoint trained on (input normalisation" in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    np.savez(data, x=x, y=y)  # put back: the resume goes on
    res = runner.invoke(app, ["train", str(run), "--data", str(data), "--epochs", "2", "--batch-size", "50",
                              "--resume", "--quiet"])
    assert res.exit_code == 0, res.output


def test_a_run_being_trained_is_not_trained_or_replaced_by_a_second_command(run, monkeypatch):
    # Two writers of one run mixed their files: a second `train` or a `transform --force` over the
    # run while a training is in progress is refused at once, and changes nothing.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(run)!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('held', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        for args in (["train", str(run), *QUICK],
                     ["transform", "zoo:lenet300-100", "--method", "sparse-random", "--density", "0.2",
                      "--include-linear", "--out", str(run), "--force"]):
            res = runner.invoke(app, args)
            assert res.exit_code == 2, res.output
            assert "is being trained or replaced by another sparsify process" in res.output, res.output
            assert res.output.strip().count("\n") == 0, res.output
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
        assert not (run / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    # ... and `train` itself holds the lock while it trains.
    import sparsify.train.run as train_module
    from sparsify.errors import RunDirError
    from sparsify.rundir import run_lock
    seen = []
    real_fit = train_module.fit

    def fit_probe(*args, **kwargs):
        with pytest.raises(RunDirError, match="being trained"):
            with run_lock(run):
                pass
        seen.append(True)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(train_module, "fit", fit_probe)
    res = runner.invoke(app, ["train", str(run), *QUICK])
    assert res.exit_code == 0 and seen == [True], res.output
    with run_lock(run):  # released when the training ends
        pass


def test_the_retry_after_a_divergence_keeps_the_trainings_own_options(run):
    # The retry command held only --force --lr: pasted, it trained on the default data set without
    # the user's --clip-grad-norm 0 and diverged again
    res = runner.invoke(app, ["train", str(run), *QUICK, "--lr", "1e30", "--momentum", "0", "--clip-grad-norm", "0",
                              "--no-augment"])
    assert res.exit_code == 2 and "retry from the initial weights" in res.output, res.output
    retry = res.output.split("lower learning rate: ", 1)[1].strip()
    args = shlex.split(retry)
    assert args[:4] == ["sparsify", "train", str(run), "--force"]
    rest = [a for a in args[4:] if a != "--no-augment"]
    got = dict(zip(rest[0::2], rest[1::2]))
    assert got == {"--epochs": "1", "--batch-size": "50", "--lr": "1e+29", "--clip-grad-norm": "0", "--momentum": "0",
                   "--train-limit": "200"} and "--no-augment" in args, retry


def test_a_run_on_a_relative_data_folder_resumes_from_another_directory(tmp_path, monkeypatch):
    """`train RUN --data imgs` recorded "imgs": from elsewhere --resume said "unknown data set" and
    --data ../imgs "differs from the checkpoint's 'imgs'"; the path is now recorded absolute."""
    from sparsify.api import transform_to_dir
    from sparsify.train import train_run

    from test_user_data import make_folder

    work = tmp_path / "work"
    make_folder(work / "imgs", per_class=12)
    transform_to_dir("zoo:lenet5", "sparse-random", density=0.3, out=work / "run")

    def stop(ev):
        if ev.get("kind") == "epoch":
            raise KeyboardInterrupt

    monkeypatch.chdir(work)
    with pytest.raises(KeyboardInterrupt):
        train_run("run", data="imgs", epochs=2, batch_size=8, progress=stop)
    saved = (work / "run" / "checkpoints" / "last.pt").read_bytes()
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["--data", "work/imgs"]):
        (work / "run" / "checkpoints" / "last.pt").write_bytes(saved)
        res = runner.invoke(app, ["train", "work/run", "--resume", *extra])
        assert res.exit_code == 0, res.output
        assert json.loads((work / "run" / "summary.json").read_text())["train"]["data"] == str(work / "imgs")


LEAF_MODEL = '''
import math
import torch.nn as nn
import torch.nn.functional as F

INPUT_SHAPE = (1, 1, 8, 8)


class Conv2dSame(nn.Conv2d):
    """timm-style dynamic 'same' padding: traced whole as a leaf, coupled as a conv by its rule."""

    def forward(self, x):
        ih, kh, sh = x.shape[-1], self.weight.shape[-1], self.stride[0]
        p = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        return F.conv2d(F.pad(x, [p // 2, p - p // 2] * 2), self.weight, self.bias, self.stride)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(1, 16, 3, padding=1), Conv2dSame(16, 32, 3, stride=2), nn.Conv2d(32, 16, 3)
        self.fc = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x):
        return self.fc(F.relu(self.c(F.relu(self.b(F.relu(self.a(x)))))).flatten(1))
'''


@pytest.mark.parametrize("schedule", ["static", "sparse-momentum"])
def test_the_report_after_training_reads_the_run_with_its_leaves_rules(tmp_path, schedule):
    # summary.json after train dropped the --leaf layer kept as a conv by --rule: its masked weights
    # counted as dense parameters, its MACs as none, and compare / --match / the train note repeated it
    from sparsify.api import inspect

    (tmp_path / "leafnet.py").write_text(LEAF_MODEL)
    run, _ = transform_to_dir(str(tmp_path / "leafnet.py"), method="sparse-random", density=0.25,
                              leaf_modules=["Conv2dSame"], rules={"Conv2dSame": "conv"}, out=tmp_path / "run")
    before = json.loads((run / "summary.json").read_text())
    assert "b" in {l["name"] for l in before["layers"]}
    notes = []
    train_run(run, data="digits", epochs=2, train_limit=200, batch_size=50, schedule=schedule, log=notes.append)
    after = json.loads((run / "summary.json").read_text())
    layers = {l["name"]: l for l in after["layers"]}
    assert layers["b"]["sparse"] and layers["b"]["macs"] > 0
    truth = inspect(run)["totals"]  # what inspect reads of the trained run, with the recipe's rules
    assert after["totals"]["params"] == truth["params"] and after["totals"]["macs"] == truth["macs"]
    if schedule == "static":
        assert after["totals"]["params"] == before["totals"]["params"]
        assert after["totals"]["macs"] == before["totals"]["macs"]
    else:  # sparse momentum moved weights between layers: "before" is what transform reported
        change = after["train"]["layer_change"]
        assert change["macs"]["before"] == before["totals"]["macs"]
        assert change["macs_of_dense"]["before"] == before["ratios"]["macs"]
