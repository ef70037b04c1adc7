"""Study specs: a valid spec parses into arms x seeds; every mistake is one line naming the key, exit 2."""
from __future__ import annotations

import textwrap

import pytest
from typer.testing import CliRunner

from sparsify.cli import app
from sparsify.study.spec import SpecError, load_spec

runner = CliRunner()

GOOD = """
[study]
model = "zoo:mlp"
seeds = 2
baseline = "dense"
[train]
data = "digits"
epochs = 1
[arms.dense]
method = "none"
[arms.sparse]
method = "sparse-random"
density = 0.2
seeds = [0, 1, 5]
train = { schedule = "rigl", init = "erk" }
[arms.depth]
method = "depth-multiplier"
match = "sparse"
count = "conv"
"""


def _write(tmp_path, text: str):
    p = tmp_path / "spec.toml"
    p.write_text(textwrap.dedent(text))
    return p


def test_good_spec_parses_arms_seeds_and_merged_train_settings(tmp_path):
    spec = load_spec(_write(tmp_path, GOOD))
    assert spec.name == "spec" and spec.baseline == "dense"
    assert list(spec.arms) == ["dense", "sparse", "depth"]
    assert spec.arms["dense"].seeds == [0, 1] and spec.arms["sparse"].seeds == [0, 1, 5]
    assert spec.arms["sparse"].train == {"data": "digits", "epochs": 1, "schedule": "rigl", "init": "erk"}
    assert spec.arms["sparse"].transform == {"density": 0.2}
    # a matched arm runs after the arm it matches
    order = [(a.name, s) for a, s in spec.jobs()]
    assert order.index(("sparse", 0)) < order.index(("depth", 0))


