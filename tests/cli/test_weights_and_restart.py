"""Starting from a user's trained weights (--weights), and train --force restarting from the run's initial weights."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sparsify
from cli_checks import assert_ok, assert_one_error_line, invoke
from sparsify import zoo


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, torch.Tensor]:
    """A lenet5 whose weights differ from any seed's initialisation (scaled and shifted), BN-free."""
    torch.manual_seed(123)
    model = zoo.get("lenet5").build()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.7).add_(0.01)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _save(state: dict[str, torch.Tensor], how: str) -> Path:
    if how == "pt":
        torch.save(state, "w.pt")
        return Path("w.pt")
    if how == "checkpoint":
        torch.save({"epoch": 7, "model_state_dict": state, "optimizer": {"lr": 0.1}}, "ckpt.pth")
        return Path("ckpt.pth")
    if how == "dataparallel":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, "dp.pt")
        return Path("dp.pt")
    if how == "lightning":  # a LightningModule's checkpoint names its wrapped net `model`
        torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in state.items()}}, "last.ckpt")
        return Path("last.ckpt")
    save_file({k: v.contiguous() for k, v in state.items()}, "w.safetensors")
    return Path("w.safetensors")


@pytest.mark.parametrize("how", ["pt", "checkpoint", "dataparallel", "lightning", "safetensors"])
def test_transform_weights_masks_the_users_weights(trained, how):
    path = _save(trained, how)
    assert_ok(invoke("transform", "zoo:lenet5", "--density", "0.1", "--weights", path, "--out", "runs/w"))
    got = load_file("runs/w/weights.safetensors")
    masked = [k[: -len(".mask")] for k in got if k.endswith(".mask")]
    assert masked, sorted(got)
    for key, value in trained.items():
        if key.endswith(".weight") and key[: -len(".weight")] in masked:
            mask = got[key[: -len(".weight")] + ".mask"]
            expect = value * mask.reshape(mask.shape + (1,) * (value.dim() - mask.dim()))
            assert torch.equal(got[key], expect), key           # masked, not rescaled
        else:
            assert torch.equal(got[key], value), key            # everything else as trained
    recipe = json.loads(Path("runs/w/recipe.json").read_text())
    assert recipe["weights"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert recipe["weights"]["source"] == str(path.resolve()) and recipe["params"]["rescale_init"] is False
    init = load_file("runs/w/weights.init.safetensors")
    assert init.keys() == got.keys() and all(torch.equal(init[k], got[k]) for k in got)


def test_weights_replay_and_api(trained):
    path = _save(trained, "pt")
    result = sparsify.transform("zoo:lenet5", "none", weights=path)
    reference = zoo.get("lenet5").build()
    reference.load_state_dict(trained)
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(x)
    assert want.std() > 1e-3  # outputs depend on the input
    with torch.no_grad():
        rel = float((result.model(x) - want).abs().max() / want.abs().max())
        rel_replayed = float((sparsify.load(sparsify.transform_to_dir("zoo:lenet5", "none", weights=path,
                                                                      out="runs/api")[0]).model(x) - want).abs().max()
                             / want.abs().max())
    assert rel < 1e-6 and rel_replayed < 1e-6


BUFFER_IN_PYTHON = """
import torch, torch.nn as nn, torch.nn.functional as F

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 5)
        self.register_buffer("use_extra", torch.tensor(False))
        self.register_buffer("gain", torch.tensor(1.0))
        self.register_buffer("scale", torch.tensor(1.0))

    def forward(self, x):
        x = F.relu(self.c1(x)) * self.scale  # a tensor the new model holds...
        if self.use_extra:  # read in Python: tracing takes the branch its value picks
            x = x * float(self.gain)
        if self.scale > 1.5:  # ...read in Python too: the rebuilt run took the branch of its initial 1.0
            x = torch.sigmoid(x)
        return self.fc(x.mean((2, 3)))

def build_model():
    return Net()

INPUT_SHAPE = (1, 3, 8, 8)
"""


@pytest.mark.parametrize("method", ["none", "sparse-random"])
def test_trained_values_tracing_read_replay_with_the_run(method):
    # the run was rebuilt from the file by tracing the fresh model: its `use_extra` False and gain
    # 1.0, not the trained True and 2.5 (0.31 off the user's model, exit 0, export "verified")
    Path("net.py").write_text(BUFFER_IN_PYTHON)
    import importlib.util

    spec = importlib.util.spec_from_file_location("net_under_test", "net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    user = module.build_model().eval()
    with torch.no_grad():
        user.use_extra.fill_(True)
        user.gain.fill_(2.5)
        user.scale.fill_(2.0)
    torch.save(user.state_dict(), "w.pt")
    density = ["--density", "1.0"] if method != "none" else []
    assert_ok(invoke("transform", "net.py", "--method", method, *density, "--weights", "w.pt", "--out", "runs/b"))
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        want = user(x)
        got = sparsify.load("runs/b").model.eval()(x)
    assert want.std(0).mean() > 1e-3
    torch.testing.assert_close(got, want)


def test_weights_lacking_a_value_the_forward_reads_in_python_are_refused():
    """A weights file without `gain` (read by float()) or `use_extra` (an if) was taken with the
    note "lacks gain, which the forward never reads: it keeps the model's initial values", and the
    run computed another function than the user's model (exit 0)."""
    Path("net.py").write_text(BUFFER_IN_PYTHON)
    import importlib.util

    spec = importlib.util.spec_from_file_location("net_lacking", "net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    user = module.build_model()
    with torch.no_grad():
        user.use_extra.fill_(True)
        user.gain.fill_(2.5)
    for dropped in ("gain", "use_extra"):
        torch.save({k: v for k, v in user.state_dict().items() if k != dropped}, "w.pt")
        assert_one_error_line(invoke("transform", "net.py", "--method", "none", "--weights", "w.pt", "--out", "r"),
                              f"missing {dropped}, which the forward reads in Python", nothing_at=(Path("r"),))


def test_train_force_restarts_from_the_initial_weights():
    assert_ok(invoke("transform", "zoo:lenet5", "--density", "0.1", "--out", "runs/l"))
    initial = Path("runs/l/weights.safetensors").read_bytes()
    quick = ["--epochs", "1", "--train-limit", "200", "-q"]
    res = invoke("train", "runs/l", *quick)
    assert_ok(res)
    # the summary names both counts: channel pairs (what density counts) and the weights behind them
    live = sparsify.load("runs/l")
    assert "live connections" in res.output and "live params" in res.output
    assert f"{sparsify.nn.live_params(live.model):,}" in res.output
    # density and live connections cover the masked layers only, and the table says so (lenet5's
    # two linears stay dense: its density read 0.10 where the whole model's connectivity is higher)
    assert "density, live connections: the 3 masked layers; 2 conv / linear layers are dense" in res.output
    first = Path("runs/l/weights.safetensors").read_bytes()
    assert first != initial
    assert Path("runs/l/weights.init.safetensors").read_bytes() == initial
    assert_ok(invoke("train", "runs/l", *quick, "--force"))
    # from the same start with the same seed: the same result (it would differ from trained weights)
    assert Path("runs/l/weights.safetensors").read_bytes() == first
    assert_ok(invoke("train", "runs/l", "--epochs", "1", "--train-limit", "800", "-q", "--force", "--schedule", "rigl",
                     "--update-every", "2"))
    moved = load_file("runs/l/weights.safetensors")
    initial_masks = {k: v for k, v in load_file("runs/l/weights.init.safetensors").items() if k.endswith(".mask")}
    assert any(not torch.equal(moved[k], v) for k, v in initial_masks.items())   # RigL moved connections
    assert_ok(invoke("train", "runs/l", *quick, "--force"))       # and the masks come back from init as well
    assert Path("runs/l/weights.safetensors").read_bytes() == first


def test_old_run_without_initial_weights_still_trains_and_says_so():
    assert_ok(invoke("transform", "zoo:lenet5", "--density", "0.1", "--out", "runs/old"))
    Path("runs/old/weights.init.safetensors").unlink()
    quick = ["--epochs", "1", "--train-limit", "100"]
    assert_ok(invoke("train", "runs/old", *quick, "-q"))
    assert Path("runs/old/weights.init.safetensors").is_file()  # kept from now on (its weights before training)
    shutil.copy("runs/old/weights.safetensors", "trained.safetensors")
    Path("runs/old/weights.init.safetensors").unlink()
    r = invoke("train", "runs/old", *quick, "--force")
    assert_ok(r)
    assert "no weights.init.safetensors" in r.output


class _Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.fc = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.c1(x).mean((2, 3)))


class _Wrapper(torch.nn.Module):
    """An EMA-style wrapper: its own names start with `module.`."""

    def __init__(self):
        super().__init__()
        self.module = _Inner()

    def forward(self, x):
        return self.module(x)


class _Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("case", ["own-module-prefix", "dataparallel-of-it", "tied-safetensors"])
def test_weights_fit_a_model_named_module_and_tied_weights_saved_once(case):
    # `module.` was stripped even from a model whose own names carry it (missing module.c1.weight,
    # unexpected c1.weight), and safetensors' save_model writes tied weights once (missing b.weight)
    from safetensors.torch import save_model

    from sparsify.weights import apply_state_dict, read_state_dict

    torch.manual_seed(1)
    trained = _Tied() if case.startswith("tied") else _Wrapper()
    if case == "tied-safetensors":
        save_model(trained, "w.safetensors")
        path = "w.safetensors"
    else:
        state = trained.state_dict()
        torch.save({f"module.{k}": v for k, v in state.items()} if case == "dataparallel-of-it" else state, "w.pt")
        path = "w.pt"
    fresh = type(trained)()
    apply_state_dict(fresh, read_state_dict(path), path, "the model")
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in fresh.state_dict().items())
    if case.startswith("tied"):
        assert fresh.b.weight is fresh.a.weight  # still tied


OPTIONAL_HEAD = '''
import torch
import torch.nn as nn

INPUT_SHAPE = (1, 3, 12, 12)


class Net(nn.Module):
    def __init__(self, use_aux=False):
        super().__init__()
        self.use_aux = use_aux
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.aux, self.fc = nn.Linear(16, 5), nn.Linear(16, 5)  # aux: a head forward uses only with use_aux

    def forward(self, x):
        y = torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3))
        return self.fc(y) + self.aux(y) if self.use_aux else self.fc(y)
'''


def test_a_runs_weights_fit_its_model_though_they_lack_a_layer_forward_skips():
    # a run holds what its traced graph reads: transforming the model from a dense run's weights was
    # refused ("missing aux.weight, aux.bias; pass the same --model-args ..."), blaming the user
    Path("m.py").write_text(OPTIONAL_HEAD)
    assert_ok(invoke("transform", "m.py", "--method", "none", "--out", "dense"))
    r = invoke("transform", "m.py", "--weights", "dense/weights.safetensors", "--density", "0.3", "--out", "sr")
    assert_ok(r)
    assert "lacks aux.weight, aux.bias, which the forward never reads" in r.output
    trained = load_file("dense/weights.safetensors")
    masked = sparsify.load("sr").model.state_dict()["c2.weight"]
    assert torch.equal(masked, trained["c2.weight"] * (masked != 0)) and (masked != 0).any()
    # a forward that reads the layer still needs it
    r = invoke("transform", "m.py", "--weights", "dense/weights.safetensors", "--density", "0.3",
               "--model-args", '{"use_aux": true}', "--out", "aux")
    assert r.exit_code == 2 and "missing aux.weight, aux.bias" in r.output and not Path("aux").exists()


def test_training_from_trained_weights_says_its_inputs_are_standardised(trained):
    # Weights trained on pixels in [0, 1] lost 44 points of accuracy to the default standardisation,
    # without a word; `run` had no --no-normalize at all
    w = _save(trained, "pt")
    assert_ok(invoke("transform", "zoo:lenet5", "--method", "none", "--weights", str(w), "--out", "runs/w"))
    quick = ["--epochs", "1", "--train-limit", "200"]
    res = invoke("train", "runs/w", *quick)
    assert_ok(res)
    assert "starts from trained weights (w.pt)" in res.output and "pass --no-normalize" in res.output, res.output
    for given in ("--no-normalize", "--normalize"):  # the user chose: no note
        res = invoke("train", "runs/w", *quick, "--force", given)
        assert_ok(res)
        assert "starts from trained weights" not in res.output, res.output
    help_text = invoke("run", "--help").output
    assert "--no-normalize" in help_text and "--no-augment" in help_text


def test_a_runs_own_weights_start_a_new_transform_of_its_model(tmp_path):
    # they were refused with "unexpected a.mask ...; pass the same --model-args the weights were
    # trained with": the run's file holds each masked layer's mask beside its weight
    torch.manual_seed(0)
    model = str(Path(__file__).parents[2] / "examples" / "small_cnn.py")
    run, _ = sparsify.transform_to_dir(model, method="sparse-random", density=0.3, out=tmp_path / "run")
    sparse = sparsify.load(run).model.eval()
    with torch.no_grad():  # weights where a mask is 0 made nonzero: only the masked ones may count
        for m in sparse.modules():
            if hasattr(m, "mask"):
                m.weight.add_(1.0)
    save_file({k: v.contiguous() for k, v in sparse.state_dict().items()}, str(tmp_path / "w.safetensors"))
    again = sparsify.transform(model, "none", weights=tmp_path / "w.safetensors").model.eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        want, got = sparse(x), again(x)
    assert want.std() > 0.1 and torch.allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind, make", [
    ("sparse", lambda t: t.to_sparse()), ("sparse", lambda t: t.to_sparse_csr()), ("meta", lambda t: t.to("meta")),
    ("quantized", lambda t: torch.quantize_per_tensor(t, 0.01, 0, torch.qint8)),
])
def test_weights_of_tensor_kinds_the_loading_cannot_read_are_one_line(kind, make):
    """A sparse (COO, CSR), meta or quantized tensor in --weights ended in a 60-150-line traceback."""
    from sparsify.zoo import get

    state = dict(get("mlp").build().state_dict())
    key = next(k for k in state if k.endswith("weight"))
    state[key] = make(state[key])
    torch.save(state, "w.pt")
    assert_one_error_line(invoke("transform", "zoo:mlp", "--method", "none", "--weights", "w.pt", "--out", "r"),
                          f"holds a {kind}", key, nothing_at=(Path("r"),))


