"""The top-level Python API mirrors the CLI, stage by stage."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sparsify
from sparsify.errors import SparsifyError, UsageError


def test_api_pipeline_transform_load_train_export_inspect(tmp_path):
    path, res = sparsify.transform_to_dir("zoo:lenet5", "sparse-random", density=0.2, out=tmp_path / "run")
    assert sparsify.load(path).recipe.method == "sparse-random"
    metrics = sparsify.train(path, data="synthetic", epochs=1)
    assert "test_acc" in metrics
    report = sparsify.export(path, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").is_file() and report.sparse_layers >= 1
    onnx_report = sparsify.inspect(tmp_path / "m.onnx")
    assert onnx_report["totals"]
    run_report = sparsify.inspect(path)
    assert run_report["totals"]["sparse_layers"] == 3
    assert isinstance(sparsify.transform("zoo:mlp", "psn", density=0.1).model, torch.nn.Module)
    # an existing file is replaced only with force=True, as the CLI's --force (it was overwritten)
    before = (tmp_path / "m.onnx").read_bytes()
    with pytest.raises(UsageError, match="m.onnx exists; pass force=True"):
        sparsify.export(path, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == before
    assert sparsify.export(path, tmp_path / "m.onnx", force=True).sparse_layers >= 1
    for out, message in ((str(tmp_path / "nodir") + "/", "ends in a slash"), (3, "is not a path")):
        with pytest.raises(SparsifyError, match=message):
            sparsify.export(path, out)
    assert not (tmp_path / "nodir").exists()
    # a path object names a model file as a string does (it was an AttributeError on 'startswith')
    (tmp_path / "net.py").write_text("import torch.nn as nn\nINPUT_SHAPE = (1, 4)\n"
                                     "def build_model():\n    return nn.Sequential(nn.Linear(4, 2))\n")
    assert sparsify.transform(tmp_path / "net.py", "none").recipe.model == f"{tmp_path / 'net.py'}:build_model"
    assert sparsify.transform_to_dir(tmp_path / "net.py", "none", out=tmp_path / "p")[0].is_dir()
    with pytest.raises(UsageError, match="neither a spec"):
        sparsify.transform(3)


@pytest.mark.parametrize("call, message", [
    (lambda run: sparsify.transform("zoo:lenet5", density="0.3"), "--density must be a number, got '0.3'"),
    (lambda run: sparsify.transform("zoo:lenet5", "depth-multiplier", alpha="0.5"), "--alpha must be a number"),
    (lambda run: sparsify.transform("zoo:lenet5", density=0.3, input_shape="1,1,28,28"),
     "input shape '1,1,28,28' is not a shape of positive whole numbers"),
    (lambda run: sparsify.transform("zoo:lenet5", density=0.3, input_shape=(1, 1, 0, 8)), "positive whole numbers"),
    (lambda run: sparsify.transform("zoo:mlp", "psn", density=0.3, profile="lognormal", profile_params={"sigma": "x"}),
     "sigma='x': lognormal's sigma must be a number"),
    (lambda run: sparsify.train(run, epochs="2"), "--epochs must be a whole number, got '2'"),
    (lambda run: sparsify.train(run, lr="0.1"), "--lr must be a number, got '0.1'"),
    (lambda run: sparsify.train(run, normalize=1), "--normalize must be true or false, got 1"),
    # read as true: the classifier came out masked, the opposite of what was asked
    (lambda run: sparsify.transform("zoo:lenet5", density=0.3, include_classifier="false"),
     "--include-classifier must be true or false, got 'false'"),
    (lambda run: sparsify.transform("zoo:lenet5", density=0.3, rescale_init="false"), "--rescale-init must be true"),
    (lambda run: sparsify.transform("zoo:lenet5", density=0.3, leaf_modules="Conv2d"),
     r"leaf_modules is a list of module type names, e.g. \['Conv2d'\], not a string"),
])
def test_api_arguments_of_the_wrong_type_are_one_line(tmp_path, call, message):
    """The API promises a SparsifyError with a one-line message on bad input: these raised
    TypeError / ValueError from deep in the checks."""
    run, _ = sparsify.transform_to_dir("zoo:lenet5", "sparse-random", density=0.2, out=tmp_path / "run")
    with pytest.raises(UsageError, match=message) as e:
        call(run)
    assert "\n" not in str(e.value)



def test_transform_returns_the_recipe_that_replays_it(tmp_path):
    from sparsify import api

    res = api.transform("zoo:lenet5", "psn", density=0.2, profile="uniform", seed=5)
    assert res.recipe.method == "psn" and res.recipe.seed == 5 and res.recipe.model == "zoo:lenet5"
    assert res.recipe.params["profile"] == "uniform" and res.recipe.params["density"] == 0.2
    assert res.summary["method"] == "psn" and res.summary["totals"]["sparse_layers"] >= 1
    path, _ = api.transform_to_dir("zoo:lenet5", "psn", density=0.2, profile="uniform", seed=5, out=tmp_path / "r")
    masks = {k: v for k, v in res.model.state_dict().items() if k.endswith("mask")}
    loaded = {k: v for k, v in api.load(path).model.state_dict().items() if k.endswith("mask")}
    assert masks and masks.keys() == loaded.keys() and all(torch.equal(masks[k], loaded[k]) for k in masks)


def test_transform_default_out_and_refusals(tmp_path, monkeypatch):
    import pytest

    from sparsify import api
    from sparsify.errors import RunDirError, UsageError

    monkeypatch.chdir(tmp_path)
    path, _ = api.transform_to_dir("zoo:mlp", "sparse-random", density=0.25)
    assert path == tmp_path.joinpath("runs", "mlp-sparse-random-0.25").relative_to(tmp_path)
    with pytest.raises(RunDirError, match="not empty"):
        api.transform_to_dir("zoo:mlp", "sparse-random", density=0.25)
    for kwargs, words in [(dict(seed=-1), "--seed must be an integer"),
                          (dict(seed=2**32), r"--seed must be an integer in \[0, 4294967295\]"),  # was an overflow traceback
                          (dict(method="depth-multiplier", alpha=0.5, weights="w.pt"), "--weights applies to"),
                          (dict(method="psn", density=0.2, match=path, count="total"), "--match/--count apply"),
                          (dict(method="none", leaf_modules=["Nope"]), "--leaf Nope"),
                          # scaled the trained weights by up to 1.8x, silently
                          (dict(weights="w.pt", rescale_init=True), "with --weights it would scale the trained")]:
        kwargs.setdefault("method", "sparse-random")
        kwargs.setdefault("density", 0.1 if kwargs["method"] == "sparse-random" else kwargs.get("density"))
        with pytest.raises(UsageError, match=words):
            api.transform("zoo:mlp", **kwargs)


def test_match_chooses_the_alpha_of_equal_live_parameters(tmp_path):
    from sparsify import api

    run, made = api.transform_to_dir("zoo:resnet20", "sparse-random", density=0.2, out=tmp_path / "s")
    res = api.transform("zoo:resnet20", "depth-multiplier", match=run, count="total")
    matched = res.recipe.params["match"]
    assert matched["target"] == made.summary["totals"]["params"]
    assert abs(matched["achieved"] - matched["target"]) < 0.05 * matched["target"]
    assert 0 < res.recipe.params["alpha"] < 1


def test_inspect_a_model_lists_its_channel_groups():
    from sparsify import api

    report = api.inspect("zoo:resnet20")
    groups = report["channel_groups"]
    assert groups and sum(1 for g in groups if not g["frozen"]) >= 1
    assert report["totals"]["sparse_layers"] == 0


def test_numpy_scalars_are_taken_as_the_numbers_recipes_record(tmp_path):
    import json

    import numpy as np

    run, _ = sparsify.transform_to_dir("zoo:lenet5", density=np.float32(0.25), block=np.int64(2), out=tmp_path / "r")
    params = json.loads((run / "recipe.json").read_text())["params"]
    assert params["block"] == 2 and params["density"] == pytest.approx(0.25)
    assert sparsify.train(run, data="synthetic", epochs=np.int64(1), lr=np.float64(0.05))["test_acc"] >= 0


def test_data_as_a_path_object(tmp_path, monkeypatch):
    """``data=Path(...)`` names an .npz as its string does (it was refused: "--data must be a
    string"), and the run records the path as a string."""
    import json

    import numpy as np

    r = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=r.standard_normal((40, 1, 28, 28)).astype("float32"), y=r.integers(0, 10, 40))
    run, _ = sparsify.transform_to_dir("zoo:lenet5", density=0.25, out=tmp_path / "r")
    monkeypatch.chdir(tmp_path)
    assert sparsify.train(run, data=Path("d.npz"), epochs=1, batch_size=8)["test_acc"] >= 0
    recorded = json.loads((run / "summary.json").read_text())["train"]["config"]["data"]
    assert recorded == str(tmp_path / "d.npz")


