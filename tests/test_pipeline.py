"""sparsify.pipeline: the variants of a run directory (``sparsify bench RUN``) and the one-command pipeline."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sparsify import pipeline
from sparsify.cli import app
from sparsify.errors import UsageError

FAST = ["--min-time", "0.01", "--repeats", "3", "--warmup", "1", "-q", "--no-memory"]


def test_parse_variants():
    assert pipeline.parse_variants(None) == list(pipeline.VARIANTS)
    assert pipeline.parse_variants("sparse, dense,sparse") == ["sparse", "dense"]
    with pytest.raises(UsageError):
        pipeline.parse_variants(" , ")


def test_bench_run_dir_builds_dense_sparse_and_depth_variants(tmp_path):
    from sparsify.api import transform_to_dir

    run, _ = transform_to_dir("zoo:lenet5", "sparse-random", density=0.1, out=tmp_path / "run")
    js = tmp_path / "b.json"
    keep = tmp_path / "variants"
    r = CliRunner().invoke(app, ["bench", str(run), "--variants", "dense,sparse,depth", "--json-file", str(js),
                                 "--keep", str(keep), *FAST])
    assert r.exit_code == 0, r.output
    data = json.loads(js.read_text())
    assert [f["label"] for f in data["files"]] == ["dense", "sparse", "depth"]
    files = {f["label"]: f for f in data["files"]}
    assert files["dense"]["sparse_nodes"] == 0 and files["sparse"]["sparse_nodes"] >= 1
    assert files["depth"]["sparse_nodes"] == 0
    row = next(x for x in data["rows"] if x["label"] == "sparse")
    assert row["max_rel_diff"] < 1e-4                    # same function as the dense export
    depth = data["notes"]["depth"]
    assert 0 < depth["alpha"] < 1
    # channels rounded to multiples of 8 (ORT's fast path): the counts move in steps, the nearest is taken
    assert depth["divisor"] == pipeline.DEPTH_DIVISOR == 8 and "mismatch" not in depth
    assert abs(depth["live_params"] - depth["target_live_params"]) <= 0.05 * depth["target_live_params"]
    # the alpha reported (JSON and table) rebuilds the model benched: it was rounded (0.500 for
    # 0.5000000000000001, whose ceil(alpha * C) widths are one channel wider)
    from sparsify.api import transform
    from sparsify.pipeline import live_params

    assert f"alpha={depth['alpha']!r}," in r.output
    assert live_params(transform("zoo:lenet5", "depth-multiplier", alpha=depth["alpha"], divisor=8).model) == \
        depth["live_params"]
    assert sorted(p.name for p in keep.iterdir()) == ["dense.onnx", "depth.onnx", "sparse.onnx"]
    assert files["sparse"]["path"] == str(keep / "sparse.onnx")
    assert sorted(p.name for p in run.iterdir()) == ["recipe.json", "summary.json", "weights.init.safetensors",
                                                     "weights.safetensors"]
    # depth first (the baseline of the speed-ups): the others are still compared with the dense model,
    # not with depth's outputs (another network: dense read rel diff 2e+00)
    again = pipeline.bench_variants([(n, keep / f"{n}.onnx") for n in ("depth", "dense", "sparse")],
                                    min_time=0.0, repeats=1, warmup=1, memory=False)
    rel = {x.label: x.max_rel_diff for x in again.rows}
    assert rel["depth"] is None and rel["dense"] == 0.0 and rel["sparse"] < 1e-4


def test_depth_equivalent_is_the_nearest_count_and_transforms_once(monkeypatch):
    from sparsify import api
    from sparsify.nn import live_params
    from sparsify.passes import depth_multiplier as dm
    from sparsify.replay import trace_recipe

    sparse = api.transform("zoo:resnet20", "sparse-random", density=0.2)
    target = live_params(sparse.model)
    calls = []
    original = dm.DepthMultiplierPass.__call__
    monkeypatch.setattr(dm.DepthMultiplierPass, "__call__", lambda self, *a: calls.append(self.alpha) or original(self, *a))
    model, alpha, n = pipeline.depth_equivalent(sparse.recipe, target)
    assert calls == [alpha] and n == live_params(model) and 0 < alpha < 1
    traced = trace_recipe(sparse.recipe)
    counter = dm.DepthCounter(traced.gm, traced.example)
    assert counter.counts(alpha)["total"] == n                     # the counter and the model agree
    grid = [counter.counts(a / 200)["total"] for a in range(1, 201)]
    assert abs(n - target) <= min(abs(c - target) for c in grid)  # no alpha on a fine grid comes nearer


@pytest.mark.heavy  # 14 s: kept out of CI's 15 minutes (export_variants itself runs in the other pipeline tests)
def test_export_variants_loads_the_run_once(tmp_path, monkeypatch):
    from sparsify import api, rundir

    run, _ = api.transform_to_dir("zoo:lenet5", "sparse-random", density=0.1, out=tmp_path / "run")
    loads = []
    original = rundir.load_run
    monkeypatch.setattr(rundir, "load_run", lambda *a, **k: loads.append(a) or original(*a, **k))
    (tmp_path / "v").mkdir()
    files, notes = pipeline.export_variants(run, tmp_path / "v", list(pipeline.VARIANTS))
    assert len(loads) == 1
    assert [name for name, _ in files] == list(pipeline.VARIANTS) and all(p.is_file() for _, p in files)
    assert notes["depth"]["target_live_params"] == _live(original(run).model)


def test_export_variants_skips_depth_for_methods_that_mask_nothing(tmp_path):
    from sparsify import api

    run, _ = api.transform_to_dir("zoo:lenet5", "none", out=tmp_path / "run")
    seen: list[tuple[str, int, int]] = []
    files, notes = pipeline.export_variants(run, tmp_path, ["dense", "depth"], progress=lambda *a: seen.append(a))
    assert [name for name, _ in files] == ["dense"] and notes["depth"].startswith("skipped")
    # each variant's export stages show in the progress line (half a minute each at 224x224)
    assert seen[:3] == [("exporting dense", 0, 2), ("exporting dense: checking the model", 0, 2),
                        ("exporting dense: preparing the graph", 0, 2)]
    assert ("exporting dense: verifying in ONNX Runtime against PyTorch", 0, 2) in seen
    assert seen[-2:] == [("exporting depth", 1, 2), ("exported", 2, 2)]


def test_a_depth_multiplier_run_is_timed_against_the_original_model(tmp_path):
    # `run --method depth-multiplier` timed the thinned model as dense, compact and sparse: 1.00x
    import onnx

    from sparsify import api

    run, res = api.transform_to_dir("zoo:lenet5", "depth-multiplier", alpha=0.5, out=tmp_path / "run")
    (tmp_path / "v").mkdir()
    files, notes = pipeline.export_variants(run, tmp_path / "v", ["dense", "compact", "sparse"])
    assert [name for name, _ in files] == ["dense", "depth"]
    size = {name: sum(onnx.numpy_helper.to_array(t).size for t in onnx.load(str(p)).graph.initializer)
            for name, p in files}
    original = _live(api.transform("zoo:lenet5", "none").model)
    # the files' weights (and a few shape constants) are the two models'
    assert abs(size["depth"] - _live(res.model)) < 0.01 * size["depth"] and abs(size["dense"] - original) < 0.01 * original
    assert size["depth"] < 0.5 * size["dense"]
    assert "original model" in notes["dense"] and "alpha=0.5" in notes["depth"]


def _live(model) -> int:
    from sparsify.nn import live_params

    return live_params(model)


TRAIN = {"data": "digits", "epochs": 2, "train_limit": 100, "batch_size": 50}


def test_a_run_stopped_before_its_first_epoch_names_the_training_it_asked_for():
    # "`sparsify train RUN` trains it": with train's defaults (10 epochs), not the 1 the run asked for
    from pathlib import Path

    from sparsify.pipeline import PipelineInterrupted

    said = str(PipelineInterrupted(Path("runs/r"), "training", False,
                                   {"data": "my data", "epochs": 1, "lr": None, "schedule": "rigl", "train_limit": 9}))
    assert "`sparsify train runs/r --data 'my data' --epochs 1 --schedule rigl` trains it" in said
    # and then what exports and times it (the README's "train --resume, bench RUN": only the first was said)
    assert said.endswith("then `sparsify bench runs/r --keep runs/r --json-file runs/r/bench.json --plot "
                         "runs/r/plot.png --force` exports and times it"), said
    # stopped in export: plain `bench RUN` only prints, so the run's files never appeared
    said = str(PipelineInterrupted(Path("runs/my r"), "export", False))
    assert ("`sparsify bench 'runs/my r' --keep 'runs/my r' --json-file 'runs/my r/bench.json' --plot "
            "'runs/my r/plot.png' --force` exports and times its variants" in said), said


@pytest.mark.parametrize("at", ["train", "export"])
def test_run_stopped_after_the_transform_keeps_what_is_complete(tmp_path, at):
    # Ctrl-C removed the whole temporary run directory, a finished training with it, and said
    # "completed outputs are intact"; stopped in training it now holds the checkpoint to resume
    from sparsify.pipeline import PipelineInterrupted, run_pipeline
    from sparsify.train import train_run

    def stop(stage, desc, done, total):
        if (at == "train" and stage == "train" and desc.startswith("training epoch 2")) or \
                (at == "export" and stage == "export"):
            raise KeyboardInterrupt

    notes: list[str] = []
    run = tmp_path / "rr"
    with pytest.raises(PipelineInterrupted) as e:
        run_pipeline("zoo:lenet5", run, transform_options={"method": "sparse-random", "density": 0.3},
                     train_options=TRAIN, progress=stop, log=notes.append)
    assert [p.name for p in tmp_path.iterdir()] == ["rr"]  # no temporary directory left
    assert (run / "recipe.json").is_file() and (run / "weights.safetensors").is_file()
    if at == "train":
        assert f"sparsify train {run} --resume" in str(e.value) and (run / "checkpoints" / "last.pt").is_file()
        assert not (run / "metrics.jsonl").exists()
        result = train_run(run, resume=True, **TRAIN)  # the message's command works
        assert result["epochs"] == 2 and (run / "metrics.jsonl").is_file()
    else:
        assert f"sparsify bench {run}" in str(e.value) and (run / "metrics.jsonl").is_file()
        assert not list(run.glob("*.onnx")) and not (run / "bench.json").exists()


def test_model_variants_round_the_depth_model_and_prepare_it_before_export(tmp_path):
    # the benchmark scripts' form: a model in memory, file names with a prefix, the depth model's
    # channels rounded to multiples of 8 and calibrated (prepare) before its export
    import onnx

    from sparsify.api import transform

    res = transform("zoo:lenet5", method="sparse-random", density=0.1, seed=0)
    prepared = []
    files, notes, reports = pipeline.export_model_variants(
        res.model, res.recipe, tmp_path, ["sparse", "depth"], prefix="lenet5-", depth_divisor=8,
        prepare=prepared.append)
    assert [(label, p.name) for label, p in files] == [("sparse", "lenet5-sparse.onnx"), ("depth", "lenet5-depth.onnx")]
    assert len(prepared) == 1 and prepared[0] is not res.model and notes["depth"]["divisor"] == 8
    assert set(reports) == {"sparse", "depth"} and reports["sparse"].sparse_layers >= 1
    graph = onnx.load(str(files[1][1])).graph
    inits = {i.name: i for i in graph.initializer}
    widths = [inits[n.input[1]].dims[0] for n in graph.node if n.op_type == "Conv"]
    assert widths and all(w % 8 == 0 for w in widths), widths
    with pytest.raises(UsageError, match="unknown variant 'thin'"):
        pipeline.export_model_variants(res.model, res.recipe, tmp_path, ["thin"])


FEATURES_OUT = """
import torch, torch.nn as nn, torch.nn.functional as F

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.c, self.fc = nn.Conv2d(64, 64, 3, padding=1), nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.b(F.relu(self.a(x))))
        feats = (x + F.relu(self.c(x))).mean((2, 3))
        return self.fc(feats), feats  # the 64 channels are an output: kept whole

