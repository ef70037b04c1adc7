"""Topology schedules: budgets, exact zeros, topology changes, and the constructed cases of issue 3."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn as nn
from train_fixtures import INPUT, TinyNet, random_mask

from sparsify.errors import TrainingError
from sparsify.nn import SparseConv2d, SparseLinear, sparse_modules
from sparsify.passes.sparsity import runs_share_fan_in
from sparsify.train import TrainConfig, fit
from sparsify.train.data import load_dataset
from sparsify.train.distributed import Reducer
from sparsify.train.schedules import Plan, schedule_class
from sparsify.train.schedules.base import Change
from sparsify.train.schedules._topology import (block_parts, grow_largest, grow_random, prune_smallest, random_mask_like,
                                                 unit_size)
from sparsify.train.schedules.sparse_momentum import distribute
from sparsify.train.trainer import DenseGradTap, enforce_masks, make_optimizer


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", INPUT, num_classes=10, synthetic_size=(256, 64))


def _masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.mask.clone() for n, m in sparse_modules(model).items()}


def _live_weights(model: nn.Module) -> int:
    return sum(int(m.mask.sum()) * unit_size(m) for m in sparse_modules(model).values())


def _assert_exact_zeros(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    for n, m in sparse_modules(model).items():
        dead = m.weight_mask() == 0
        assert torch.all(m.weight[dead] == 0), n
        if optimizer is not None:
            for v in optimizer.state.get(m.weight, {}).values():
                if torch.is_tensor(v) and v.shape == m.weight.shape:
                    assert torch.all(v[dead] == 0), n


@pytest.mark.parametrize("schedule,kw", [
    ("static", {}),
    ("sparse-momentum", {}),
    ("rigl", {"update_every": 4}),
    ("set", {}),
    ("set", {"update_every": 5}),
])
def test_budgets_zeros_and_topology_change(schedule, kw, data):
    model = TinyNet(density=0.5)
    before = _masks(model)
    weights_before = _live_weights(model)
    cfg = TrainConfig(data="synthetic", schedule=schedule, epochs=3, batch_size=32, **kw)
    fit(model, data, cfg, model_input=INPUT)
    after = _masks(model)
    _assert_exact_zeros(model)
    changed = any(not torch.equal(before[n], after[n]) for n in before)
    assert changed == (schedule != "static")
    if schedule in ("static", "rigl", "set"):
        # Per-layer budgets are conserved exactly.
        for n in before:
            assert int(before[n].sum()) == int(after[n].sum()), n
    else:
        # Sparse momentum moves budget between layers but keeps the total weight count
        # (up to one conv connection of integer carry).
        assert abs(_live_weights(model) - weights_before) < 9
    for m in after.values():
        assert set(torch.unique(m).tolist()) <= {0.0, 1.0}


def test_optimizer_state_exactly_zero_after_topology_update(data):
    model = TinyNet(density=0.5)
    layers = sparse_modules(model)
    cfg = TrainConfig(data="synthetic", schedule="rigl", epochs=1, batch_size=32, update_every=2)
    plan = Plan(1, 8)
    sched = schedule_class("rigl")(layers, plan, cfg, Reducer())
    opt = make_optimizer(model, cfg)
    x, y = data.train.x[:32], data.train.y[:32]
    changed = False
    for step in range(6):
        tap = DenseGradTap(layers)
        with tap:
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        enforce_masks(layers, opt)
        change = sched.after_step(step + 1, tap.grads)
        if change is not None:
            changed = changed or bool(sum(change.pruned.values()))
            enforce_masks(layers, opt)
        _assert_exact_zeros(model, opt)
    assert changed
    # Momentum buffers exist and are non-zero somewhere, so the check above was not vacuous.
    assert any(float(opt.state[m.weight]["momentum_buffer"].abs().sum()) > 0 for m in layers.values())


def test_adam_state_exactly_zero(data):
    model = TinyNet(density=0.5)
    cfg = TrainConfig(data="synthetic", schedule="set", optimizer="adam", epochs=2, batch_size=32, update_every=3)
    fit(model, data, cfg, model_input=INPUT)
    _assert_exact_zeros(model)


def test_dense_grad_tap_equals_gradient_of_effective_weight():
    torch.manual_seed(0)
    lin = SparseLinear.from_dense(nn.Linear(6, 4), random_mask((4, 6), 0.5, 1))
    conv = SparseConv2d.from_dense(nn.Conv2d(3, 2, 3), random_mask((2, 3), 0.5, 2))
    x, xi = torch.randn(5, 6), torch.randn(2, 3, 5, 5)
    with DenseGradTap({"lin": lin, "conv": conv}) as tap:
        (lin(x).pow(2).sum() + conv(xi).pow(2).sum()).backward()
    # Reference: the same function with the effective weight as a leaf tensor.
    w_lin = lin.masked_weight().detach().requires_grad_()
    w_conv = conv.masked_weight().detach().requires_grad_()
    (nn.functional.linear(x, w_lin, lin.bias).pow(2).sum()
     + nn.functional.conv2d(xi, w_conv, conv.bias).pow(2).sum()).backward()
    torch.testing.assert_close(tap.grads["lin"], w_lin.grad)
    torch.testing.assert_close(tap.grads["conv"], w_conv.grad)
    assert float(tap.grads["lin"][lin.mask == 0].abs().sum()) > 0  # dense: non-zero where masked
    assert "masked_weight" not in lin.__dict__  # the tap is gone afterwards


class TwoLayers(nn.Module):
    """Two linear layers of equal shape, for constructed redistribution / growth cases."""

    def __init__(self) -> None:
        super().__init__()
        self.a = SparseLinear.from_dense(nn.Linear(10, 10), random_mask((10, 10), 0.3, 1))
        self.b = SparseLinear.from_dense(nn.Linear(10, 10), random_mask((10, 10), 0.3, 2))


def test_sparse_momentum_redistributes_toward_larger_momentum():
    model = TwoLayers()
    layers = sparse_modules(model)
    cfg = TrainConfig(schedule="sparse-momentum", epochs=4, prune_rate=0.5)
    sched = schedule_class("sparse-momentum")(layers, Plan(4, 10), cfg, Reducer())
    # Layer b's momentum is ten times layer a's everywhere.
    sched.after_step(1, {"a": torch.full((10, 10), 0.1), "b": torch.full((10, 10), 1.0)})
    live_a, live_b = int(layers["a"].mask.sum()), int(layers["b"].mask.sum())
    change = sched.after_epoch(1)
    assert int(layers["b"].mask.sum()) > live_b and int(layers["a"].mask.sum()) < live_a
    assert int(layers["a"].mask.sum() + layers["b"].mask.sum()) == live_a + live_b
    p = 0.5 * 0.5 * (1 + math.cos(math.pi / 4))
    assert change.pruned["a"] == round(p * live_a)
    # Regrowth share follows the momentum contribution: b gets 10/11 of the pruned total.
    total = change.pruned["a"] + change.pruned["b"]
    assert change.grown["b"] == pytest.approx(total * 10 / 11, abs=1)


def test_sparse_momentum_regrows_largest_momentum():
    model = TwoLayers()
    layers = sparse_modules(model)
    cfg = TrainConfig(schedule="sparse-momentum", epochs=4, prune_rate=0.5)
    sched = schedule_class("sparse-momentum")(layers, Plan(4, 10), cfg, Reducer())
    mom = {n: torch.zeros(10, 10) for n in layers}
    dead_a = (layers["a"].mask == 0).nonzero()
    hot = tuple(dead_a[3].tolist())
    mom["a"][hot] = 100.0
    mom["a"] += 1e-3 * (layers["a"].mask > 0)  # keep the mean over live weights positive
    mom["b"] += 1e-3 * (layers["b"].mask > 0)
    sched.after_step(1, mom)
    sched.after_epoch(1)
    assert layers["a"].mask[hot] == 1


def test_distribute_edge_case_overflow_goes_equally_to_others():
    # Layer 0 wants 90 of 100 weights but can take 10; the excess 80 goes to layers 1 and 2.
    alloc, left = distribute(100, [0.9, 0.05, 0.05], capacity=[10, 100, 100], quantum=[1, 1, 1])
    assert alloc == [10, 45, 45] and left == 0
    # Mixed quanta: a 3x3 conv connection costs 9 weights; the remainder is carried.
    alloc, left = distribute(50, [0.5, 0.5], capacity=[100, 100], quantum=[9, 1])
    assert alloc[0] * 9 + alloc[1] + left == 50 and left < 9


def test_sparse_momentum_prune_rate_capped_by_sparsity_for_dense_growing_layer(monkeypatch):
    import sparsify.train.schedules.sparse_momentum as sm

    asked: dict[int, int] = {}  # connections asked to prune, by mask (b regrows them in place: no net change)
    real = sm.prune_smallest

    def spy(mask: torch.Tensor, score: torch.Tensor, k: int, block: int = 1) -> int:
        asked[id(mask)] = k
        return real(mask, score, k, block)

    monkeypatch.setattr(sm, "prune_smallest", spy)
    model = TwoLayers()
    layers = sparse_modules(model)
    layers["b"].mask.fill_(1)
    layers["b"].mask[0, :2] = 0  # 98% dense
    cfg = TrainConfig(schedule="sparse-momentum", epochs=4, prune_rate=0.5)
    sched = schedule_class("sparse-momentum")(layers, Plan(4, 10), cfg, Reducer())
    sched.after_step(1, {"a": torch.full((10, 10), 0.01), "b": torch.full((10, 10), 1.0)})
    sched.after_epoch(1)
    assert asked[id(layers["b"].mask)] == round(0.02 * 98)  # p_b = min(p, sparsity_b) = 0.02


def test_rigl_grows_where_dense_gradient_is_largest():
    model = TwoLayers()
    layers = sparse_modules(model)
    cfg = TrainConfig(schedule="rigl", epochs=1, update_every=1, prune_rate=0.3)
    sched = schedule_class("rigl")(layers, Plan(1, 100), cfg, Reducer())
    grads = {n: torch.zeros(10, 10) for n in layers}
    targets = {}
    for n, m in layers.items():
        dead = (m.mask == 0).nonzero()
        targets[n] = [tuple(dead[i].tolist()) for i in (0, 5, 9)]
        for t in targets[n]:
            grads[n][t] = 5.0
    live = {n: int(m.mask.sum()) for n, m in layers.items()}
    assert sched.wants_dense_grad(0)
    change = sched.after_step(1, grads)
    for n, m in layers.items():
        assert int(m.mask.sum()) == live[n]
        k = round(sched.fraction(1) * live[n])
        # net moves: a pruned entry the (zero) gradient regrows in place did not move
        assert 0 < change.pruned[n] == change.grown[n] <= k
        if k >= 3:
            assert all(m.mask[t] == 1 for t in targets[n])


def test_rigl_stops_at_75_percent_and_decays():
    model = TwoLayers()
    cfg = TrainConfig(schedule="rigl", epochs=1, update_every=10)
    sched = schedule_class("rigl")(sparse_modules(model), Plan(1, 100), cfg, Reducer())
    due = [s + 1 for s in range(100) if sched.wants_dense_grad(s)]
    assert due == [10, 20, 30, 40, 50, 60, 70]
    assert sched.fraction(10) > sched.fraction(70) > 0


def test_rigl_default_interval_scales_down_to_short_runs():
    layers = sparse_modules(TwoLayers())
    short = schedule_class("rigl")(layers, Plan(3, 6), TrainConfig(schedule="rigl", epochs=3), Reducer())
    due = [s + 1 for s in range(18) if short.wants_dense_grad(s)]
    assert len(due) >= 10 and max(due) < 0.75 * 18 and short.notes() == []
    long = schedule_class("rigl")(layers, Plan(20, 500), TrainConfig(schedule="rigl", epochs=20), Reducer())
    assert long.every == 100 and long.notes() == []  # the paper's ΔT for long runs


def test_rigl_notes_a_run_with_few_or_no_updates(data):
    layers = sparse_modules(TwoLayers())
    cfg = TrainConfig(schedule="rigl", epochs=3, update_every=100)
    sched = schedule_class("rigl")(layers, Plan(3, 6), cfg, Reducer())
    assert [s for s in range(18) if sched.wants_dense_grad(s)] == []
    assert len(sched.notes()) == 1 and "no topology update" in sched.notes()[0]
    cfg = TrainConfig(data="synthetic", schedule="rigl", epochs=1, batch_size=32, update_every=3)
    r = fit(TinyNet(density=0.5), data, cfg, model_input=INPUT)  # 8 steps, stop at 6: one update (step 3)
    assert any("1 topology update" in w for w in r["warnings"]), r["warnings"]


@pytest.mark.parametrize("schedule,kw,made", [
    ("sparse-momentum", {"epochs": 1}, "no topology update"),
    ("sparse-momentum", {"epochs": 3}, "only 2 topology updates"),
    ("set", {"epochs": 1}, "no topology update"),
    ("set", {"epochs": 2, "update_every": 5}, "only 2 topology updates"),  # steps 5 and 10 of 12
])
def test_sparse_momentum_and_set_note_a_run_with_few_or_no_updates(schedule, kw, made):
    """They said nothing where RigL noted it: one epoch of sparse momentum is static training."""
    cfg = TrainConfig(schedule=schedule, **kw)
    sched = schedule_class(schedule)(sparse_modules(TwoLayers()), Plan(kw["epochs"], 6), cfg, Reducer())
    assert len(sched.notes()) == 1 and made in sched.notes()[0], sched.notes()
    assert schedule_class(schedule)(sparse_modules(TwoLayers()), Plan(10, 6), TrainConfig(schedule=schedule, epochs=10),
                                    Reducer()).notes() == []


@pytest.mark.parametrize("schedule", ["rigl", "set", "sparse-momentum"])
def test_a_schedule_that_moves_connections_refuses_a_run_at_density_1(schedule, data):
    """Every mask full: nothing to grow. It trained like static while logging thousands of moves."""
    model = TinyNet(density=0.5)
    for m in sparse_modules(model).values():
        m.mask.fill_(1)
    with pytest.raises(TrainingError, match=f"has all its connections .* so {schedule} has no missing connection"):
        fit(model, data, TrainConfig(data="synthetic", schedule=schedule, epochs=2, batch_size=32), model_input=INPUT)
    model = TinyNet(density=0.5)  # incremental starts sparser than the masks: density 1 is a target like any
    for m in sparse_modules(model).values():
        m.mask.fill_(1)
    fit(model, data, TrainConfig(data="synthetic", schedule="incremental", epochs=2, batch_size=32), model_input=INPUT)


def test_conv_topology_unit_is_whole_kernel_block(data):
    model = TinyNet(density=0.5)
    cfg = TrainConfig(data="synthetic", schedule="rigl", epochs=2, batch_size=32, update_every=3)
    fit(model, data, cfg, model_input=INPUT)
    conv = model.conv2
    w = conv.weight.detach()
    dead_blocks = conv.mask == 0
    assert torch.all(w[dead_blocks] == 0)
    # A live connection's kernel block is (generically) all non-zero: masks never cut inside a block.
    live_blocks = w[conv.mask > 0].flatten(1)
    assert float((live_blocks != 0).float().mean()) > 0.5


def test_incremental_doubles_on_time():
    model = TwoLayers()
    layers = sparse_modules(model)
    target = {n: int(m.mask.sum()) for n, m in layers.items()}  # 30 each
    cfg = TrainConfig(schedule="incremental", epochs=1, start_density=0.04, double_every=5)
    sched = schedule_class("incremental")(layers, Plan(1, 40), cfg, Reducer())
    sched.start()
    counts = [int(layers["a"].mask.sum())]
    for done in range(1, 41):
        before = {n: m.mask.clone() for n, m in layers.items()}
        sched.after_step(done, None)
        if done % 5:
            assert all(torch.equal(before[n], layers[n].mask) for n in layers)
        else:
            counts.append(int(layers["a"].mask.sum()))
            # Existing connections are kept.
            assert all(torch.all(layers[n].mask[before[n] > 0] == 1) for n in layers)
    assert counts[:5] == [4, 8, 16, 30, 30]
    assert int(layers["b"].mask.sum()) == target["b"]


def test_incremental_start_density_above_target_is_refused():
    model = TwoLayers()
    cfg = TrainConfig(schedule="incremental", epochs=1, start_density=0.5)
    with pytest.raises(TrainingError, match="start density"):
        schedule_class("incremental")(sparse_modules(model), Plan(1, 10), cfg, Reducer()).start()


@pytest.mark.parametrize("steps,kw,fix", [
    (39, {"double_every": 20}, "give sparsify train --double-every 12 or less"),  # 3 doublings (1/8 start)
    (3, {}, "start denser (sparsify train --start-density)"),  # the third would come at the last step
])
def test_incremental_refuses_a_run_too_short_to_reach_its_density(steps, kw, fix):
    """It ended at a quarter of the run's density, with only a note about moved weights."""
    cfg = TrainConfig(schedule="incremental", epochs=1, **kw)
    sched = schedule_class("incremental")(sparse_modules(TwoLayers()), Plan(1, steps), cfg, Reducer())
    with pytest.raises(TrainingError, match=f"needs 3 doublings.*this run trains {steps} steps.*{re.escape(fix)}"):
        sched.start()
    # with the advice taken, the last doubling has training after it
    cfg = TrainConfig(schedule="incremental", epochs=1, **({"double_every": 12} if kw else {}))
    schedule_class("incremental")(sparse_modules(TwoLayers()), Plan(1, steps + 1 if not kw else steps), cfg,
                                  Reducer()).start()


