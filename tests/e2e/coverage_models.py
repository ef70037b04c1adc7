"""Small models, one per pattern that users of pruning and compression tools report as breaking
their tool (issue 9). Each builds with ``build(in_ch)`` and declares its input shape(s); written for
this project's tests, in the shape of the patterns, not copied from any case file.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act())


# ---------------------------------------------------------------- training-mode code


class DropoutZoo(nn.Module):
    """nn.Dropout, F.dropout / dropout2d / alpha_dropout with training=self.training, an
    ``if self.training`` noise branch."""

    def __init__(self, in_ch=3):
        super().__init__()
        self.a, self.b = cbr(in_ch, 16), cbr(16, 16)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.dropout2d(self.a(x), 0.1, self.training)
        if self.training:
            x = x + 0.05 * torch.randn_like(x)
        x = F.dropout(self.b(x), p=0.3, training=self.training)
        x = F.alpha_dropout(self.drop(x.mean((2, 3))), p=0.1, training=self.training)
        return self.fc(x)


class StochasticDepthNet(nn.Module):
    """MBConv-like blocks with squeeze-and-excitation, SiLU and inline stochastic depth."""

    def __init__(self, in_ch=3):
        super().__init__()
        self.stem = cbr(in_ch, 16, act=nn.SiLU)
        self.blocks = nn.ModuleList([self._block(16), self._block(16)])
        self.head = nn.Linear(16, 10)

    @staticmethod
    def _block(ch):
        return nn.ModuleDict({"expand": cbr(ch, ch * 4, 1, act=nn.SiLU),
                              "dw": cbr(ch * 4, ch * 4, 3, groups=ch * 4, act=nn.SiLU),
                              "se1": nn.Conv2d(ch * 4, ch // 4, 1), "se2": nn.Conv2d(ch // 4, ch * 4, 1),
                              "proj": nn.Sequential(nn.Conv2d(ch * 4, ch, 1, bias=False), nn.BatchNorm2d(ch))})

    def forward(self, x):
        x = self.stem(x)
        for i, b in enumerate(self.blocks):
            y = b["dw"](b["expand"](x))
            y = y * torch.sigmoid(b["se2"](F.silu(b["se1"](y.mean((2, 3), keepdim=True)))))
            y = b["proj"](y)
            if self.training:
                keep = torch.empty_like(y[:, :1, :1, :1]).bernoulli_(0.9)
                y = y * keep.div_(0.9)
            x = x + y
        return self.head(x.mean((2, 3)))


class AuxHeads(nn.Module):
    """GoogLeNet-style auxiliary classifier, evaluated (and returned) only in training."""

    def __init__(self, in_ch=3):
        super().__init__()
        self.a, self.b = cbr(in_ch, 16), cbr(16, 32, stride=2)
        self.aux = nn.Sequential(nn.AdaptiveAvgPool2d(2), cbr(16, 8, 1), nn.Flatten(), nn.Linear(32, 10))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.a(x)
        aux = self.aux(x) if self.training else None
        out = self.fc(self.b(x).mean((2, 3)))
        return (out, aux) if self.training else out


# ---------------------------------------------------------------- concat and repeated groups


class SPPFNet(nn.Module):
    def __init__(self, in_ch=3):
        super().__init__()
        self.stem = cbr(in_ch, 16)
        self.cv1 = cbr(16, 8, 1)
        self.m = nn.MaxPool2d(5, 1, 2)
        self.cv2 = cbr(32, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.cv1(self.stem(x))
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.fc(self.cv2(torch.cat([x, y1, y2, self.m(y2)], 1)).mean((2, 3)))


class SelfCatNet(nn.Module):
    def __init__(self, in_ch=3):
        super().__init__()
        self.stem = cbr(in_ch, 16)
        self.mix = cbr(48, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        return self.fc(self.mix(torch.cat([x, x, F.avg_pool2d(x, 3, 1, 1)], 1)).mean((2, 3)))


class DenseBlock(nn.Module):
    """DenseNet: every layer reads the concat of all earlier outputs."""

    def __init__(self, in_ch=3):
        super().__init__()
        self.stem = cbr(in_ch, 16)
        self.layers = nn.ModuleList([cbr(16 + 8 * i, 8) for i in range(3)])
        self.fc = nn.Linear(40, 10)

    def forward(self, x):
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        return self.fc(torch.cat(feats, 1).mean((2, 3)))


class UNet(nn.Module):
    """Encoder-decoder with interpolate and skip concats."""

    def __init__(self, in_ch=3):
        super().__init__()
        self.e1, self.e2 = cbr(in_ch, 16), cbr(16, 32, stride=2)
        self.d1 = cbr(48, 16)
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        a = self.e1(x)
        b = F.interpolate(self.e2(a), scale_factor=2, mode="bilinear", align_corners=False)
        return self.out(self.d1(torch.cat([a, b], 1)))


# ---------------------------------------------------------------- grouped and transposed convs


class ResNeXt(nn.Module):
    def __init__(self, in_ch=3):
        super().__init__()
        self.stem = cbr(in_ch, 32)
        self.a, self.b = cbr(32, 32, 1), cbr(32, 32, 3, groups=4)
        self.c = nn.Sequential(nn.Conv2d(32, 32, 1, bias=False), nn.BatchNorm2d(32))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.c(self.b(self.a(x))))
        return self.fc(x.mean((2, 3)))


class DepthwiseMultiplier(nn.Module):
    def __init__(self, in_ch=3):
        super().__init__()
        self.stem = cbr(in_ch, 16)
        self.dw = cbr(16, 32, 3, groups=16)
        self.pw = cbr(32, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.pw(self.dw(self.stem(x))).mean((2, 3)))


class Decoder(nn.Module):
    """conv -> ConvTranspose2d (stride 1, stride 2, grouped) -> conv."""

    def __init__(self, in_ch=3):
        super().__init__()
        self.c1 = cbr(in_ch, 16, stride=2)
        self.t1 = nn.ConvTranspose2d(16, 16, 3, padding=1)
        self.t2 = nn.ConvTranspose2d(16, 16, 4, stride=2, padding=1, groups=2)
        self.c2 = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x):
        x = self.c1(x)
        return self.c2(torch.relu(self.t2(torch.relu(self.t1(x)))))


class ShuffleBlock(nn.Module):
    """ShuffleNetV2: chunk, channel shuffle via view/transpose, concat (frozen where it must be)."""

    def __init__(self, in_ch=3):
        super().__init__()
        self.stem = cbr(in_ch, 16)
        self.branch = nn.Sequential(cbr(8, 8, 1), cbr(8, 8, 3, groups=8), cbr(8, 8, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(x.mean((2, 3)))


class RegNetBlock(nn.Module):
    """RegNetY: 1x1, 3x3 grouped conv with a fixed group width (8 channels per group), SE, 1x1,
    a strided residual with a projection shortcut."""

    def __init__(self, in_ch=3):
        super().__init__()
        self.stem = cbr(in_ch, 16, stride=1)
        self.a = cbr(16, 32, 1)
        self.b = cbr(32, 32, 3, stride=2, groups=32 // 8)
        self.se1, self.se2 = nn.Conv2d(32, 4, 1), nn.Conv2d(4, 32, 1)
        self.c = nn.Sequential(nn.Conv2d(32, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.proj = nn.Sequential(nn.Conv2d(16, 24, 1, stride=2, bias=False), nn.BatchNorm2d(24))
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.b(self.a(x))
        y = y * torch.sigmoid(self.se2(F.relu(self.se1(y.mean((2, 3), keepdim=True)))))
        return self.fc(F.relu(self.proj(x) + self.c(y)).mean((2, 3)))


class UnequalSplit(nn.Module):
    """torch.split with unequal sizes (Inception/GhostNet style): each part through its own conv,
    then concatenated; the split sizes are literals, so the split group must not be resized."""

    def __init__(self, in_ch=3):
        super().__init__()
        self.stem = cbr(in_ch, 24)
        self.p1, self.p2 = cbr(8, 8), cbr(16, 16, 1)
        self.mix = cbr(24, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        a, b = torch.split(self.stem(x), [8, 16], dim=1)
        return self.fc(self.mix(torch.cat([self.p1(a), self.p2(b)], 1)).mean((2, 3)))


class Slicing(nn.Module):
    """Channel slices with literal bounds (CSP / partial conv): x[:, :8] through a conv, x[:, 8:]
    passed on, joined again."""

    def __init__(self, in_ch=3):
        super().__init__()
        self.stem = cbr(in_ch, 16)
        self.part = cbr(8, 8)
        self.mix = cbr(16, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.part(x[:, :8]), x[:, 8:]], 1)
        return self.fc(self.mix(x).mean((2, 3)))


class LiteralView(nn.Module):
    """Sizes written as literals in view/reshape (classic CIFAR nets): x.view(-1, 16 * 4 * 4) before
    the classifier and a channel reshape x.view(n, 4, 4, h, w).sum(1) (grouped channel sum)."""

    def __init__(self, in_ch=3):
        super().__init__()
        self.a = cbr(in_ch, 16, stride=2)
        self.b = cbr(4, 16, stride=2)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.a(x)
        n, _, h, w = x.shape
        x = self.b(x.view(n, 4, 4, h, w).sum(1))
        return self.fc(F.relu(self.fc1(x.view(-1, 16 * 4 * 4))))


class PerChannel(nn.Module):
    """PReLU, a per-channel scale parameter broadcast as [C, 1, 1], a bias added as a [1, C, 1, 1]
    parameter, and interpolate to a skip (FPN top-down)."""

    def __init__(self, in_ch=3):
        super().__init__()
        self.c1, self.act1 = nn.Conv2d(in_ch, 16, 3, padding=1), nn.PReLU(16)
        self.c2 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 16).view(16, 1, 1))
        self.shift = nn.Parameter(torch.linspace(-0.1, 0.1, 16).view(1, 16, 1, 1))
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        a = self.act1(self.c1(x))
        b = self.c2(a) * self.scale + self.shift
        return self.out(a + F.interpolate(b, size=a.shape[-2:], mode="nearest"))


# ---------------------------------------------------------------- norms, tokens, 1-D


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, permute to channels-last, LayerNorm, MLP, layer scale, permute back."""

    def __init__(self, in_ch=3, dim=16):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, dim, 2, 2)
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1, self.pw2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))
        self.head_norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pw2(F.gelu(self.pw1(self.norm(y))))
        x = x + y.permute(0, 3, 1, 2)
        return self.fc(self.head_norm(x.mean((2, 3))))


