"""sparsify.rundir: the run-directory format, its naming policy, and replay below the API."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sparsify import api
from sparsify.errors import ModelLoadError, RunDirError
from sparsify.rundir import (MODEL_IMPORTS, MODEL_SOURCE, RECIPE, SUMMARY, WEIGHTS, WEIGHTS_INIT, Recipe, default_run_dir,
                             is_run_dir, load_run, read_recipe, read_summary, save_run)


def test_default_run_dir_names_model_method_and_value(tmp_path):
    assert default_run_dir("zoo:lenet5", "sparse-random", 0.1) == Path("runs/lenet5-sparse-random-0.1")
    assert default_run_dir("torchvision:resnet18", "psn", 0.25) == Path("runs/resnet18-psn-0.25")
    assert default_run_dir("/a/b/my net.py:Factory", "depth-multiplier", 0.5) == Path("runs/my_net-depth-multiplier-0.5")
    assert default_run_dir("zoo:mlp", "none") == Path("runs/mlp-none")
    taken = default_run_dir("zoo:mlp", "none", root=tmp_path)
    taken.mkdir()
    assert default_run_dir("zoo:mlp", "none", root=tmp_path) == taken                  # the caller refuses or replaces
    assert default_run_dir("zoo:mlp", "none", root=tmp_path, next_free=True) == tmp_path / "mlp-none-2"


def test_api_default_out_is_the_rundir_policy():
    result = api.transform("zoo:lenet5", "sparse-random", density=0.3)
    assert api.default_out(result.recipe) == default_run_dir("zoo:lenet5", "sparse-random", 0.3)


def test_recipe_json_round_trip_and_optional_fields():
    r = Recipe(model="zoo:mlp", input_shape=[1, 1, 28, 28], method="psn", params={"density": 0.1}, seed=2)
    data = r.to_json()
    assert "input_shapes" not in data and "rules" not in data        # absent when unused: older readers agree
    assert Recipe.from_json(json.loads(json.dumps(data))) == r
    two = Recipe(model="zoo:mlp", input_shape=[1, 3], method="none", input_shapes=[[1, 3], [1, 5]])
    assert two.shapes == [[1, 3], [1, 5]] and r.shapes == [[1, 1, 28, 28]]


@pytest.mark.parametrize("field,value,words", [("seed", -1, "seed must be an integer >= 0"),
                                               ("input_shape", [1, 0], "input_shape must be a list of positive"),
                                               ("params", [], "params must be an object")])
def test_recipe_of_the_wrong_type_names_the_field(field, value, words):
    data = {"model": "zoo:mlp", "input_shape": [1, 1, 28, 28], "method": "none", field: value}
    with pytest.raises(ValueError, match=words):
        Recipe.from_json(data)
    with pytest.raises(ValueError, match="no 'method'"):
        Recipe.from_json({"model": "zoo:mlp", "input_shape": [1]})


def test_read_recipe_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(RunDirError, match="does not exist"):
        read_recipe(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(RunDirError, match="is not a run directory"):
        read_recipe(tmp_path / "d")
    (tmp_path / "d" / RECIPE).write_text("{not json")
    (tmp_path / "d" / WEIGHTS).write_bytes(b"")
    assert is_run_dir(tmp_path / "d")
    with pytest.raises(RunDirError, match="is corrupt"):
        read_recipe(tmp_path / "d")


def test_read_summary_drops_damaged_sections(tmp_path):
    assert read_summary(tmp_path) == {}
    (tmp_path / SUMMARY).write_text(json.dumps({"original_totals": {"params": "many"}, "train": 3, "totals": {"params": 5}}))
    assert read_summary(tmp_path) == {"totals": {"params": 5}}


def test_save_and_load_round_trip_the_tensors(tmp_path):
    result = api.transform("zoo:lenet5", "sparse-random", density=0.2, seed=4)
    with torch.no_grad():                                   # weights that differ from the replayed initial ones
        for p in result.model.parameters():
            p.mul_(1.5)
    path = save_run(tmp_path / "run", result.recipe, result.model, result.summary)
    assert sorted(p.name for p in path.iterdir()) == sorted([RECIPE, WEIGHTS, WEIGHTS_INIT, SUMMARY])
    run = load_run(path)
    want, got = result.model.state_dict(), run.model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert run.recipe == result.recipe and run.summary["totals"] == result.summary["totals"]
    with pytest.raises(RunDirError, match="exists and is not empty"):
        save_run(path, result.recipe, result.model, result.summary)


def test_an_older_run_directory_still_loads(tmp_path):
    """A recipe as the first format wrote it: no rules/input_shapes/weights, sparse-random without rescale_init."""
    path, made = api.transform_to_dir("zoo:lenet5", "sparse-random", density=0.2, out=tmp_path / "run")
    recipe = json.loads((path / RECIPE).read_text())
    for key in ("weights",):
        recipe.pop(key, None)
    recipe["params"].pop("rescale_init")
    (path / RECIPE).write_text(json.dumps(recipe))
    run = load_run(path)
    assert run.recipe.params == {k: v for k, v in made.recipe.params.items() if k != "rescale_init"}
    assert all(torch.equal(a, b) for a, b in zip(run.model.state_dict().values(), made.model.state_dict().values()))


def test_a_run_of_a_newer_format_is_refused_in_one_line(tmp_path):
    # a newer sparsify's run was read as if this one had written it (inspect / export exit 0)
    path, _ = api.transform_to_dir("zoo:lenet5", "sparse-random", density=0.5, out=tmp_path / "run")
    data = json.loads((path / RECIPE).read_text())
    data.update(format=99, versions={**data["versions"], "sparsify": "9.0.0"})
    (path / RECIPE).write_text(json.dumps(data))
    with pytest.raises(RunDirError, match=r"made by sparsify 9\.0\.0 \(run format 99; this sparsify reads up to 1\); "
                                          r"upgrade sparsify"):
        read_recipe(path)
    with pytest.raises(RunDirError, match="run format 99"):
        load_run(path)


def test_load_run_takes_the_model_file_by_checksum(tmp_path):
    """A user's model file that changed since the run was made is replayed from the run's own copy."""
    src = tmp_path / "net.py"
    src.write_text(textwrap.dedent("""
        import torch.nn as nn
        INPUT_SHAPE = (1, 3, 8, 8)
        def build():
            return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(128, 4))
    """))
    path, _ = api.transform_to_dir(f"{src}:build", "sparse-random", density=0.5, out=tmp_path / "run")
    assert (path / MODEL_SOURCE).read_text() == src.read_text()
    src.write_text(src.read_text().replace("nn.Conv2d(8, 8, 3)", "nn.Conv2d(8, 16, 3)").replace("128", "256"))
    run = load_run(path)                                   # the edited file would not match the weights
    assert [m.out_channels for m in run.model.modules() if hasattr(m, "out_channels")] == [8, 8]


def _model_with_local_imports(folder: Path, tag: str) -> Path:
    """net.py importing a module and a package that sit beside it (names unique to ``tag``: the
    process keeps its imports, which is part of what is tested)."""
    (folder / f"acts_{tag}.py").write_text("import torch.nn.functional as F\nACT = F.relu\n")
    (folder / f"blocks_{tag}").mkdir()
    (folder / f"blocks_{tag}" / "__init__.py").write_text(f"from .conv import block\n")
    (folder / f"blocks_{tag}" / "conv.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout))
    """))
    src = folder / "net.py"
    src.write_text(textwrap.dedent(f"""
        # a model built from modules beside it
        import torch.nn as nn
        from acts_{tag} import ACT
        from blocks_{tag} import block
        INPUT_SHAPE = (1, 3, 8, 8)
        class Net(nn.Module):
            def __init__(self, head):
                super().__init__()
                self.a, self.b, self.fc = block(3, 8), block(8, 8), head
            def forward(self, x):
                return self.fc(ACT(self.b(ACT(self.a(x)))).mean((2, 3)))
        def build_model():
            from heads_{tag} import head  # imported when the model is built
            return Net(head())
    """))
    (folder / f"heads_{tag}.py").write_text("import torch.nn as nn\ndef head():\n    return nn.Linear(8, 4)\n")
    return src