@pytest.mark.parametrize("block", [1, 4])
def test_incremental_resumes_from_half_densified_masks_and_ends_at_its_target(block):
    """A resumed run builds its schedule on the checkpoint's masks, sparser than the run's: that was
    read as the target and --start-density refused ("above layer c2's density")."""
    model = _blocked_net(block) if block > 1 else TinyNet(density=0.5)
    layers = sparse_modules(model)
    target = {n: m.mask.clone() for n, m in layers.items()}
    cfg = TrainConfig(schedule="incremental", epochs=1, start_density=0.04, double_every=4)  # conv2: 5 of 128 asked, 4 kept
    first = schedule_class("incremental")(layers, Plan(1, 40), cfg, Reducer())
    first.start()
    for done in range(1, 4):  # interrupted before the first doubling
        first.after_step(done, None)
    state = first.state_dict()
    assert any(int(m.mask.sum()) < int(target[n].sum()) for n, m in layers.items())  # half-way
    resumed = schedule_class("incremental")(layers, Plan(1, 40), cfg, Reducer())
    resumed.load_state_dict(state)
    for done in range(4, 41):
        resumed.after_step(done, None)
    assert all(torch.equal(m.mask, target[n]) for n, m in layers.items())  # exactly, blocks or not


def test_incremental_learns_from_a_sparse_start():
    digits = load_dataset("digits", INPUT)
    model = TinyNet(density=0.5)
    cfg = TrainConfig(data="digits", schedule="incremental", epochs=3, batch_size=16, start_density=0.04)
    result = fit(model, digits, cfg, model_input=INPUT)
    assert result["live"] == sum(int(m.sum()) for m in _masks(TinyNet(density=0.5)).values())
    assert result["test_acc"] > 0.6  # chance is 0.1