class GroupNormNet(nn.Module):
    def __init__(self, in_ch=3):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(in_ch, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.c2, self.n2 = nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(8, 32)
        self.act = nn.PReLU(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.act(self.n2(self.c2(F.relu(self.n1(self.c1(x))))))
        return self.fc(x.mean((2, 3)))


class TokenNet(nn.Module):
    """ViT-style: patch conv, [N, T, C] tokens, class token concatenated along tokens, position
    embedding, LayerNorm, MLP, attention-free; head on the class token."""

    def __init__(self, in_ch=3, dim=16):
        super().__init__()
        self.patch = nn.Conv2d(in_ch, dim, 4, 4)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        t = t + self.mlp(self.norm(t))
        return self.head(t[:, 0])


class Attention(nn.Module):
    """Chunked qkv self-attention over tokens (frozen where it must be)."""

    def __init__(self, in_ch=3, dim=16):
        super().__init__()
        self.patch = nn.Conv2d(in_ch, dim, 4, 4)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(1, 2) / 4.0, dim=-1)
        return self.head(self.proj(a @ v).mean(1))


class Signal1d(nn.Module):
    """Conv1d + BatchNorm1d + pooling + flatten + Linear + BatchNorm1d on features."""

    def __init__(self, in_ch=1):
        super().__init__()
        self.c1, self.b1 = nn.Conv1d(in_ch, 16, 5, padding=2), nn.BatchNorm1d(16)
        self.c2 = nn.Conv1d(16, 16, 3, padding=1, groups=4)
        self.c3 = nn.Conv1d(16, 8, 3, padding=1)
        self.fc1, self.bn = nn.Linear(8 * 16, 32), nn.BatchNorm1d(32)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        x = F.max_pool1d(F.relu(self.b1(self.c1(x))), 2)
        x = F.max_pool1d(F.relu(self.c2(x)), 2)
        x = F.relu(self.c3(x))
        return self.fc(F.relu(self.bn(self.fc1(torch.flatten(x, 1)))))


# ---------------------------------------------------------------- sharing, unpooling, outputs, inputs


class SharedFrozen(nn.Module):
    """One conv applied to the input and to a computed 3-channel map: both groups are tied."""

    def __init__(self, in_ch=3):
        super().__init__()
        self.coarse = nn.Sequential(nn.Conv2d(in_ch, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, in_ch, 3, padding=1))
        self.embed = nn.Conv2d(in_ch, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        y = torch.relu(self.embed(x)) + torch.relu(self.embed(self.coarse(x)))
        return self.fc(y.mean((2, 3)))


class Unpool(nn.Module):
    """SegNet: max-pool with indices, MaxUnpool2d with them; expand_as of a gate."""

    def __init__(self, in_ch=3):
        super().__init__()
        self.e = cbr(in_ch, 16)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.mid = cbr(16, 16)
        self.unpool = nn.MaxUnpool2d(2)
        self.gate = nn.Conv2d(16, 16, 1)
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        x = self.e(x)
        y, idx = self.pool(x)
        y = self.unpool(self.mid(y), idx)
        g = torch.sigmoid(self.gate(y.mean((2, 3), keepdim=True))).expand_as(y)
        return self.out(y * g + x)


class DictOut(nn.Module):
    def __init__(self, in_ch=3):
        super().__init__()
        self.a, self.b = cbr(in_ch, 16), cbr(16, 32, stride=2)
        self.emb = nn.Linear(32, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        e = self.emb(self.b(self.a(x)).mean((2, 3)))
        return {"logits": self.fc(torch.relu(e)), "embedding": e}


class NestedOut(nn.Module):
    def __init__(self, in_ch=3):
        super().__init__()
        self.a, self.b = cbr(in_ch, 16), cbr(16, 16, stride=2)
        self.c1, self.c2 = nn.Conv2d(16, 4, 1), nn.Conv2d(16, 2, 1)

    def forward(self, x):
        f1 = self.a(x)
        f2 = self.b(f1)
        return f2.mean((2, 3)), (self.c1(f1), {"mask": self.c2(f2)})


class TwoInputs(nn.Module):
    def __init__(self, in_ch=3):
        super().__init__()
        self.a, self.b = cbr(in_ch, 16), cbr(1, 16)
        self.fuse = cbr(32, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x, depth):
        return self.fc(self.fuse(torch.cat([self.a(x), self.b(depth)], 1)).mean((2, 3)))


class TinyOutputs(nn.Module):
    """An untrained deep SE net whose output shrinks to ~1e-10: compaction's certificate must judge
    each node where values are not tiny (issue 9, item 10)."""

    def __init__(self, in_ch=3):
        super().__init__()
        layers = [cbr(in_ch, 16, act=nn.SiLU)]
        for _ in range(6):
            layers += [cbr(16, 16, act=nn.SiLU)]
        self.body = nn.Sequential(*layers)
        self.se1, self.se2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.fill_(0.02)
            self.fc.bias.zero_()

    def forward(self, x):
        x = self.body(x)
        x = x * torch.sigmoid(self.se2(F.silu(self.se1(x.mean((2, 3), keepdim=True)))))
        return self.fc(x.mean((2, 3)))


class ItemAssign(nn.Module):
    """Item assignment: a conv's output written into channels of another (``x[:, :8] = y``), values
    clamped through a boolean mask, and a YOLO-style head that decodes boxes in eval by assigning
    into slices of its reshaped output."""

    def __init__(self, in_ch=3):
        super().__init__()
        self.stem = cbr(in_ch, 16)
        self.part = nn.Conv2d(16, 8, 3, padding=1)
        self.mix = cbr(16, 16)
        self.det = nn.Conv2d(16, 2 * 6, 1)
        self.register_buffer("grid", torch.linspace(-1, 1, 16))

    def forward(self, x):
        x = self.stem(x)
        y = self.part(x)
        x = x.clone()
        x[:, :8] = y
        x[x > 3] = 3.0
        d = self.det(self.mix(x))
        n, _, h, w = d.shape
        d = d.view(n, 2, 6, h, w).permute(0, 1, 3, 4, 2).contiguous()
        if not self.training:
            d = d.sigmoid()
            d[..., 0:2] = d[..., 0:2] * 2 + self.grid[:w, None]
            d[..., 4] *= 3
        return d


class ChannelPool(nn.Module):
    """Pooling and resampling along the channel axis moved by ``unsqueeze(1)``: an average pool of
    channel pairs (its output resizes with its input), a max pool of channel pairs as a module, and
    an interpolation from 12 to a given 16 channels (its input resizes, its output keeps 16)."""

    def __init__(self, in_ch=3):
        super().__init__()
        self.stem, self.a = cbr(in_ch, 32), cbr(32, 32)
        self.pair = nn.MaxPool3d((2, 1, 1))
        self.b, self.c = cbr(16, 24), cbr(16, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = self.a(self.stem(x))
        z = F.avg_pool3d(y.unsqueeze(1), (2, 1, 1)).squeeze(1)
        z = self.b(z)
        z = self.pair(z.unsqueeze(1)).squeeze(1)
        n, _, h, w = z.shape
        z = F.interpolate(z.unsqueeze(1), size=(16, h, w), mode="nearest").squeeze(1)
        return self.fc(self.c(z).mean((2, 3)))


class SpatialLinear(nn.Module):
    """MLP-Mixer style: a Linear over W of a strided conv's NCHW output, residual (its features are
    the spatial axis, never resized), and a token-mixing Linear over the flattened H*W."""

    def __init__(self, in_ch=3):
        super().__init__()
        self.stem = cbr(in_ch, 16, stride=2)
        self.lw = nn.Linear(8, 8)
        self.mid = cbr(16, 32, stride=2)
        self.tok = nn.Linear(16, 16)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.lw(x)
        t = self.mid(x).flatten(2)
        t = t + self.tok(t)
        return self.fc(t.mean(2))


class ZeroPadShortcut(nn.Module):
    """A shortcut zero-padded to the block's width with a size computed from a literal and a shape
    (``new_zeros(n, 32 - c, h, w)``, PyramidNet style): the padded group and the block's output
    keep their channels, the block's inner conv stays resizable."""

    def __init__(self, in_ch=3):
        super().__init__()
        self.stem = cbr(in_ch, 16)
        self.a = nn.Sequential(cbr(16, 24), cbr(24, 32))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        n, c, h, w = x.shape
        y = self.a(x) + torch.cat([x, x.new_zeros(n, 32 - c, h, w)], 1)
        return self.fc(y.mean((2, 3)))


class ViewWrite(nn.Module):
    """Augmented assignments into views of an activation (``v = x[:, :8]; v += y``, a narrowed part
    scaled in place): they write into the activation (made out of place, the write was lost)."""

    def __init__(self, in_ch=3):
        super().__init__()
        self.stem = cbr(in_ch, 16)
        self.part = nn.Conv2d(16, 8, 3, padding=1)
        self.mix = cbr(16, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        v = x[:, :8]
        v += self.part(x)
        w = x.narrow(1, 8, 8)
        w *= 0.5
        return self.fc(self.mix(x).mean((2, 3)))


# name -> (class, input shape(s))
MODELS = {
    "dropout": (DropoutZoo, (1, 3, 16, 16)),
    "stochastic_depth": (StochasticDepthNet, (1, 3, 16, 16)),
    "aux_heads": (AuxHeads, (1, 3, 16, 16)),
    "sppf": (SPPFNet, (1, 3, 16, 16)),
    "self_cat": (SelfCatNet, (1, 3, 16, 16)),
    "dense_block": (DenseBlock, (1, 3, 16, 16)),
    "unet": (UNet, (1, 3, 16, 16)),
    "resnext": (ResNeXt, (1, 3, 16, 16)),
    "dw_multiplier": (DepthwiseMultiplier, (1, 3, 16, 16)),
    "decoder": (Decoder, (1, 3, 16, 16)),
    "shuffle": (ShuffleBlock, (1, 3, 16, 16)),
    "regnet": (RegNetBlock, (1, 3, 16, 16)),
    "unequal_split": (UnequalSplit, (1, 3, 16, 16)),
    "slicing": (Slicing, (1, 3, 16, 16)),
    "literal_view": (LiteralView, (1, 3, 16, 16)),
    "per_channel": (PerChannel, (1, 3, 16, 16)),
    "convnext": (ConvNeXtBlock, (1, 3, 16, 16)),
    "group_norm": (GroupNormNet, (1, 3, 16, 16)),
    "tokens": (TokenNet, (1, 3, 16, 16)),
    "attention": (Attention, (1, 3, 16, 16)),
    "signal_1d": (Signal1d, (1, 1, 64)),
    "shared_frozen": (SharedFrozen, (1, 3, 16, 16)),
    "unpool": (Unpool, (1, 3, 16, 16)),
    "dict_out": (DictOut, (1, 3, 16, 16)),
    "nested_out": (NestedOut, (1, 3, 16, 16)),
    "two_inputs": (TwoInputs, [(1, 3, 16, 16), (1, 1, 16, 16)]),
    "tiny_outputs": (TinyOutputs, (1, 3, 16, 16)),
    "item_assign": (ItemAssign, (1, 3, 16, 16)),
    "view_write": (ViewWrite, (1, 3, 16, 16)),
    "channel_pool": (ChannelPool, (1, 3, 16, 16)),
    "spatial_linear": (SpatialLinear, (1, 3, 16, 16)),
    "zero_pad_shortcut": (ZeroPadShortcut, (1, 3, 16, 16)),
}


def model_file(name: str, in_ch: int | None = None) -> str:
    """The source of a model file for ``name`` (this module's classes, imported by path)."""
    cls, shape = MODELS[name]
    shapes = shape if isinstance(shape[0], (tuple, list)) else [shape]
    if in_ch is not None:
        shapes = [(s[0], in_ch) + tuple(s[2:]) if i == 0 else s for i, s in enumerate(shapes)]
    here = __file__
    arg = "" if in_ch is None else f"in_ch={in_ch}"
    return (f"import importlib.util\n"
            f"_spec = importlib.util.spec_from_file_location('coverage_models', {here!r})\n"
            f"_m = importlib.util.module_from_spec(_spec)\n_spec.loader.exec_module(_m)\n"
            f"INPUT_SHAPES = {[tuple(s) for s in shapes]!r}\n\n\n"
            f"def build_model():\n    return _m.{cls.__name__}({arg})\n")


__all__ = ["MODELS", "model_file"]
