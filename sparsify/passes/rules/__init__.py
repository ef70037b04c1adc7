"""The op rules and the default registry (see ``base`` for the contract).

``DEFAULT_RULES`` knows PyTorch's layers and ops listed below; ``with_user_rules`` overlays rules a
user gives for their own (leaf) module types, by type or type name, as a Rule object or as the
name of a leaf rule: ``"conv"``, ``"linear"`` (the leaf's forward computes that layer over its own
``weight``), ``"elementwise"`` (channel c out depends on channel c in only), ``"frozen"``.

A rule of one's own subclasses ``Rule`` (ops without parameters) or ``LayerRule`` (modules with
parameters) and implements ``couple`` with the ChannelGraph's construction API (``space``,
``tie``, ``tie_axes``, ``module_space``, ``member``, ``derive``, ``freeze``, ``whole``,
``multiple_of``) and, as it applies, ``constancy``, ``slice``, ``resize``, ``sparse`` /
``make_sparse`` and ``describe``; see ``ChannelwiseRule`` for a per-channel module and
tests/passes/test_leaf.py for a complete example.
"""
from __future__ import annotations

import operator
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import UsageError
from .base import Const, ConstancyEnv, LayerRule, Member, Registry, Role, Rule, SizeExpr, SparseLayout, type_names
from .layers import (
    BatchNormRule, ChannelwiseRule, ConvLeafRule, ConvRule, ConvTransposeRule, FunctionalConvRule,
    FunctionalLinearRule, FunctionalNormRule, GroupNormRule, LayerNormRule, LinearLeafRule, LinearRule,
    PReLURule, arg, effective_weight, set_tensor, slice_tensors, zero_padded,
)
from .ops import (
    AlongDimRule, BroadcastRule, CastLikeRule, CatRule, ChannelKeepingRule, ConstantLikeRule, CreationRule,
    DropoutRule, ElementwiseRule, ExpandRule, FlattenRule, GetitemRule, ItemAssignRule, NeutralRule, PermuteRule,
    RandomLikeRule, ReduceRule, RepeatRule, ReshapeRule, SplitRule, SqueezeRule, StackRule, StochasticDepthRule,
    UnknownRule,
)

__all__ = ["Const", "ConstancyEnv", "LayerRule", "Member", "Registry", "Role", "Rule", "SizeExpr", "SparseLayout",
           "ChannelwiseRule", "ConvRule", "LinearRule", "ElementwiseRule",
           "DEFAULT_RULES", "LEAF_RULES", "with_user_rules", "known_base", "leaf_rule_name", "rule_names",
           "arg", "effective_weight", "set_tensor", "slice_tensors", "zero_padded"]


