"""The trainer loop: determinism, bit-identical resume, NaN handling, metrics, configuration errors."""
from __future__ import annotations

import json

import pytest
import torch
from train_fixtures import INPUT, TinyNet

from sparsify.errors import SparsifyError, TrainingError, UsageError
from sparsify.train import TrainConfig, fit
from sparsify.train.checkpoint import load_checkpoint
from sparsify.train.data import load_dataset
from sparsify.train.trainer import lr_at


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", INPUT, num_classes=10, synthetic_size=(200, 40))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("schedule", ["sparse-momentum", "rigl", "set", "incremental"])
def test_resume_is_bit_identical_to_uninterrupted(schedule, data, tmp_path):
    kw = dict(data="synthetic", schedule=schedule, batch_size=32, seed=3,
              **({"update_every": 3} if schedule in ("rigl", "set") else {"double_every": 3} if schedule == "incremental"
                 else {}))
    full = TinyNet(density=0.5)
    r_full = fit(full, data, TrainConfig(epochs=2, **kw), model_input=INPUT, checkpoint=tmp_path / "a.pt")

    # One epoch, then a fresh process-like start: new model object, state from the checkpoint only.
    # The epoch count is part of the schedule's clock, so the interrupted run is configured for 2 epochs.
    part = TinyNet(density=0.5)
    cfg = TrainConfig(epochs=2, **kw)

    class Stop(Exception):
        pass

    def stop_after_first_epoch(event):
        if event["kind"] == "epoch" and event["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        fit(part, data, cfg, model_input=INPUT, checkpoint=tmp_path / "b.pt", progress=stop_after_first_epoch)
    state = load_checkpoint(tmp_path / "b.pt")
    assert state["epoch"] == 1
    torch.manual_seed(12345)  # disturb the global RNG: resume must restore it
    resumed = TinyNet(density=0.1, seed=9)  # different initial weights and masks: all come from the checkpoint
    r_res = fit(resumed, data, cfg, model_input=INPUT, checkpoint=tmp_path / "b.pt", resume_state=state)
    _assert_identical(_state(full), _state(resumed))
    a, b = load_checkpoint(tmp_path / "a.pt"), load_checkpoint(tmp_path / "b.pt")
    for k in a["optimizer"]["state"]:
        for name, v in a["optimizer"]["state"][k].items():
            assert torch.equal(v, b["optimizer"]["state"][k][name]), (k, name)
    assert r_full["test_loss"] == r_res["test_loss"]
    hist_a = [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in json.loads(a["history"])]
    hist_b = [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in json.loads(b["history"])]
    assert hist_a == hist_b


def test_same_seed_same_result_different_seed_differs(data):
    cfg = dict(data="synthetic", schedule="rigl", epochs=1, batch_size=32, update_every=2)
    a, b, c = TinyNet(0.5), TinyNet(0.5), TinyNet(0.5)
    fit(a, data, TrainConfig(seed=1, **cfg), model_input=INPUT)
    fit(b, data, TrainConfig(seed=1, **cfg), model_input=INPUT)
    fit(c, data, TrainConfig(seed=2, **cfg), model_input=INPUT)
    _assert_identical(_state(a), _state(b))
    assert not torch.equal(a.fc1.weight, c.fc1.weight)


class _BN1dNet(torch.nn.Module):
    """flatten - linear - BatchNorm1d - ReLU - linear: BN1d cannot normalise a training batch of one example."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.f = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16),
                                     torch.nn.ReLU(), torch.nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)


def test_batchnorm_trains_when_the_last_batch_has_one_example(data):
    cfg = TrainConfig(data="synthetic", schedule="static", epochs=2, batch_size=16, train_limit=33, seed=1)
    tiny = load_dataset("synthetic", INPUT, num_classes=10, synthetic_size=(200, 40), train_limit=33)
    a, b = _BN1dNet(), _BN1dNet()
    r = fit(a, tiny, cfg, model_input=INPUT)
    fit(b, tiny, cfg, model_input=INPUT)
    assert r["steps"] == 2 * 2  # 16 + 17 examples per epoch
    _assert_identical(_state(a), _state(b))


def test_batchnorm_with_one_training_example_is_one_error(data):
    one = load_dataset("synthetic", INPUT, num_classes=10, synthetic_size=(200, 40), train_limit=1)
    with pytest.raises(SparsifyError, match="BatchNorm") as e:
        fit(_BN1dNet(), one, TrainConfig(data="synthetic", schedule="static", epochs=1, train_limit=1),
            model_input=INPUT)
    assert "\n" not in str(e.value)


class _BN2dNet(torch.nn.Module):
    """conv - BatchNorm2d - ReLU - pool - linear: BatchNorm2d normalises over the pixels too."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.f = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                     torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)


def test_batch_size_1_trains_a_batchnorm_over_pixels_and_refuses_one_value_per_channel(data):
    # --batch-size 1 was refused for every model with a BatchNorm; plain PyTorch trains BatchNorm2d so
    tiny = load_dataset("synthetic", INPUT, num_classes=10, synthetic_size=(200, 40), train_limit=6)
    cfg = dict(data="synthetic", schedule="static", epochs=1, batch_size=1, train_limit=6)
    model = _BN2dNet()
    before = model.f[1].running_mean.clone()
    r = fit(model, tiny, TrainConfig(**cfg), model_input=INPUT)
    assert r["steps"] == 6 and not torch.equal(model.f[1].running_mean, before)
    with pytest.raises(SparsifyError, match="one value per channel .* --batch-size is 1") as e:
        fit(_BN1dNet(), tiny, TrainConfig(**cfg), model_input=INPUT)
    assert "\n" not in str(e.value)


def test_nan_loss_stops_and_keeps_last_checkpoint(data, tmp_path):
    model = TinyNet(0.5)
    ckpt = tmp_path / "last.pt"
    fit(model, data, TrainConfig(data="synthetic", epochs=1, batch_size=32), model_input=INPUT, checkpoint=ckpt)
    good = ckpt.read_bytes()
    with pytest.raises(TrainingError, match="diverged: loss became nan.*lower learning rate"):
        fit(model, data, TrainConfig(data="synthetic", epochs=2, batch_size=32, lr=1e30), model_input=INPUT,
            checkpoint=ckpt)
    assert ckpt.read_bytes() == good


def test_metrics_jsonl_records_topology(data, tmp_path):
    path = tmp_path / "metrics.jsonl"
    fit(TinyNet(0.5), data, TrainConfig(data="synthetic", schedule="set", epochs=2, batch_size=32),
        model_input=INPUT, metrics_path=path)
    lines = [json.loads(s) for s in path.read_text().splitlines()]
    assert [r["event"] for r in lines] == ["start", "epoch", "epoch", "test"]
    start, first = lines[0], lines[1]
    assert start["schedule"] == "set" and start["threads"] == torch.get_num_threads() and "torch" in start["versions"]
    assert start["layers"]["fc1"]["live"] == 32 * 256 // 2 and start["layers"]["fc2"]["dense"]  # TinyNet(0.5)
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "pruned", "grown", "epoch_time_s", "lr"):
        assert key in first
    fc1 = first["layers"]["fc1"]
    for key in ("density", "live", "fan_in_cv", "empty_out", "empty_in", "grad_concentration", "pruned", "grown"):
        assert key in fc1
    assert first["pruned"] > 0 and first["pruned"] == first["grown"]
    assert fc1["grad_concentration"] > 0
    assert 0 < fc1["density"] < 1