def _forget(tag: str) -> None:
    """Drop this process's imports of the tagged modules, as a new `sparsify` command starts without them."""
    for name in [n for n in sys.modules if n.endswith(tag)] + [n for n in sys.modules if f"_{tag}." in n]:
        del sys.modules[name]


def test_a_run_keeps_the_local_modules_its_model_file_imports(tmp_path):
    """Editing a module the model file imports from beside it changed an existing run's model
    silently (only the file itself was checksummed and copied); a run moved elsewhere could not
    import them. The run records and copies them and replays from the copies when they changed."""
    tag = tmp_path.name.replace("-", "_")
    src = _model_with_local_imports(tmp_path, tag)
    path, _ = api.transform_to_dir(str(src), "sparse-random", density=0.5, out=tmp_path / "run")
    recipe = read_recipe(path)
    assert set(recipe.source_imports) == {f"acts_{tag}.py", f"blocks_{tag}/__init__.py", f"blocks_{tag}/conv.py",
                                          f"heads_{tag}.py"}
    assert (path / MODEL_IMPORTS / f"blocks_{tag}" / "conv.py").is_file()
    x = torch.randn(4, 3, 8, 8) * 2
    with torch.no_grad():
        ref = load_run(path).model.eval()(x)
    assert ref.std() > 1e-3

    (tmp_path / f"acts_{tag}.py").write_text("import torch\nACT = torch.sigmoid\n")   # the user edits a sibling
    for fresh_process in (False, True):
        if fresh_process:
            _forget(tag)
        with torch.no_grad():
            torch.testing.assert_close(load_run(path).model.eval()(x), ref)      # the run's own copies
    (tmp_path / f"blocks_{tag}" / "conv.py").write_text("def block(cin, cout):\n    raise RuntimeError('gone')\n")
    (tmp_path / f"heads_{tag}.py").write_text("import torch.nn as nn\ndef head():\n    return nn.Linear(8, 6)\n")
    src.write_text(src.read_text().replace("# a model", "# A model"))                # and the file itself
    _forget(tag)
    with torch.no_grad():
        torch.testing.assert_close(load_run(path).model.eval()(x), ref)
    moved = tmp_path / "elsewhere"
    (path).rename(moved)
    for f in (src, tmp_path / f"acts_{tag}.py"):
        f.unlink()
    with torch.no_grad():
        torch.testing.assert_close(load_run(moved).model.eval()(x), ref)         # the sources are gone