def _default() -> Registry:
    r = Registry()
    # -- layers --
    from ...nn import SparseConv1d, SparseConv2d, SparseLinear

    r.module((nn.Conv1d, nn.Conv2d, nn.Conv3d, SparseConv1d, SparseConv2d), ConvRule())
    r.module((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), ConvTransposeRule())
    r.module((nn.Linear, SparseLinear), LinearRule())
    r.module((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm), BatchNormRule())
    r.module((nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d), BatchNormRule())
    r.module(nn.GroupNorm, GroupNormRule())
    r.module(nn.LayerNorm, LayerNormRule())
    r.module(nn.PReLU, PReLURule())
    r.function((F.conv1d, F.conv2d, F.conv3d), FunctionalConvRule())
    r.function((F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d), FunctionalConvRule(transposed=True))
    r.function((F.linear,), FunctionalLinearRule())
    for kind, fns in (("batch_norm", (F.batch_norm,)), ("instance_norm", (F.instance_norm,)),
                      ("layer_norm", (F.layer_norm,)), ("group_norm", (F.group_norm,))):
        r.function(fns, FunctionalNormRule(kind))

    # -- elementwise --
    elementwise = ElementwiseRule()
    r.module((nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
              nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Softsign, nn.Tanhshrink,
              nn.Hardshrink, nn.Softshrink, nn.LogSigmoid, nn.Threshold, nn.Identity), elementwise)
    r.function((F.relu, F.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.elu, F.elu_, F.celu, F.selu, F.gelu,
                F.silu, F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid, F.hardtanh, F.hardtanh_, F.mish,
                F.softplus, F.softsign, F.tanhshrink, F.hardshrink, F.softshrink, F.logsigmoid, F.threshold,
                torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.clamp, torch.clip, torch.abs, torch.neg,
                torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.square, torch.sign, torch.erf, torch.sin,
                torch.cos, torch.reciprocal, torch.nan_to_num, torch.clamp_min, torch.clamp_max, torch.floor,
                torch.ceil, torch.round), elementwise)
    r.method(("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clip_",
              "clamp_min", "clamp_max", "abs", "neg", "exp", "log", "sqrt", "rsqrt", "square", "sign", "erf",
              "reciprocal", "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "type",
              "cpu", "cuda", "requires_grad_", "nan_to_num", "floor", "ceil", "round", "sin", "cos"), elementwise)
    r.method(CastLikeRule.methods, CastLikeRule())
    from ..trace import stop_gradient

    r.function((stop_gradient,), elementwise)
    # dropout: the identity in eval, random in training (functional defaults differ)
    r.module((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout),
             DropoutRule())
    r.function((F.dropout, F.dropout1d, F.dropout2d, F.dropout3d), DropoutRule(2, "training", True))
    r.function((F.alpha_dropout, F.feature_alpha_dropout), DropoutRule(2, "training", False))
    r.function((torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout),
               DropoutRule(2, "train", True))
    r.function(("torchvision.ops.stochastic_depth.stochastic_depth",), StochasticDepthRule())
    random_like = RandomLikeRule()
    r.function((torch.randn_like, torch.rand_like, torch.randint_like, torch.empty_like, torch.bernoulli),
               random_like)
    r.method(("bernoulli_", "bernoulli", "uniform_", "normal_", "random_", "exponential_"), random_like)
    r.function((torch.zeros_like, torch.ones_like, torch.full_like), ConstantLikeRule())

    # -- several tensors --
    broadcast = BroadcastRule()
    r.function((operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
                operator.imul, operator.itruediv, operator.neg, operator.pow, torch.add, torch.sub, torch.mul,
                torch.div, torch.true_divide, torch.maximum, torch.minimum, torch.where, torch.pow,
                torch.addcmul, torch.lerp, operator.floordiv, operator.mod), broadcast)
    r.method(("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "truediv", "pow", "pow_",
              "maximum", "minimum", "masked_fill", "masked_fill_", "where", "lerp", "addcmul"), broadcast)
    # comparisons and logic: elementwise on tensors (``torch.where(x > 0, x, 0.1 * x)``); on Python
    # values (sizes) they couple nothing, as broadcast does where no operand is a tensor
    r.function((operator.eq, operator.ne, operator.lt, operator.gt, operator.le, operator.ge, operator.and_,
                operator.or_, operator.xor, operator.invert, torch.eq, torch.ne, torch.lt, torch.gt, torch.le,
                torch.ge, torch.greater, torch.less, torch.greater_equal, torch.less_equal, torch.not_equal,
                torch.logical_and, torch.logical_or, torch.logical_xor, torch.logical_not, torch.isnan,
                torch.isinf, torch.isfinite), broadcast)
    r.method(("eq", "ne", "lt", "gt", "le", "ge", "greater", "less", "greater_equal", "less_equal", "not_equal",
              "logical_and", "logical_or", "logical_xor", "logical_not", "isnan", "isinf", "isfinite", "bool"),
             broadcast)
    r.function((operator.setitem,), ItemAssignRule())
    r.function((torch.cat, torch.concat, torch.concatenate), CatRule())
    r.function((torch.stack,), StackRule())

    # -- layout --
    flatten = FlattenRule()
    r.module(nn.Flatten, flatten)
    r.function((torch.flatten,), flatten)
    r.method(("flatten",), flatten)
    reshape = ReshapeRule()
    r.method(("view", "reshape", "view_as", "reshape_as"), reshape)
    r.function((torch.reshape,), reshape)
    permute = PermuteRule()
    r.method(("permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t"), permute)
    r.function((torch.permute, torch.transpose, torch.swapaxes, torch.swapdims, torch.movedim, torch.moveaxis,
                torch.t), permute)
    squeeze = SqueezeRule()
    r.method(("squeeze", "unsqueeze"), squeeze)
    r.function((torch.squeeze, torch.unsqueeze), squeeze)
    r.function((operator.getitem,), GetitemRule())
    split = SplitRule()
    r.method(("split", "chunk", "unbind", "tensor_split"), split)
    r.function((torch.split, torch.chunk, torch.unbind, torch.tensor_split), split)
    expand = ExpandRule()
    r.method(("expand", "expand_as", "broadcast_to"), expand)
    r.function((torch.broadcast_to,), expand)
    r.method(("repeat",), RepeatRule())
    r.function((torch.zeros, torch.ones, torch.empty, torch.full, torch.rand, torch.randn, torch.arange,
                torch.tensor, torch.eye, torch.linspace), CreationRule())
    r.method(("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"), CreationRule())

    # -- reductions and ops along one axis --
    reduce = ReduceRule()
    r.function((torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp,
                torch.prod, torch.norm), reduce)
    r.method(("mean", "sum", "amax", "amin", "std", "var", "logsumexp", "prod", "norm"), reduce)
    r.module((nn.Softmax, nn.LogSoftmax, nn.Softmin), AlongDimRule())
    r.function((F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax, torch.cumsum,
                torch.cumprod), AlongDimRule(1))
    r.method(("softmax", "log_softmax", "cumsum", "cumprod"), AlongDimRule(1))
    r.function((F.normalize,), AlongDimRule(2, default=1))

    # -- pooling, interpolation --
    max_pool = ChannelKeepingRule("max")
    r.module((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), max_pool)
    r.function((F.max_pool1d, F.max_pool2d, F.max_pool3d, F.max_pool1d_with_indices, F.max_pool2d_with_indices,
                F.max_pool3d_with_indices, torch.max_pool1d, torch.max_pool2d, torch.max_pool3d,
                torch.max_pool1d_with_indices), max_pool)
    adaptive = ChannelKeepingRule("adaptive")
    r.module((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
              nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d), adaptive)
    r.function((F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                F.adaptive_max_pool2d, F.adaptive_max_pool3d, torch.adaptive_avg_pool1d, torch.adaptive_max_pool1d),
               adaptive)
    resample = ChannelKeepingRule("resample")
    r.module((nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d), resample)
    r.function((F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear), resample)
    avg = ChannelKeepingRule("avg", avg=True)
    r.module((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), avg)
    r.function((F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, torch.avg_pool1d), avg)
    lp_pool = ChannelKeepingRule("lp", constant=False)
    r.module((nn.LPPool1d, nn.LPPool2d), lp_pool)
    r.function((F.lp_pool1d, F.lp_pool2d), lp_pool)
    unpool = ChannelKeepingRule("unpool", constant=False)
    r.module((nn.MaxUnpool1d, nn.MaxUnpool2d, nn.MaxUnpool3d), unpool)
    r.function((F.max_unpool1d, F.max_unpool2d, F.max_unpool3d), unpool)
    from .ops import PadRule

    r.function((F.pad,), PadRule())

    # -- Python values --
    neutral = NeutralRule()
    r.method(("size", "dim", "numel", "nelement", "stride", "is_contiguous", "element_size", "ndimension"), neutral)
    r.function((getattr, len, int, float), neutral)
    return r


