"""The sparse passes: ``sparse-random`` (Changpinyo et al. 2017) and ``psn`` (Profiled Sparse Networks).

Both replace eligible layers with masked ones without changing any channel count (each layer's
rule says whether and how it is masked):
- a Conv2d / Conv1d becomes a SparseConv2d / SparseConv1d with a channel mask [Cout, Cin/groups]
  (the same pattern over the whole kernel window; a grouped conv gets one per group); depthwise,
  transposed and 3-D convs stay dense;
- a Linear becomes a SparseLinear with an element mask, only with ``include_linear`` for
  sparse-random (the paper keeps fully connected layers dense) and by default for psn;
- a leaf module is masked in place (its own forward kept) only when a rule says it is a conv or a
  linear map over its ``weight``; otherwise it stays dense;
- the final classifier stays dense unless ``include_classifier``.
Layers that only the training graph of a model uses (auxiliary heads) are masked too.

Masks never create dead filters: every output unit reads an input and every input feeds an
output. A conv that reads a single input filter (e.g. the first conv of a grey-scale net) cannot be
sparse over channels, so the paper's rule applies (sect. 5.2.1): it keeps a fraction sqrt(D) of
its filters, and the layers that read those filters never connect from the removed ones, through
any copy of them (a concat that repeats them, a flatten).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import PassError, UsageError
from ..nn import SPARSE_LAYERS, MaskedLeaf
from ..profiles import LayerShape, allocate, cv, fan_in_counts, random_mask, resolve_params
from .base import GraphPass, PassResult, check_fraction, set_submodule
from .channel_graph import ChannelGraph, classifier_node, shared_parameters, weight_nodes
from .outside import functional_calls
from .rules import DEFAULT_RULES, LayerRule, Registry, Role, SparseLayout
from .rules.base import beyond_forward
from .rules.layers import FunctionalConvRule
from .trace import node_shape, untrained_layer


@dataclass
class Eligible:
    """A layer the pass will mask."""

    node: fx.Node
    module: nn.Module
    index: int               # position among weight layers (seeds its random stream)
    n_out: int
    n_in: int                # per group
    kernel: int              # weights per mask entry (kernel window), 1 for linear
    single_input: bool       # a conv that reads one input filter
    rule: LayerRule | None = None
    is_conv: bool = False


def _kernel_size(layer: Eligible) -> tuple[int, ...]:
    """The conv's spatial kernel as ERK counts it, () for a linear layer."""
    if not layer.is_conv:
        return ()
    w = getattr(layer.module, "weight", None)
    dims = tuple(int(d) for d in w.shape[2:]) if isinstance(w, torch.Tensor) else ()
    return dims if dims and math.prod(dims) == layer.kernel else (layer.kernel,)


def check_density(density: float | None) -> float:
    return check_fraction(density, "--density", "0.1")