def test_rigl_erk_reallocation_keeps_weight_budget():
    model = TinyNet(density=0.5)
    layers = sparse_modules(model)
    before = {n: int(m.mask.sum()) for n, m in layers.items()}
    total = _live_weights(model)
    cfg = TrainConfig(schedule="rigl", epochs=1, init="erk")
    change = schedule_class("rigl")(layers, Plan(1, 10), cfg, Reducer()).start()
    assert change is not None and sum(change.grown.values()) > 0
    after = {n: int(m.mask.sum()) for n, m in layers.items()}
    assert after != before
    assert abs(_live_weights(model) - total) <= sum(unit_size(m) for m in layers.values())
    # ERK gives the small first conv a higher density than the wide linear layer.
    assert layers["conv1"].density > layers["fc1"].density


def test_rigl_psn_profile_initial_fan_in():
    model = TinyNet(density=0.5)
    layers = sparse_modules(model)
    before = {n: int(m.mask.sum()) for n, m in layers.items()}
    cfg = TrainConfig(schedule="rigl", epochs=1, init_profile="lognormal", init_profile_params={"sigma": 1.0})
    schedule_class("rigl")(layers, Plan(1, 10), cfg, Reducer()).start()
    assert {n: int(m.mask.sum()) for n, m in layers.items()} == before  # init=run keeps layer budgets
    fan_in = layers["fc1"].fan_in().double()
    assert float(fan_in.std() / fan_in.mean()) > 0.5  # heterogeneous, unlike the random start (~0.06)