def test_lr_schedules():
    cfg = TrainConfig(lr=1.0, lr_schedule="cosine")
    assert lr_at(cfg, 0, 100) == 1.0 and lr_at(cfg, 50, 100) == pytest.approx(0.5)
    step = TrainConfig(lr=1.0, lr_schedule="step")
    assert [lr_at(step, s, 100) for s in (0, 49, 50, 75)] == pytest.approx([1, 1, 0.1, 0.01])


@pytest.mark.parametrize("kw,match", [
    ({"schedule": "nope"}, "unknown schedule"),
    ({"data": "imagenet"}, "unknown data set"),
    ({"epochs": 0}, "--epochs"),
    ({"prune_rate": 1.5}, "--prune-rate"),
    ({"init": "erk"}, "rigl only"),
    ({"val_fraction": 1.5}, "^val_fraction must be"),  # a study key: `sparsify train` has no --val-fraction
    ({"seed": 10**13}, r"--seed must be an integer in \[0, "),
    ({"data": ""}, "--data is empty"),  # read the current directory as an image folder
    ({"data": "imgz"}, r"unknown data set 'imgz' \(no folder /.*/imgz either\)"),  # an overflow traceback from the batch seeds
])
def test_bad_config_is_a_usage_error(kw, match):
    with pytest.raises(UsageError, match=match):
        TrainConfig(**kw).validate()