def runs_share_fan_in(mask: np.ndarray, block: int) -> bool:
    """Whether every run of ``block`` rows of ``mask`` [Cout, Cin], from row 0, is one row repeated."""
    rows = -(-mask.shape[0] // block)
    padded = np.concatenate([mask, np.repeat(mask[-1:], rows * block - mask.shape[0], axis=0)])
    return bool((padded.reshape(rows, block, -1) == padded[::block][:, None, :]).all())


def check_block(block: int) -> int:
    """``block`` if it is a whole number >= 1; UsageError otherwise."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise UsageError(f"--block must be a whole number >= 1 (output channels per shared fan-in), got {block!r}; "
                         "try 4")
    return block


ALLOCATIONS = ("uniform", "erk")


def check_allocation(allocation: str) -> str:
    """``allocation`` if it is one of ALLOCATIONS; UsageError otherwise."""
    if allocation not in ALLOCATIONS:
        raise UsageError(f"unknown --allocation {allocation!r}; choose uniform or erk")
    return allocation


def eligible_layers(gm: fx.GraphModule, include_linear: bool, include_classifier: bool,
                    rules: Registry | None = None) -> tuple[list[Eligible], list[str]]:
    """Layers to mask (of both graphs of a model that runs differently in training), and notes on
    those left dense and why."""
    rules = rules or DEFAULT_RULES
    mods = dict(gm.named_modules())
    clf = classifier_node(gm, rules)
    shared = shared_parameters(gm)
    out, notes, seen = [], [], set()
    for i, node in enumerate(weight_nodes(gm, rules, all_graphs=True)):
        m = mods[node.target]
        if node.target in seen:
            continue
        seen.add(node.target)
        if isinstance(m, SPARSE_LAYERS):
            raise PassError(f"{node.target} is already sparse; transform the dense model instead")
        if clf is not None and node.target == clf.target and not include_classifier:
            notes.append(f"{node.target}: classifier kept dense (use --include-classifier to mask it)")
            continue
        if node.target in shared:
            notes.append(f"{node.target}: kept dense because it shares its parameters with "
                         f"{', '.join(shared[node.target])} (tied weights): a mask would untie them")
            continue
        untrained = untrained_layer(node, m)
        if untrained:
            notes.append(f"{node.target}: kept dense because {untrained[0]}, so training could not recover what "
                         f"a mask removes ({untrained[1]} to make it sparse)")
            continue
        rule = rules.rule_for_module(m)
        layout = rule.sparse(m)
        if not isinstance(layout, SparseLayout):
            notes.append(f"{node.target}: {layout}")
            continue
        if not layout.is_conv and not include_linear:
            notes.append(f"{node.target}: linear kept dense (use --include-linear to mask it)")
            continue
        out.append(Eligible(node, m, i, layout.n_out, layout.n_in, layout.kernel,
                            single_input=layout.is_conv and layout.n_in == 1, rule=rule, is_conv=layout.is_conv))
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in seen and rules.rule_for_module(mods[node.target]) is None:
            m = mods[node.target]
            beyond = beyond_forward(m)
            if beyond is not None:
                seen.add(node.target)
                notes.append(f"{node.target}: kept dense and frozen because {beyond}, which a sparse or resized "
                             f"copy would drop (remove them first to make it sparse)")
                continue
            base = rules.known_base(type(m))
            if base is not None:
                seen.add(node.target)
                notes.append(f"{node.target}: leaf {type(m).__name__} (a {base.__name__} with its own "
                             f"forward) kept dense and frozen; a rule for it (--rule, rules=) couples, masks and "
                             f"resizes it")
    return out, notes


def _rng(seed: int, layer: Eligible) -> np.random.Generator:
    return np.random.default_rng([int(seed), layer.index, 0x5A17])


def _fan_stats(mask: np.ndarray) -> dict[str, float]:
    f = mask.sum(axis=1)
    return {"fan_in_min": int(f.min()), "fan_in_mean": float(f.mean()), "fan_in_max": int(f.max()), "fan_in_cv": cv(f)}


class SparsePass(GraphPass):
    """Shared machinery of sparse-random and psn; subclasses choose each layer's mask."""

    def __init__(self, density: float, seed: int = 0, allocation: str = "uniform",
                 include_linear: bool = False, include_classifier: bool = False,
                 rescale_init: bool = True, rules: Registry | None = None, block: int = 1) -> None:
        self.density = check_density(density)
        self.block = check_block(block)
        self.rules = rules
        self.rescale_init = rescale_init
        self.seed, self.allocation = seed, check_allocation(allocation)
        self.include_linear, self.include_classifier = include_linear, include_classifier

    def draw(self, layer: Eligible, allowed: np.ndarray, live: int, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def draw_blocks(self, layer: Eligible, allowed: np.ndarray, live: int, rng: np.random.Generator) -> np.ndarray:
        """``draw`` with runs of ``block`` output channels of a conv sharing one fan-in.

        Block sparsity as in Elsen et al. 2020 (*Fast Sparse ConvNets*): the mask is drawn
        for ceil(Cout / block) rows with live / (mean block size) entries, and row r is the fan-in of
        output channels r*block .. r*block + block - 1 (the last block may be shorter). Linear
        layers keep one fan-in per unit, and so does a conv too sparse for every allowed input to
        be read by some block at its budget (live / block < allowed inputs). Returns a bool mask
        [n_out, n_in].
        """
        b = self.block if layer.is_conv else 1
        rows = -(-layer.n_out // b)
        # live entries over the mean block size (the last block may be shorter)
        per_block = round(live * rows / layer.n_out)
        if b == 1 or per_block < len(allowed):
            # Too sparse for blocks: reading every input from some block of b channels would
            # take b times the budget (resnet20's 16-channel convs at density 0.1: 0.25).
            return self.draw(layer, allowed, live, rng)
        per_block = min(max(per_block, rows), rows * len(allowed))
        mask = self.draw(replace(layer, n_out=rows), allowed, per_block, rng)
        return np.repeat(mask, b, axis=0)[:layer.n_out]

    def requires(self, gm: fx.GraphModule, example: Any) -> None:
        layers, notes = eligible_layers(gm, self.include_linear, self.include_classifier, self.rules)
        if not layers:
            leaves = [n.split(":")[0] for n in notes if ": leaf " in n]
            types = sorted({n.split(": leaf ")[1].split(" ")[0] for n in notes if ": leaf " in n})
            why = (f"; {', '.join(leaves)} {'is a leaf' if len(leaves) == 1 else 'are leaves'} kept dense "
                   f"(--rule {types[0]}=conv masks a leaf whose forward is a conv over its own weight)"
                   if leaves else "")
            kept = [n for n in notes if ": kept dense because " in n or ": kept dense and frozen because " in n]
            if not leaves and kept:  # tied, untrained, hooked or parametrized layers: say which and why
                why = f"; {kept[0]}" + (f" (and {len(kept) - 1} more layers kept dense)" if len(kept) > 1 else "")
            elif not leaves:
                dense = sorted({type(m).__name__ for m in gm.modules() if isinstance(m, nn.modules.conv._ConvNd)})
                why = (f"; its {', '.join(dense)} layers stay dense (masks cover Conv1d and Conv2d with groups "
                       "not equal to the channels): use --method depth-multiplier" if dense else "")
                # convolutions called as functions (the rule registry's): no module holds their weight
                functional = [n for n, rule in functional_calls(gm, self.rules)
                              if isinstance(rule, FunctionalConvRule) and not rule.transposed]
                if not dense and functional:  # a Conv2d subclass with its own forward is traced through
                    why = (f"; its {len(functional)} conv{'s' if len(functional) > 1 else ''} run as functional "
                           f"conv calls ({functional[0].name}: F.conv2d in a forward of its own, e.g. a Conv2d "
                           "subclass that standardises or scales its weight), on weights computed in forward "
                           "that a mask cannot hold: give those layers plain nn.Conv2d modules to make them "
                           "sparse")
            raise PassError(f"{self.name}: the model has no layer to make sparse (convs, or linears with "
                            f"--include-linear){why}")

    def call(self, gm: fx.GraphModule, example: Any) -> PassResult:
        cg = ChannelGraph.build(gm, example, self.rules)
        layers, notes = eligible_layers(gm, self.include_linear, self.include_classifier, self.rules)
        shapes = [LayerShape(l.node.target, l.n_out, l.n_in, l.kernel, kernel_size=_kernel_size(l),
                             min_live=1 if l.single_input else max(l.n_out, l.n_in)) for l in layers]
        budgets = allocate(shapes, self.density, self.allocation)
        dead = self._single_input_dead(cg, layers, budgets)
        result = PassResult(gm, notes=notes)
        for layer in layers:
            name = layer.node.target
            rng = _rng(self.seed, layer)
            if layer.single_input:
                mask = np.zeros((layer.n_out, 1), dtype=bool)
                mask[dead[name]["keep"], 0] = True
                rule = f"single input filter: keeps sqrt({dead[name]['density']:.4g}) of its {layer.n_out} filters"
            else:
                blocked = self._blocked_inputs(cg, layer, dead)
                groups = getattr(layer.module, "groups", 1) if layer.is_conv else 1
                rule = None
                if groups > 1 and len(blocked):
                    mask, empty = self._draw_grouped(layer, blocked, budgets[name], rng, groups)
                    if empty:
                        rule = f"groups {empty} read only filters removed by the single-input rule"
                else:
                    allowed = np.setdiff1d(np.arange(layer.n_in), blocked)
                    # every allowed input feeds an output, and no more entries than there are
                    live = min(max(budgets[name], len(allowed)), layer.n_out * len(allowed))
                    mask = self.draw_blocks(layer, allowed, live, rng)
                    if mask.shape[1] < layer.n_in:
                        mask = np.pad(mask, ((0, 0), (0, layer.n_in - mask.shape[1])))
            new = self._replace(gm, layer, mask)
            # (a grouped conv drawn group by group keeps blocks within groups: aligned from channel 0
            # only when the groups' channel counts are multiples of the block)
            shared = self.block > 1 and layer.is_conv and not layer.single_input and runs_share_fan_in(mask, self.block)
            if shared:
                new.fan_in_block = self.block
            if self.rescale_init:
                rescale_to_live_fan_in(new)
            info = {
                "kind": "conv" if layer.is_conv else "linear", "shape": [layer.n_out, layer.n_in],
                "kernel": layer.kernel, "live": int(mask.sum()), "entries": int(mask.size),
                "density": float(mask.mean()), **_fan_stats(mask),
            }
            if rule:
                info["rule"] = rule
            if shared:
                info["block"] = self.block
            result.layers[name] = info
        asked = [l for l in layers if self.block > 1 and l.is_conv and not l.single_input]
        # blocks of the whole layer: said only where the layer got them (a fallback keeps its own fan-ins)
        whole = [l.node.target for l in asked if l.n_out <= self.block and "block" in result.layers[l.node.target]]
        apart = [l.node.target for l in asked if "block" not in result.layers[l.node.target]]
        if apart:
            shown = ", ".join(apart[:3]) + (f" and {len(apart) - 3} more" if len(apart) > 3 else "")
            result.notes.append(f"--block {self.block}: {shown} kept one fan-in per output channel (too sparse for "
                                f"blocks: a block's fan-in at its budget could not read every input channel; or "
                                f"grouped with groups not a multiple of {self.block} channels); a higher --density "
                                f"or a smaller --block gives them blocks")
        if whole:
            shown = ", ".join(whole[:3]) + (f" and {len(whole) - 3} more" if len(whole) > 3 else "")
            result.notes.append(f"--block {self.block} is not below the output channels of {shown}: all outputs of "
                                f"{'that layer' if len(whole) == 1 else 'each'} share one fan-in (they all read the "
                                f"same input channels); a smaller --block, such as 4, keeps them apart")
        return result

    def _draw_grouped(self, layer: Eligible, blocked: np.ndarray, budget: int, rng: np.random.Generator,
                      groups: int) -> tuple[np.ndarray, list[int]]:
        """A grouped conv's mask drawn group by group: input channel b * (Cin/g) + j is column j of
        group b's rows only, so each group avoids its own blocked inputs. Returns the mask and the
        groups left without any allowed input."""
        rows = layer.n_out // groups
        sub = replace(layer, n_out=rows)
        mask = np.zeros((layer.n_out, layer.n_in), dtype=bool)
        empty = []
        shares = [budget // groups + (1 if b < budget % groups else 0) for b in range(groups)]
        for b in range(groups):
            own = blocked[(blocked >= b * layer.n_in) & (blocked < (b + 1) * layer.n_in)] - b * layer.n_in
            allowed = np.setdiff1d(np.arange(layer.n_in), own)
            if not len(allowed):
                empty.append(b)
                continue
            live = min(max(shares[b], len(allowed), rows), rows * len(allowed))
            part = self.draw_blocks(sub, allowed, live, rng)
            mask[b * rows:(b + 1) * rows, :part.shape[1]] = part
        return mask, empty

    def _single_input_dead(self, cg: ChannelGraph, layers: list[Eligible], budgets: dict[str, int]) -> dict[str, Any]:
        """For single-input convs: which filters stay, and where their removed filters appear."""
        out: dict[str, Any] = {}
        for layer in layers:
            if not layer.single_input:
                continue
            d = budgets[layer.node.target] / layer.n_out if self.allocation == "erk" else self.density
            n_keep = max(1, min(layer.n_out, round(math.sqrt(d) * layer.n_out)))
            keep = np.sort(_rng(self.seed, layer).permutation(layer.n_out)[:n_keep])
            removed = np.setdiff1d(np.arange(layer.n_out), keep)
            g = cg.group_of(layer.node)
            where: dict[int, np.ndarray] = {}
            if g is not None and g.is_root and len(removed):
                producers = g.roles(Role.OUT)
                if len(producers) == 1:
                    where = {gid: pos[removed].ravel() for gid, pos in cg.positions(g.id).items()}
            out[layer.node.target] = {"keep": keep, "positions": where, "density": d}
        return out

    @staticmethod
    def _blocked_inputs(cg: ChannelGraph, layer: Eligible, dead: dict[str, Any]) -> np.ndarray:
        """Input channels of ``layer`` (positions in its input group) that come from filters
        removed by the single-input rule."""
        x = layer.node.args[0]
        g = cg.group_of(x, 1 if layer.is_conv else -1) if isinstance(x, fx.Node) else None
        if g is None or not dead:
            return np.zeros(0, dtype=np.int64)
        blocked = [d["positions"][g.id] for d in dead.values() if g.id in d["positions"]]
        return np.unique(np.concatenate(blocked)) if blocked else np.zeros(0, dtype=np.int64)

    @staticmethod
    def _replace(gm: fx.GraphModule, layer: Eligible, mask: np.ndarray) -> nn.Module:
        new = layer.rule.make_sparse(layer.module, torch.from_numpy(mask.astype(np.float32)))
        shape = node_shape(layer.node.args[0]) if isinstance(layer.node.args[0], fx.Node) else None
        if isinstance(new, MaskedLeaf) and shape is not None and new.reads_masked_inputs(shape) is not None:
            t = type(layer.module).__name__
            raise PassError(f"{layer.node.target}: the {layer.rule.name} rule for {t} does not hold: its forward "
                            "reads inputs its mask removes (it transforms its weight before using it, e.g. weight "
                            f"standardisation), so masking it would not make it sparse; drop the rule for {t} "
                            "(--rule) to keep it dense")
        set_submodule(gm, layer.node.target, new)
        return new

    def ensures(self, original: fx.GraphModule, result: PassResult, example: Any) -> None:
        super().ensures(original, result, example)
        for name, info in result.layers.items():
            m = result.model.get_submodule(name)
            if int(m.mask.sum()) != info["live"]:
                raise PassError(f"{self.name}: {name} has {int(m.mask.sum())} live connections, expected {info['live']}")
            if "rule" not in info and bool((m.mask.sum(dim=1) == 0).any()):
                raise PassError(f"{self.name}: {name} has an output unit with no input")
            per_entry = m.weight.detach().abs().reshape(m.mask.shape + (-1,)).sum(-1)
            if bool(per_entry[m.mask == 0].any()):
                raise PassError(f"{self.name}: {name} has a masked weight that is not zero")


@torch.no_grad()
def rescale_to_live_fan_in(layer: nn.Module) -> None:
    """Scale each output unit's weights by sqrt(dense fan-in / live fan-in).

    The dense initialisation (Kaiming) assumes every input is read; a unit that reads 10% of them
    would start with ~1/sqrt(10) of the intended output scale, compounding layer after layer until
    an untrained deep net outputs little more than its biases and trains poorly (lenet5 at D=0.1
    stayed at chance on digits). This keeps each unit's initial variance what Kaiming intended for
    its actual fan-in (as sparse-training work such as RigL does).
    """
    live = layer.mask.sum(dim=1)
    scale = torch.sqrt(layer.mask.shape[1] / live.clamp(min=1))
    layer.weight.mul_(scale.reshape((-1,) + (1,) * (layer.weight.dim() - 1)))


class SparseRandomPass(SparsePass):
    """Each output channel reads a uniformly random subset of input channels (exact layer budget)."""

    name = "sparse-random"

    def draw(self, layer: Eligible, allowed: np.ndarray, live: int, rng: np.random.Generator) -> np.ndarray:
        return random_mask(layer.n_out, allowed, live, rng)


class PSNPass(SparsePass):
    """Profiled Sparse Networks: per-unit fan-ins from a continuous profile, inputs drawn at random."""

    name = "psn"

    def __init__(self, density: float, profile: str = "lognormal", profile_params: dict[str, float] | None = None,
                 seed: int = 0, allocation: str = "uniform", include_linear: bool = True,
                 include_classifier: bool = False, rescale_init: bool = True, rules: Registry | None = None,
                 block: int = 1) -> None:
        super().__init__(density, seed, allocation, include_linear, include_classifier, rescale_init, rules, block)
        self.profile = profile
        self.profile_params = resolve_params(profile, profile_params)

    def draw(self, layer: Eligible, allowed: np.ndarray, live: int, rng: np.random.Generator) -> np.ndarray:
        counts = fan_in_counts(self.profile, layer.n_out, len(allowed), live, self.profile_params)
        return random_mask(layer.n_out, allowed, live, rng, row_counts=counts)