def test_a_module_given_keeps_its_weights_unless_asked_to_rescale():
    """A trained module passed to transform came back with its kept weights scaled by 1.15-2.83x:
    rescale_init defaulted on whenever no weights file was given."""
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(16 * 4 * 4, 4))
    result = sparsify.transform(net, "sparse-random", density=0.3, input_shape=(1, 3, 8, 8))
    sparse = dict(result.model.named_parameters())
    for name, w in net.named_parameters():
        got = next(v for k, v in sparse.items() if k.endswith(name))
        live = got != 0
        assert live.any() and torch.equal(got[live], w.detach()[live]), name
    rescaled = sparsify.transform(net, "sparse-random", density=0.3, input_shape=(1, 3, 8, 8), rescale_init=True)
    conv = next(v for k, v in rescaled.model.named_parameters() if k.endswith("2.weight"))
    assert not torch.equal(conv[conv != 0], net[2].weight.detach()[conv != 0])  # asked: scaled to the fan-in


def test_arrays_as_data_are_one_line_naming_what_data_takes(tmp_path):
    """It printed the array's whole multi-line repr."""
    import numpy as np

    run, _ = sparsify.transform_to_dir("zoo:lenet5", density=0.3, out=tmp_path / "r")
    with pytest.raises(UsageError) as e:
        sparsify.train(run, data=np.zeros((10, 1, 28, 28)))
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 300 and "object of type ndarray" in msg and "np.savez" in msg