def build_model():
    return Net()

INPUT_SHAPE = (1, 3, 16, 16)
"""


NARROW = """
import torch, torch.nn as nn, torch.nn.functional as F

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 24, 3, padding=1), nn.Conv2d(24, 24, 3, padding=1), nn.Linear(24, 4)

    def forward(self, x):
        return self.fc(F.relu(self.b(F.relu(self.a(x)))).mean((2, 3)))

def build_model():
    return Net()

INPUT_SHAPE = (1, 3, 8, 8)
"""


@pytest.mark.parametrize("source,density,cause", [
    (FEATURES_OUT, 0.2, "channel groups the model keeps whole"),
    # 24 channels in multiples of 8 step 24 -> 16 -> 8: the cause read "channel groups the model keeps
    # whole", which none is here
    (NARROW, 0.3, "rounded to multiples of 8 move it in steps"),
])
def test_a_depth_baseline_that_cannot_match_the_sparse_run_says_why(tmp_path, source, density, cause):
    # alpha=1e-09 with 3x the sparse run's parameters was timed as the equal-parameter baseline silently
    from sparsify.api import transform_to_dir
    from sparsify.cli.bench import _variant_notes

    (tmp_path / "net.py").write_text(source)
    run, _ = transform_to_dir(str(tmp_path / "net.py"), "sparse-random", density=density, out=tmp_path / "run")
    _, notes = pipeline.export_variants(run, tmp_path, ["depth"])
    depth, target = notes["depth"], notes["depth"]["target_live_params"]
    assert abs(depth["live_params"] - target) > pipeline.DEPTH_MISMATCH * target
    assert "not an equal-parameter baseline" in depth["mismatch"] and cause in depth["mismatch"]
    assert any(line.startswith("warning: depth: no depth multiplier reaches") for line in _variant_notes(notes))
    if source is NARROW:
        unrounded = int(depth["mismatch"].split("unrounded widths would give ")[1].split(")")[0].replace(",", ""))
        assert abs(unrounded - target) <= pipeline.DEPTH_MISMATCH * target


def test_run_force_stopped_keeps_the_run_it_was_to_replace(tmp_path):
    # Ctrl-C in `run --force` made the new run's partial directory (a transform and a checkpoint)
    # replace the finished run: its trained weights, exports and bench results were gone
    from sparsify.api import transform_to_dir
    from sparsify.pipeline import PipelineInterrupted, run_pipeline

    run = tmp_path / "rr"
    transform_to_dir("zoo:lenet5", "sparse-random", density=0.5, out=run)
    (run / "bench.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in run.iterdir()}

    def stop(stage, desc, done, total):
        if stage == "train" and desc.startswith("training epoch 2"):
            raise KeyboardInterrupt

    with pytest.raises(PipelineInterrupted) as e:
        run_pipeline("zoo:lenet5", run, transform_options={"method": "sparse-random", "density": 0.3},
                     train_options=TRAIN, progress=stop, force=True)
    assert f"{run} is unchanged" in str(e.value)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["rr"]  # no temporary directory left


def test_bench_keep_leaves_the_users_files_alone_without_force(tmp_path):
    from sparsify.api import transform_to_dir

    run, _ = transform_to_dir("zoo:lenet5", "sparse-random", density=0.1, out=tmp_path / "run")
    keep = tmp_path / "variants"
    keep.mkdir()
    (keep / "dense.onnx").write_bytes(b"the user's own model")
    args = ["bench", str(run), "--variants", "dense,sparse", "--keep", str(keep), *FAST]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "dense.onnx exists; pass --force" in " ".join(r.output.split())
    assert (keep / "dense.onnx").read_bytes() == b"the user's own model" and not (keep / "sparse.onnx").exists()
    r = CliRunner().invoke(app, [*args, "--force"])
    assert r.exit_code == 0, r.output
    assert (keep / "dense.onnx").read_bytes() != b"the user's own model"