def test_a_run_whose_copy_cannot_be_imported_says_the_file_changed(tmp_path):
    """A run without copies of the file's imports (made before they were copied, or damaged) whose
    file changed: the error said "importing RUN/model_source.py failed ... fix the file"."""
    tag = tmp_path.name.replace("-", "_")
    src = _model_with_local_imports(tmp_path, tag)
    path, _ = api.transform_to_dir(str(src), "none", out=tmp_path / "run")
    shutil.rmtree(path / MODEL_IMPORTS)
    src.write_text(src.read_text().replace("# a model", "# A model"))
    _forget(tag)
    assert isinstance(load_run(path).model, torch.nn.Module)        # the original folder's modules serve
    (tmp_path / f"acts_{tag}.py").unlink()
    _forget(tag)
    with pytest.raises(ModelLoadError) as info:
        load_run(path)
    msg = str(info.value)
    assert f"{src} changed since the transform, so the run's copy was used" in msg and f"acts_{tag}" in msg
    assert "fix the file" not in msg and len(msg.splitlines()) == 1


def test_loading_a_run_does_not_import_the_api(tmp_path):
    path, _ = api.transform_to_dir("zoo:mlp", "psn", density=0.2, out=tmp_path / "run")
    code = ("import sys\nfrom sparsify.rundir import load_run\n"
            f"load_run({str(path)!r})\n"
            "print(sorted(m for m in sys.modules if m in ('sparsify.api', 'sparsify.cli', 'sparsify.pipeline')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