BAD = [
    ("[study\nmodel = 1", "not valid TOML"),
    ("[train]\nepochs = 1", "missing [study] table"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = 2\n[arms.a]\nmethod = "none"\ndensty = 0.1', "[arms.a] key 'densty' is unknown"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = 0\n[arms.a]\nmethod = "none"', "[study] seeds = 0"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = 2\n[arms.a]\nmethod = "sparse-random"', "[arms.a] sparse-random needs density"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = 2\n[arms.a]\nmethod = "sparse-random"\ndensity = 1.5', "density 1.5 is outside (0, 1]"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = 2\n[arms.a]\nmethod = "sparse-random"\ndensity = "0.1"', "density = '0.1' is not a float"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = 2\n[arms.a]\nmethod = "sparse-random"\ndensity = 0.1\nblock = 1.5',
     "block = 1.5 is not an int"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = 2\n[arms.a]\nmethod = "sparse-random"\ndensity = 0.1\nblock = 0',
     "[arms.a] block must be a whole number >= 1"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = 2\n[arms.a]\nmethod = "pruning"', "method 'pruning' is unknown"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = 2\n[train]\nepochz = 3\n[arms.a]\nmethod = "none"', "unknown training option(s) epochz"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = 2\n[train]\nlr_schedule = "linear"\n[arms.a]\nmethod = "none"', "lr_schedule must be one of"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = 2\n[train]\nseed = 3\n[arms.a]\nmethod = "none"', "[train] sets seed"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = 2\n[arms.a]\nmethod = "depth-multiplier"\nmatch = "b"\ncount = "conv"', "match = 'b' is not an arm"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = 2\n[arms.a]\nmethod = "depth-multiplier"\nmatch = "a"', "needs both match"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = 2\n[arms.a]\nmethod = "depth-multiplier"\nmatch = "b"\ncount = "total"\n'
     '[arms.b]\nmethod = "depth-multiplier"\nmatch = "a"\ncount = "total"', "match forms a cycle"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = 2\n[arms.a]\nmethod = "none"\nmatch = "a"\ncount = "conv"', "apply to method = \"depth-multiplier\" only"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = 2\nbaseline = "x"\n[arms.a]\nmethod = "none"', "baseline 'x' is not an arm"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = 2\n[arms.a-0.5]\nmethod = "none"', "write [arms.\"a-0.5\"]"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = 2\n[arms."a/b"]\nmethod = "none"', "arm names become directory names"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = 2', "no arms"),
    # these were tracebacks (dict("abc"), unhashable lists) or passed: [[1, 2]] read as {1: 2}
    ('[study]\nmodel = "zoo:mlp"\nmodel_args = "abc"\nseeds = 2\n[arms.a]\nmethod = "none"', "model_args must be a table"),
    ('[study]\nmodel = "zoo:mlp"\nmodel_args = [[1, 2]]\nseeds = 2\n[arms.a]\nmethod = "none"', "model_args must be a table"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = 2\nbaseline = ["a"]\n[arms.a]\nmethod = "none"', "[study] baseline must be a string"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = 2\n[arms.a]\nmethod = "depth-multiplier"\nmatch = ["a"]\ncount = "conv"',
     "[arms.a] match must be a string"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = 2\nname = "../../x"\n[arms.a]\nmethod = "none"', "[study] name becomes a directory name"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = 2\n[arms."spec.toml"]\nmethod = "none"', "the study's own file"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = 2\n[arms.logs]\nmethod = "none"', "the study's own folder"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = 10000000000000\n[arms.a]\nmethod = "none"', "more than a study can hold"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = [10000000000000]\n[arms.a]\nmethod = "none"', "integers in [0, 4294967295]"),
    ('[study]\nmodel = "zoo:nothere"\nseeds = 2\n[arms.a]\nmethod = "none"', "[study] model: unknown zoo model 'nothere'"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = 2\n[arms.a]\nmethod = "none"\nmodel = "zoo:lenet"', "[arms.a] model: unknown zoo model"),
    # a missing model file was found only as the arm's job failed, after the other jobs had begun
    ('[study]\nmodel = "nothere.py"\nseeds = 2\n[arms.a]\nmethod = "none"', "[study] model nothere.py: no such file"),
    ('[study]\nmodel = "zoo:mlp"\nseeds = 2\n[arms.a]\nmethod = "none"\nmodel = "gone.py:build"',
     "[arms.a] model gone.py:build: no such file"),
]


@pytest.mark.parametrize("text,expected", BAD, ids=[e for _, e in BAD])
def test_spec_errors_are_one_line_naming_the_key(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert expected in str(info.value) and "\n" not in str(info.value)
    res = runner.invoke(app, ["study", str(path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and expected in res.output, res.output
    assert not (tmp_path / "out").exists()  # nothing is written for a spec that cannot run


def test_missing_spec_file(tmp_path):
    res = runner.invoke(app, ["study", str(tmp_path / "nope.toml")])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(app, ["study", str(tmp_path)])  # said "does not exist" of a folder
    assert res.exit_code == 2 and "is a directory" in res.output
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe bad")  # a UnicodeDecodeError traceback
    res = runner.invoke(app, ["study", str(tmp_path / "bin.toml")])
    assert res.exit_code == 2 and "not UTF-8" in res.output and len(res.output.strip().splitlines()) == 1


def test_help_documents_the_spec_format():
    res = runner.invoke(app, ["study", "--help"])
    assert res.exit_code == 0
    for word in ("[study]", "[train]", "[arms.", "seeds", "match", "count", "--jobs"):
        assert word in res.output


def test_model_file_is_found_next_to_the_spec(tmp_path, monkeypatch):
    (tmp_path / "net.py").write_text("import torch.nn as nn\nINPUT_SHAPE = (1, 4)\n"
                                     "def build_model():\n    return nn.Sequential(nn.Linear(4, 2))\n")
    spec = _write(tmp_path, '[study]\nmodel = "net.py:build_model"\nseeds = 1\n[arms.a]\nmethod = "none"')
    monkeypatch.chdir(tmp_path.parent)  # the spec is read from elsewhere
    assert load_spec(spec).arms["a"].model == f"{tmp_path / 'net.py'}:build_model"


def test_data_folder_is_found_next_to_the_spec_like_the_model_file(tmp_path, monkeypatch):
    here, spec_dir = tmp_path / "here", tmp_path / "specs"
    here.mkdir(), spec_dir.mkdir(), (spec_dir / "imgs").mkdir()
    spec = _write(spec_dir, '[study]\nmodel = "zoo:mlp"\nseeds = 1\n[train]\ndata = "imgs"\n'
                            '[arms.a]\nmethod = "none"\n[arms.b]\nmethod = "none"\ntrain = { data = "imgs/" }\n'
                            '[arms.c]\nmethod = "none"\ntrain = { data = "digits" }')
    monkeypatch.chdir(here)  # the spec is read from elsewhere: "imgs" is not in the cwd
    arms = load_spec(spec).arms
    assert arms["a"].train["data"] == str(spec_dir / "imgs")
    assert arms["b"].train["data"] == str(spec_dir / "imgs")
    assert arms["c"].train["data"] == "digits"  # a built-in set stays a name
    # not next to the spec but in the current directory: that folder, named absolutely in the key
    (spec_dir / "imgs").rename(here / "imgs")
    assert load_spec(spec).arms["a"].train["data"] == str(here / "imgs")