def test_weights_naming_a_run_directory_say_which_file_to_give():
    """--weights RUN said "--weights RUN not found" of a directory that is there."""
    assert_ok(invoke("transform", "zoo:mlp", "--density", "0.5", "--out", "src"))
    assert_one_error_line(invoke("transform", "zoo:mlp", "--method", "none", "--weights", "src", "--out", "r"),
                          "--weights src is a directory", "e.g. src/weights.safetensors", nothing_at=(Path("r"),))


def test_integer_weights_for_float_tensors_are_refused():
    """An int8 tensor (quantized values without their scale) for a float weight was cast as it is:
    the run's outputs 46x off the user's model, exit 0."""
    from sparsify.zoo import get

    state = dict(get("mlp").build().state_dict())
    key = next(k for k in state if k.endswith("weight"))
    state[key] = (state[key] * 100).to(torch.int8)
    torch.save(state, "w.pt")
    assert_one_error_line(invoke("transform", "zoo:mlp", "--method", "none", "--weights", "w.pt", "--out", "r"),
                          f"{key} is int8 in the file, float32 in the model", nothing_at=(Path("r"),))


def test_weights_files_are_read_by_their_content_and_named_for_what_they_are():
    """A safetensors file named .pt ("not a file torch.save wrote") and a torch.save file named
    .safetensors ("header too large") load; a TorchScript file says so (it was "pickled objects",
    after torch's warning on stderr); a state dict with an epoch beside it names the entry."""
    from safetensors.torch import save_file

    from sparsify.zoo import get

    model = get("mlp").build()
    state = model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, "st.pt")
    torch.save(state, "pt.safetensors")
    for name in ("st.pt", "pt.safetensors"):
        assert_ok(invoke("transform", "zoo:mlp", "--method", "none", "--weights", name, "--out", f"r-{name}"))
        got = sparsify.load(f"r-{name}").model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in state.items())
    torch.jit.save(torch.jit.trace(model.eval(), torch.randn(1, *get("mlp").input_shape[1:])), "ts.pt")
    r = invoke("transform", "zoo:mlp", "--method", "none", "--weights", "ts.pt", "--out", "r")
    assert_one_error_line(r, "is a TorchScript module (torch.jit.save)")
    torch.save({**state, "epoch": 5}, "mixed.pt")
    assert_one_error_line(invoke("transform", "zoo:mlp", "--method", "none", "--weights", "mixed.pt", "--out", "r"),
                          "a dict of tensors and epoch (not tensors)")


def test_weights_of_a_sparse_model_transformed_again_say_their_zeros_stay():
    """A sparse run's weights transformed again at density 0.5: 80% of a conv's weights were zero,
    inspect said 0.5, and nothing said why fewer weights are live."""
    from sparsify.api import transform, transform_to_dir

    run, _ = transform_to_dir("zoo:lenet5", density=0.2, out="sparse")
    notes = transform("zoo:lenet5", density=0.5, weights=run / "weights.safetensors").summary["notes"]
    assert any("mostly zero" in n and "fewer weights are live than the density says" in n for n in notes), notes
    dense = transform("zoo:lenet5", density=0.5, weights=_dense_weights()).summary["notes"]
    assert not any("mostly zero" in n for n in dense)


def _dense_weights() -> str:
    from sparsify.zoo import get

    torch.save(get("lenet5").build().state_dict(), "dense.pt")
    return "dense.pt"