def test_unknown_option_is_refused():
    with pytest.raises(UsageError, match="unknown training option"):
        TrainConfig.from_dict({"epochz": 3})


def test_package_is_callable_as_the_api_function(monkeypatch):
    import sparsify
    import sparsify.train as train_pkg

    seen = {}
    monkeypatch.setattr(train_pkg, "train_run", lambda run_dir, **kw: seen.update(run_dir=run_dir, **kw) or {"ok": 1})
    assert sparsify.train("some/run", epochs=2) == {"ok": 1}
    assert seen == {"run_dir": "some/run", "epochs": 2}


def test_summary_validation_is_the_final_models_and_stale_statistics_do_not_warn(tmp_path):
    """Validation during training uses the running BatchNorm statistics; with momentum 1e-4 they
    hardly move from their start, so it sits at chance while the training batches (their own
    statistics) learn. That is no reason to lower the learning rate (no warning), and the summary's
    validation figures are those of the final model, whose statistics are re-estimated, like its
    test figures. (Momentum 0 would freeze them: kept, see test_frozen_batchnorm_statistics_are_kept.)"""
    digits = load_dataset("digits", (1, 1, 8, 8))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16, momentum=1e-4),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16 * 64, 10))
    with torch.no_grad():  # running statistics far from the batches': eval mode at chance until re-estimated
        model[1].running_mean.fill_(50.0)
    logs: list[str] = []
    res = fit(model, digits, TrainConfig(data="digits", epochs=3), model_input=(1, 1, 8, 8),
              metrics_path=tmp_path / "m.jsonl", log=logs.append)
    epochs = [json.loads(s) for s in (tmp_path / "m.jsonl").read_text().splitlines() if '"epoch"' in s]
    assert epochs[-1]["val_acc"] < 0.2 and epochs[-1]["train_acc"] > 0.8
    assert not any("at chance" in m for m in logs), logs
    assert res["val_acc"] > 0.8 and res["test_acc"] > 0.8


