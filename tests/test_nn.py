"""SparseConv2d / SparseLinear: exact zeros, same function as the dense equivalent, masked gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sparsify.nn import SparseConv2d, SparseLinear, sparse_modules


def _mask(shape, density=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(shape, generator=g) < density).float()
    m[0, 0] = 1.0
    m[-1, -1] = 0.0  # at least one live and one masked entry
    return m


CONV_CASES = [
    dict(in_channels=6, out_channels=8, kernel_size=3, padding=1),
    dict(in_channels=6, out_channels=4, kernel_size=(3, 1), stride=2, bias=False),
    dict(in_channels=6, out_channels=9, kernel_size=3, groups=3, dilation=2, padding=2),
]


def _conv(kw, seed=0):
    torch.manual_seed(seed)
    dense = nn.Conv2d(**kw)
    mask = _mask((dense.out_channels, dense.in_channels // dense.groups), seed=seed)
    return dense, SparseConv2d.from_dense(dense, mask), mask


def _linear(bias=True, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(12, 5, bias=bias)
    mask = _mask((5, 12), seed=seed)
    return dense, SparseLinear.from_dense(dense, mask), mask


@pytest.mark.parametrize("kw", CONV_CASES)
def test_conv_masked_weights_exactly_zero(kw):
    dense, sparse, mask = _conv(kw)
    assert sparse.mask.shape == (dense.out_channels, dense.in_channels // dense.groups)
    dead = mask == 0
    assert torch.all(sparse.weight[dead] == 0)  # whole kernel windows zero
    # live kernels keep the dense weights exactly (from_dense keeps weights)
    assert torch.equal(sparse.weight[~dead], dense.weight[~dead])
    if dense.bias is not None:
        assert torch.equal(sparse.bias, dense.bias)
    assert sparse.live_connections == int(mask.sum())
    assert sparse.density == pytest.approx(mask.mean().item())
    assert torch.equal(sparse.fan_in(), mask.sum(1))


def test_apply_mask_zeroes_weights_written_after_masking():
    _, sparse, mask = _conv(CONV_CASES[0])
    with torch.no_grad():
        sparse.weight.fill_(1.5)  # e.g. an optimiser step touched masked entries
    assert torch.all(sparse.weight != 0)
    sparse.apply_mask_()
    assert torch.all(sparse.weight[mask == 0] == 0)
    assert torch.all(sparse.weight[mask == 1] == 1.5)
    _, lin, lmask = _linear()
    with torch.no_grad():
        lin.weight.fill_(-2.0)
    lin.apply_mask_()
    assert torch.equal(lin.weight, -2.0 * lmask)


def test_forward_ignores_masked_weights_even_before_apply_mask():
    _, sparse, mask = _conv(CONV_CASES[0])
    x = torch.randn(2, 6, 7, 7)
    before = sparse(x)
    with torch.no_grad():
        sparse.weight[mask == 0] = 100.0
    assert torch.equal(sparse(x), before)


@pytest.mark.parametrize("kw", CONV_CASES)
def test_conv_forward_equals_to_dense_forward(kw):
    dense, sparse, mask = _conv(kw)
    x = torch.randn(2, kw["in_channels"], 9, 9)
    plain = sparse.to_dense()
    assert type(plain) is nn.Conv2d
    assert torch.allclose(sparse(x), plain(x), atol=1e-6, rtol=0)
    # and equals the original dense conv with masked kernels zeroed by hand
    w = dense.weight.detach() * mask[:, :, None, None]
    ref = torch.nn.functional.conv2d(x, w, dense.bias, dense.stride, dense.padding, dense.dilation, dense.groups)
    assert torch.allclose(sparse(x), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_equals_to_dense_forward(bias):
    dense, sparse, mask = _linear(bias)
    x = torch.randn(3, 12)
    plain = sparse.to_dense()
    assert type(plain) is nn.Linear
    assert torch.allclose(sparse(x), plain(x), atol=1e-6, rtol=0)
    ref = torch.nn.functional.linear(x, dense.weight.detach() * mask, dense.bias)
    assert torch.allclose(sparse(x), ref, atol=1e-6, rtol=0)
    assert torch.all(sparse.weight[mask == 0] == 0)
    assert torch.equal(sparse.weight[mask == 1], dense.weight[mask == 1])


def test_gradients_are_zero_at_masked_entries():
    _, conv, cmask = _conv(CONV_CASES[2])
    conv(torch.randn(2, 6, 9, 9)).square().sum().backward()
    assert torch.all(conv.weight.grad[cmask == 0] == 0)
    assert conv.weight.grad[cmask == 1].abs().sum() > 0
    assert conv.mask.grad is None and not conv.mask.requires_grad

    _, lin, lmask = _linear()
    lin(torch.randn(4, 12)).square().sum().backward()
    assert torch.all(lin.weight.grad[lmask == 0] == 0)
    assert lin.weight.grad[lmask == 1].abs().sum() > 0


def test_state_dict_contains_mask_and_round_trips():
    _, conv, cmask = _conv(CONV_CASES[0])
    _, lin, lmask = _linear()
    model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 12), nn.ReLU(), lin)
    state = model.state_dict()
    assert torch.equal(state["0.mask"], cmask) and torch.equal(state["5.mask"], lmask)
    assert "0.mask" not in dict(model.named_parameters())

    torch.manual_seed(123)
    fresh = nn.Sequential(SparseConv2d(6, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 12), nn.ReLU(), SparseLinear(12, 5))
    assert fresh[0].density == 1.0  # a new layer starts fully dense
    fresh.load_state_dict(state)
    x = torch.randn(2, 6, 5, 5)
    assert torch.equal(fresh(x), model(x))
    assert torch.equal(fresh[0].mask, cmask)


def test_from_dense_without_mask_is_dense_copy():
    torch.manual_seed(0)
    dense = nn.Conv2d(3, 4, 3)
    sparse = SparseConv2d.from_dense(dense)
    assert sparse.density == 1.0 and torch.equal(sparse.weight, dense.weight)
    x = torch.randn(1, 3, 6, 6)
    assert torch.allclose(sparse(x), dense(x), atol=1e-6, rtol=0)


def test_from_dense_does_not_alias_the_dense_layer():
    dense, sparse, _ = _linear()
    original = dense.weight.detach().clone()
    sparse.apply_mask_()
    with torch.no_grad():
        sparse.weight.add_(1.0)
    assert torch.equal(dense.weight, original)


def test_from_dense_refuses_non_zero_padding():
    with pytest.raises(ValueError):
        SparseConv2d.from_dense(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))


def test_sparse_modules_finds_masked_layers_in_order():
    _, conv, _ = _conv(CONV_CASES[0])
    _, lin, _ = _linear()
    model = nn.Sequential(nn.Linear(2, 2), conv, nn.Sequential(nn.ReLU(), lin))
    found = sparse_modules(model)
    assert list(found) == ["1", "2.1"]
    assert found["1"] is conv and found["2.1"] is lin