DEFAULT_RULES = _default()

LEAF_RULES: dict[str, Rule] = {
    "conv": ConvLeafRule(),
    "linear": LinearLeafRule(),
    "elementwise": ElementwiseRule(),
    "frozen": UnknownRule(),
}

_LEAF_FOR = ((nn.modules.conv._ConvNd, "conv"), (nn.Linear, "linear"))


def rule_names() -> list[str]:
    """The leaf rules a user can name (``--rule TYPE=NAME``)."""
    return list(LEAF_RULES)


def known_base(t: type) -> type | None:
    """The built-in layer type that ``t`` subclasses while overriding its forward, if any."""
    return DEFAULT_RULES.known_base(t)


def leaf_rule_name(base: type) -> str:
    """The leaf rule a subclass of layer type ``base`` may ask for (see LEAF_RULES)."""
    for t, name in _LEAF_FOR:
        if issubclass(base, t) and not issubclass(base, nn.modules.conv._ConvTransposeNd):
            return name
    return "frozen"


def with_user_rules(rules: Mapping[Any, Any] | None) -> Registry:
    """DEFAULT_RULES plus the user's rules: ``{type or "TypeName": Rule or "conv"|"linear"|...}``."""
    if not rules:
        return DEFAULT_RULES
    r = DEFAULT_RULES.copy()
    for key, value in rules.items():
        if isinstance(value, str):
            if value not in LEAF_RULES:
                raise UsageError(f"unknown rule {value!r} for {key}; choose one of {', '.join(LEAF_RULES)} "
                                 "or pass a sparsify.passes.rules.Rule object")
            value = LEAF_RULES[value]
        if not isinstance(value, Rule):
            raise UsageError(f"the rule for {key} is a {type(value).__name__}, not a rule name or a Rule object")
        if isinstance(key, type):
            for name in type_names(key):
                r.user_modules[name] = value
        elif isinstance(key, str) and key:
            r.user_modules[key] = value
        else:
            raise UsageError(f"a rule key must be a module type or its name, not {key!r}")
    return r