class _FrozenBNNet(torch.nn.Module):
    """bn0 frozen by momentum 0, bn3 held in eval mode by train() (mmdetection's norm_eval), bn1
    re-estimated, bn2 without running statistics."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.c0, self.bn0 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=0.0)
        self.c1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, track_running_stats=False)
        self.c3, self.bn3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)
        with torch.no_grad():  # statistics of an earlier training, far from what one epoch would estimate
            for bn in (self.bn0, self.bn3):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(2.0, 3.0)

    def train(self, mode: bool = True) -> "_FrozenBNNet":
        super().train(mode)
        self.bn3.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c, bn in ((self.c0, self.bn0), (self.c1, self.bn1), (self.c2, self.bn2), (self.c3, self.bn3)):
            x = torch.relu(bn(c(x)))
        return self.fc(x.mean((2, 3)))


def test_frozen_batchnorm_statistics_are_kept_by_the_end_of_training_re_estimation():
    """PyTorch never moves the statistics of a BatchNorm with momentum 0 (or one the model's train()
    holds in eval mode) in training; the re-estimation after the last epoch leaves them too, says
    so, and re-estimates the others. One without running statistics has none to change."""
    digits = load_dataset("digits", (1, 1, 8, 8))
    torch.manual_seed(0)
    model = _FrozenBNNet()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("bn0.running", "bn3.running"))}
    bn1_before = model.bn1.running_var.clone()
    logs: list[str] = []
    fit(model, digits, TrainConfig(data="digits", epochs=1, train_limit=300), model_input=(1, 1, 8, 8),
        log=logs.append)
    state = model.state_dict()
    for k, v in frozen.items():
        assert torch.equal(state[k], v), k
    assert not torch.equal(model.bn1.running_var, bn1_before)
    assert model.bn2.running_mean is None and "bn2.running_mean" not in state
    assert model.bn0.momentum == 0.0 and model.bn0.training and not model.bn3.training
    assert "re-estimated the BatchNorm statistics of the final weights (one pass over the training data)" in logs
    note = [m for m in logs if m.startswith("note: kept the running statistics")]
    assert note == ["note: kept the running statistics of 2 BatchNorm layers the model freezes (momentum 0: bn0; held in "
                    "eval mode: bn3) as they were, not re-estimated"], logs


class _ScoresNet(torch.nn.Module):
    """conv-BN-ReLU x2, global average pool, linear; ``end`` after it (a softmax, a log_softmax, nothing)."""

    def __init__(self, end: torch.nn.Module) -> None:
        super().__init__()
        nn = torch.nn
        self.c0, self.bn0 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c1, self.bn1 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)
        self.end = end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.c0(x)))
        x = torch.relu(self.bn1(self.c1(x)))
        return self.end(self.fc(x.mean((2, 3))))


def test_output_kind_tells_probabilities_and_log_probabilities_from_logits():
    from sparsify.train.trainer import output_kind

    z = torch.randn(32, 10) * 3
    assert output_kind(z) == "logits" and output_kind(z.abs()) == "logits"
    assert output_kind(z.softmax(1)) == "probabilities" and output_kind(z.log_softmax(1)) == "log-probabilities"
    assert output_kind(torch.ones(8, 1)) == "logits"  # one class: a softmax over it is 1 whatever it scores
    assert output_kind(torch.full((4, 2), float("nan"))) == "logits"


def test_a_model_returning_probabilities_trains_on_their_negative_log_likelihood(tmp_path):
    """Cross-entropy takes logits: on a softmax's probabilities it softmaxes again and hardly trains
    (18% test accuracy here). The trainer detects probabilities on the first batch, says so, trains
    and evaluates on -log p[label], and records it for --resume; the logits model learns the same."""
    from sparsify.train.run import _resume_config

    digits = load_dataset("digits", (1, 1, 8, 8))
    results, models, logs = {}, {}, []
    for name, end in (("softmax", torch.nn.Softmax(dim=1)), ("logits", torch.nn.Identity())):
        torch.manual_seed(0)
        models[name] = _ScoresNet(end)
        results[name] = fit(models[name], digits, TrainConfig(data="digits", epochs=10), model_input=(1, 1, 8, 8),
                            checkpoint=tmp_path / f"{name}.pt", log=logs.append)
    soft = results["softmax"]
    assert soft["test_acc"] > 0.8 and abs(soft["test_acc"] - results["logits"]["test_acc"]) < 0.02, results
    assert soft["config"]["model_output"] == "probabilities" and results["logits"]["config"]["model_output"] == "logits"
    assert sum("note: the model returns probabilities" in m and "-log p[label]" in m for m in logs) == 1, logs
    # the test loss is the negative log-likelihood of the final model's probabilities
    with torch.no_grad():
        p = models["softmax"].eval()(digits.test.x)
    nll = float(-p.gather(1, digits.test.y[:, None]).log().mean())
    assert abs(soft["test_loss"] - nll) < 1e-4, (soft["test_loss"], nll)
    # --resume trains on what the checkpoint trained on; one from before the setting trained on logits
    state = load_checkpoint(tmp_path / "softmax.pt")
    assert _resume_config(state, {}).model_output == "probabilities"
    old = json.loads(state["config"])
    del old["model_output"]
    assert _resume_config({**state, "config": json.dumps(old)}, {}).model_output == "logits"


def test_a_log_softmax_model_is_trained_with_cross_entropy_as_it_is():
    """log_softmax of a log_softmax is itself: cross-entropy on log-probabilities is already their
    negative log-likelihood, so nothing changes but the record."""
    digits = load_dataset("digits", (1, 1, 8, 8))
    torch.manual_seed(0)
    logs: list[str] = []
    res = fit(_ScoresNet(torch.nn.LogSoftmax(dim=1)), digits, TrainConfig(data="digits", epochs=3),
              model_input=(1, 1, 8, 8), log=logs.append)
    assert res["config"]["model_output"] == "log-probabilities" and res["test_acc"] > 0.4
    assert not any("probabilities" in m for m in logs), logs


def test_model_output_is_read_from_what_the_loss_sees_in_training_mode_and_changes_nothing():
    """A model that applies its softmax only in eval mode (for deployment) trains on logits; the
    detection's forward leaves the BatchNorm statistics, the mode and the global RNG as they were."""
    from sparsify.train.distributed import Reducer
    from sparsify.train.trainer import detect_model_output

    class EvalSoftmax(_ScoresNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = super().forward(x)
            return z if self.training else z.softmax(1)

    digits = load_dataset("digits", (1, 1, 8, 8))
    for model, want in ((EvalSoftmax(torch.nn.Identity()), "logits"),
                        (_ScoresNet(torch.nn.Softmax(dim=1)).eval(), "probabilities")):
        before, rng, mode = _state(model), torch.get_rng_state(), model.training
        assert detect_model_output(model, digits.train, 100, (1, 1, 8, 8), Reducer()) == want
        _assert_identical(_state(model), before)
        assert torch.equal(torch.get_rng_state(), rng) and model.training == mode


def test_a_sigmoid_head_is_trained_as_logits_with_a_note():
    # scores in [0, 1] that do not sum to 1 were taken as logits without a word (42% where the same
    # net returning logits reached 100%)
    from sparsify.train.distributed import Reducer
    from sparsify.train.trainer import detect_model_output

    digits = load_dataset("digits", (1, 1, 8, 8))
    for head, noted in ((torch.nn.Sigmoid(), True), (torch.nn.Identity(), False), (torch.nn.Softmax(dim=1), False)):
        notes: list[str] = []
        kind = detect_model_output(_ScoresNet(head), digits.train, 100, (1, 1, 8, 8), Reducer(), notes)
        assert kind == ("probabilities" if isinstance(head, torch.nn.Softmax) else "logits")
        assert bool(notes) == noted and (not noted or "drop the final sigmoid" in notes[0]), notes


class _SmallPositive(torch.nn.Module):
    """Logits all in [0, 0.2], as a freshly initialised head may give (no sigmoid)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.2 * torch.sigmoid(x - 100.0) + 0.01 * x.abs().clamp(max=1.0)


def test_small_positive_logits_are_not_taken_for_a_sigmoid_head():
    # "the model's class scores all lie in [0, 1] ... (a sigmoid at its end?)" for an ordinary net whose
    # untrained logits happened to be small and positive; a traced model is judged by its graph
    from sparsify.passes.trace import trace
    from sparsify.train.distributed import Reducer
    from sparsify.train.trainer import detect_model_output

    digits = load_dataset("digits", (1, 1, 8, 8))
    cases = ((_ScoresNet(_SmallPositive()), False), (trace(_ScoresNet(_SmallPositive())), False),
             (trace(_ScoresNet(torch.nn.Sigmoid())), True), (trace(_ScoresNet(torch.nn.Identity())), False))
    for model, noted in cases:
        notes: list[str] = []
        assert detect_model_output(model, digits.train, 100, (1, 1, 8, 8), Reducer(), notes) == "logits"
        assert bool(notes) == noted, (model, notes)


def test_a_resume_on_other_per_channel_statistics_names_them():
    # the refusal read "(x - mean[c]) / std[c] ... then, (x - mean[c]) / std[c] ... now": per channel
    # the formula is the same text, so the means are shown instead
    import json
    from types import SimpleNamespace

    from sparsify.errors import TrainingError
    from sparsify.train.data import input_normalization
    from sparsify.train.trainer import _check_same_data, data_identity

    def bundle(mean):
        norm = input_normalization(torch.tensor(mean), torch.ones(3), "pixels scaled to [0, 1]")
        return SimpleNamespace(name="imgs", train=[0] * 8, val=[0] * 2, test=[0] * 2, class_names=["a", "b"],
                               normalization=norm)

    state = {"data": json.dumps(data_identity(bundle([0.5, 0.4, 0.3])))}
    _check_same_data(state, bundle([0.5, 0.4, 0.3]))
    with pytest.raises(TrainingError) as e:
        _check_same_data(state, bundle([0.5, 0.4, 0.31]))
    assert "per-channel mean [0.5, 0.4, 0.3] then, per-channel mean [0.5, 0.4, 0.31] now" in str(e.value), str(e.value)


def test_the_result_gives_the_density_of_connections_and_of_weights(data):
    # a 3x3 conv's connection holds 9 weights, a linear's 1: sparse momentum moving connections
    # between them changed "density" (of connections: 0.25 -> 0.51 in a user's run) at the same
    # weight count, and nothing said so
    model = TinyNet(density=0.5)
    layers = [model.conv1, model.conv2, model.fc1]
    weights_before = sum(int(m.mask.sum()) * (m.weight.numel() // m.mask.numel()) for m in layers)
    r = fit(model, data, TrainConfig(data="synthetic", schedule="sparse-momentum", epochs=2, batch_size=32,
                                     seed=0), model_input=INPUT)
    live = {m: int(m.mask.sum()) for m in layers}
    assert r["density"] == pytest.approx(sum(live.values()) / sum(m.mask.numel() for m in layers))
    live_weights = sum(n * (m.weight.numel() // m.mask.numel()) for m, n in live.items())
    assert r["weight_density"] == pytest.approx(live_weights / sum(m.weight.numel() for m in layers))
    assert abs(live_weights - weights_before) <= 0.02 * weights_before   # the schedule's budget is weights
    assert 0 < r["weight_density"] < 1 and r["weight_density"] != pytest.approx(r["density"])