def test_a_profile_that_cannot_give_every_unit_a_connection_names_the_layer_and_the_fix():
    """It read "a budget of 18 cannot be split over 32 units with fan-in in [1, 1]", nothing more."""
    model = TinyNet(density=0.5)
    with torch.no_grad():
        model.conv1.mask[:4] = 0  # one input channel: 4 connections for 8 output units
    cfg = TrainConfig(schedule="rigl", epochs=1, init_profile="uniform")
    sched = schedule_class("rigl")(sparse_modules(model), Plan(1, 10), cfg, Reducer())
    with pytest.raises(TrainingError, match="each of layer conv1's 8 output units at least one connection, but its "
                                            "budget is 4; use --init erk"):
        sched.start()


def _blocked_net(block: int) -> TinyNet:
    """TinyNet whose conv2 (16 output channels) shares fan-ins in runs of `block` (the last run
    shorter when block does not divide 16), as the transform's --block draws it."""
    model = TinyNet(density=0.5)
    conv = model.conv2
    rows = random_mask((-(-16 // block), 8), 0.5, 7).repeat_interleave(block, dim=0)[:16]
    with torch.no_grad():
        conv.mask.copy_(rows)
        conv.apply_mask_()
    conv.fan_in_block = block
    return model


def _runs_share(mask: torch.Tensor, block: int) -> bool:
    return runs_share_fan_in(mask.numpy(), block)


@pytest.mark.parametrize("block", [4, 3])
@pytest.mark.parametrize("schedule,kw", [
    ("sparse-momentum", {}),
    ("rigl", {"update_every": 4}),
    ("rigl", {"update_every": 4, "init": "uniform"}),
    ("rigl", {"update_every": 4, "init_profile": "lognormal", "init_profile_params": {"sigma": 1.0}}),
    ("set", {"update_every": 5}),
    ("incremental", {}),
])
def test_topology_updates_keep_shared_fan_in_blocks(schedule, kw, block, data):
    """A conv with fan_in_block B (block sparsity) is pruned, regrown, re-drawn and densified a
    block at a time: after training its runs of B output channels still share one fan-in, the
    topology did change, weights of dead entries are exactly zero, and static budgets (RigL, SET)
    stay within one block."""
    model = _blocked_net(block)
    before = model.conv2.mask.clone()
    weights_before = _live_weights(model)
    cfg = TrainConfig(data="synthetic", schedule=schedule, epochs=3, batch_size=32, **kw)
    fit(model, data, cfg, model_input=INPUT)
    after = model.conv2.mask
    if schedule == "sparse-momentum":
        # its budget is the weight count, blocks or not: a layer of blocks of B regrew 1/B of its
        # share (entries counted against a block's weights), so every epoch lost weights
        assert abs(_live_weights(model) - weights_before) <= 9 * block
    assert _runs_share(after, block)
    # incremental densifies back to the run's masks by the end
    assert torch.equal(before, after) == (schedule == "incremental")
    _assert_exact_zeros(model)
    if schedule == "set" or (schedule == "rigl" and "init" not in kw and "init_profile" not in kw):
        # exactly: the short last block (16 rows in blocks of 3) regrows in itself what it lost
        assert int(after.sum()) == int(before.sum())
    # a layer without blocks is still edited entry by entry (fc1: a SparseLinear)
    assert not _runs_share(model.fc1.mask, 4)


@pytest.mark.parametrize("rows", [30, 32, 3])
@pytest.mark.parametrize("regrow", ["largest", "random"])
def test_prune_and_regrow_conserve_a_layer_with_a_short_last_block(rows, regrow):
    """RigL's and SET's update, 200 times, on a mask of blocks of 4 rows whose last block has 2 (30
    rows), none (32) or is the only one (3): the live entries stay exactly as many, the runs of 4
    keep one fan-in, and the mask moves. Counting the short block's edits as whole blocks grew 162
    live entries of 540 to 494."""
    g = torch.Generator().manual_seed(0)
    mask = random_mask_like(torch.zeros(rows, 18), int(0.3 * rows * 18), g, block=4)
    start, first = int(mask.sum()), mask.clone()
    for _ in range(200):
        before = mask.clone()
        for part in block_parts(rows, 4):
            m = mask[part]
            pruned = prune_smallest(m, torch.rand(m.shape, generator=g), int(round(0.3 * float(m.sum()))), block=4)
            if regrow == "largest":
                grow_largest(m, torch.rand(m.shape, generator=g), pruned, block=4)
            else:
                grown = grow_random(m, pruned, g, within=(before[part] == 0).float(), block=4)
                grow_random(m, pruned - grown, g, block=4)
        assert int(mask.sum()) == start
    assert _runs_share(mask, 4) and not torch.equal(mask, first)


def test_a_change_counts_connections_that_moved_not_those_pruned_and_regrown_in_place():
    change = Change()
    before = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    change.record("c", before, torch.tensor([[1.0, 0.0, 1.0, 0.0]]))
    change.record("d", before, before.clone())
    assert change.pruned == {"c": 1, "d": 0} and change.grown == {"c": 1, "d": 0}


@pytest.mark.parametrize("block", [4, 3])
def test_incremental_start_keeps_shared_fan_in_blocks(block):
    """Incremental densification starts from a subset of whole blocks of the run's masks."""
    model = _blocked_net(block)
    layers = sparse_modules(model)
    target = model.conv2.mask.clone()
    cfg = TrainConfig(schedule="incremental", epochs=1)
    schedule_class("incremental")(layers, Plan(1, 10), cfg, Reducer()).start()
    start = model.conv2.mask
    assert _runs_share(start, block)
    assert 0 < int(start.sum()) < int(target.sum())
    assert bool((start <= target).all())
