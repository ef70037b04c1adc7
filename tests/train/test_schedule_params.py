"""Each schedule owns a parameters dataclass; TrainConfig holds the shared settings and one of them."""
from __future__ import annotations

import pytest

from sparsify.errors import UsageError
from sparsify.train import TrainConfig
from sparsify.train.schedules import SCHEDULES
from sparsify.train.schedules.incremental import IncrementalParams
from sparsify.train.schedules.rigl import RigLParams
from sparsify.train.schedules.set import SETParams
from sparsify.train.schedules.sparse_momentum import SparseMomentumParams

# the keys summary.json, metrics.jsonl and checkpoints have always recorded, in their order
# ("normalize" added later; a record without it reads as the default, True; "model_output" last:
# a record without it reads as None, detected, and a checkpoint without it resumes on logits)
RECORDED = ["data", "data_dir", "schedule", "epochs", "batch_size", "lr", "lr_schedule", "warmup_steps",
            "clip_grad_norm", "optimizer", "momentum", "weight_decay", "seed", "prune_rate", "update_every",
            "stop_fraction", "start_density", "double_every", "init", "init_profile", "init_profile_params",
            "val_fraction", "train_limit", "augment", "workers", "normalize", "model_output"]


def test_a_record_without_normalize_reads_as_normalised():
    old = {k: v for k, v in TrainConfig().to_dict().items() if k != "normalize"}
    assert TrainConfig.from_dict(old).normalize is True


def test_a_record_without_model_output_reads():
    old = {k: v for k, v in TrainConfig().to_dict().items() if k != "model_output"}
    assert TrainConfig.from_dict(old).model_output is None


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_record_keys_are_unchanged_for_every_schedule(schedule):
    cfg = TrainConfig(schedule=schedule)
    assert list(cfg.to_dict()) == RECORDED
    assert isinstance(cfg.params, SCHEDULES[schedule].Params)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_flat_settings_go_to_the_schedules_params():
    cfg = TrainConfig(schedule="rigl", prune_rate=0.2, update_every=7, init="erk")
    assert cfg.params == RigLParams(prune_rate=0.2, update_every=7, init="erk")
    assert not hasattr(cfg, "prune_rate")  # the shared config no longer carries schedule settings
    d = cfg.to_dict()
    assert (d["prune_rate"], d["update_every"], d["init"], d["start_density"]) == (0.2, 7, "erk", None)
    assert TrainConfig(schedule="rigl", params=RigLParams(prune_rate=0.2, update_every=7, init="erk")) == cfg
    assert TrainConfig(schedule="incremental", double_every=4).params == IncrementalParams(double_every=4)


@pytest.mark.parametrize("schedule,kw,owners", [
    ("set", {"stop_fraction": 0.5}, "rigl"),
    ("sparse-momentum", {"update_every": 3}, "rigl / set"),
    ("static", {"prune_rate": 0.4}, "sparse-momentum / rigl / set"),
    ("rigl", {"start_density": 0.05}, "incremental"),
    ("incremental", {"prune_rate": 0.2}, "sparse-momentum / rigl / set"),
    ("set", {"init": "erk"}, "rigl"),
    ("static", {"init_profile": "lognormal"}, "rigl"),
    ("incremental", {"init_profile_params": {"sigma": 1.0}}, "rigl"),
])
def test_a_setting_only_another_schedule_reads_is_refused(schedule, kw, owners):
    """It was accepted, ignored and recorded in summary.json as if applied."""
    name = next(iter(kw))
    flag = "--init-profile-param" if name == "init_profile_params" else f"--{name.replace('_', '-')}"  # the CLI's
    with pytest.raises(UsageError, match=f"^{flag} applies to --schedule {owners} only, not {schedule}; drop it"):
        TrainConfig(schedule=schedule, **kw).validate()
    default = TrainConfig().to_dict()[name]
    TrainConfig(schedule=schedule, **{name: default}).validate()  # the default is no setting


def test_a_profile_parameter_without_a_profile_is_refused():
    with pytest.raises(UsageError, match="--init-profile-param sets a parameter of --init-profile, which is not given"):
        TrainConfig(schedule="rigl", init_profile_params={"sigma": 1.0}).validate()
    TrainConfig(schedule="rigl", init_profile="lognormal", init_profile_params={"sigma": 1.0}).validate()


@pytest.mark.parametrize("params,flag", [
    (RigLParams(prune_rate=1.0), "--prune-rate"),
    (RigLParams(update_every=0), "--update-every"),
    (RigLParams(stop_fraction=0.0), "--stop-fraction"),
    (RigLParams(init="magic"), "--init"),
    (SETParams(prune_rate=0.0), "--prune-rate"),
    (SETParams(update_every=0), "--update-every"),
    (SparseMomentumParams(prune_rate=-0.1), "--prune-rate"),
    (IncrementalParams(start_density=1.5), "--start-density"),
    (IncrementalParams(double_every=0), "--double-every"),
])
def test_params_validate_themselves_naming_the_flag(params, flag):
    with pytest.raises(UsageError, match=flag) as e:
        params.validate()
    assert "\n" not in str(e.value)
    type(params)().validate()  # the defaults are valid


def test_params_of_the_wrong_schedule_are_refused():
    with pytest.raises(UsageError, match="takes RigLParams"):
        TrainConfig(schedule="rigl", params=SETParams())
    with pytest.raises(UsageError, match="not both"):
        TrainConfig(schedule="rigl", params=RigLParams(), init="erk")
