"""Operations torch.onnx cannot express, rewritten before export to equal forms it can
(``lowering.OnnxFormsPass``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsify.passes.lowering import OnnxFormsPass, attention_as_4d
from sparsify.passes.trace import trace


def _qkv(*shape: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(*shape, generator=g) * 2 for _ in range(3))


@pytest.mark.parametrize("shape", [(2, 5, 8), (2, 3, 5, 8)])
@pytest.mark.parametrize("form", ["plain", "causal", "scale", "bool-mask-2d", "float-mask-3d-positional",
                                  "float-mask-3d-keyword"])
def test_attention_as_4d_equals_torch(shape, form) -> None:
    q, k, v = _qkv(*shape)
    n, length = shape[0], shape[-2]
    g = torch.Generator().manual_seed(1)
    args, kwargs = (), {}
    if form == "causal":
        kwargs = {"is_causal": True}
    elif form == "scale":
        kwargs = {"scale": 0.3}
    elif form == "bool-mask-2d":
        kwargs = {"attn_mask": torch.rand(length, length, generator=g) > 0.3}
        kwargs["attn_mask"].diagonal().fill_(True)
    else:
        mask = torch.randn(*shape[:-2], length, length, generator=g) * 3  # per sample: [N, L, S] or [N, H, L, S]
        args, kwargs = ((mask,), {}) if form.endswith("positional") else ((), {"attn_mask": mask})
    ref = F.scaled_dot_product_attention(q, k, v, *args, **kwargs)
    got = attention_as_4d(q, k, v, *args, **kwargs)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert ref.std() > 0.1  # the attention is not uniform: the mask and scale matter


class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 16, 3, padding=1)
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        t = self.c(x).flatten(2).transpose(1, 2)  # [N, T, C]
        return F.scaled_dot_product_attention(self.q(t), self.k(t), self.v(t), is_causal=True)


def test_the_pass_rewrites_3d_attention_and_keeps_the_output() -> None:
    torch.manual_seed(0)
    m = trace(_Tokens().eval())
    x = torch.randn(2, 3, 6, 6) * 2
    result = OnnxFormsPass()(m, x)
    assert result.report == ["scaled_dot_product_attention"]
    assert any(n.target is attention_as_4d for n in result.model.graph.nodes)
    assert not any(n.target is attention_as_4d for n in m.graph.nodes)  # the input is untouched
    with torch.no_grad():
        ref = m(x)
        torch.testing.assert_close(result.model(x), ref, rtol=1e-5, atol=1e-6)
    assert ref.std() > 0.1
