"""The sparse trainer: SGD (Nesterov) or Adam, a topology schedule, masks enforced every step.

``fit`` trains any nn.Module holding SparseConv2d / SparseLinear layers; ``sparsify.train.run``
wraps it for run directories. After every optimiser step and every topology update, masked
weights and their optimiser state (momentum buffers, Adam moments) are set to exactly zero.
The learning rate is a pure function of the step and the batch order of (seed, epoch), so a
checkpoint at an epoch boundary continues bit-identically.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._io import atomic_path
from ..errors import DataError, DivergenceError, SparsifyError, TrainingError, UsageError, check_setting_type
from ..nn import live_params, sparse_modules
from ..passes.base import seed_problem
from .checkpoint import save_checkpoint
from .data import DataBundle, Split, augment_batch, augment_generator, batches, check_data_name, num_batches
from .distributed import Reducer
from .metrics import GradAccumulator, layer_stats, live_connections, start_record
from .schedules import SCHEDULES, Change, Plan, schedule_class
from .schedules.base import ScheduleParams, flag

BN_RECALIBRATION_SAMPLES = 20_000   # enough for the statistics; a large image folder is not re-read whole
LR_SCHEDULES = ("cosine", "step", "constant")
OPTIMIZERS = ("sgd", "adam")
WARMUP_MAX_STEPS = 500
START_STEPS = 5          # the loss a run starts from: mean over its first steps
DIVERGED_FACTOR = 3.0    # an epoch's mean train loss this many times the start loss: diverged
# What a model's forward returns (TrainConfig.model_output): scores for cross-entropy, a softmax's
# probabilities, a log_softmax's log-probabilities; detect_model_output tells them apart within this.
MODEL_OUTPUTS = ("logits", "probabilities", "log-probabilities")
MODEL_OUTPUT_TOLERANCE = 1e-3

LogFn = Callable[[str], None]
ProgressFn = Callable[[dict[str, Any]], None]


# The keys of ``TrainConfig.to_dict()``, in the order summary.json, metrics.jsonl and checkpoints
# have always had them (schedule settings among the shared ones, as when the config was flat).
RECORD_KEYS = ("data", "data_dir", "schedule", "epochs", "batch_size", "lr", "lr_schedule", "warmup_steps",
               "clip_grad_norm", "optimizer", "momentum", "weight_decay", "seed", "prune_rate", "update_every",
               "stop_fraction", "start_density", "double_every", "init", "init_profile", "init_profile_params",
               "val_fraction", "train_limit", "augment", "workers", "normalize", "model_output")


def schedule_settings() -> dict[str, tuple[dataclasses.Field, list[str]]]:
    """Every schedule setting: its field (type, default) and the schedules that read it."""
    out: dict[str, tuple[dataclasses.Field, list[str]]] = {}
    for name, cls in SCHEDULES.items():
        for f in dataclasses.fields(cls.Params):
            out.setdefault(f.name, (f, []))[1].append(name)
    return out


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass(init=False)
class TrainConfig:
    """Every setting that determines a training run (saved in checkpoints and summary.json).

    The shared settings are fields; the schedule's own are ``params``, an instance of the schedule
    class's ``Params`` (``sparsify.train.schedules``). ``TrainConfig(schedule="rigl", init="erk")``
    and ``from_dict`` take the schedule's settings as flat keywords too (the CLI's flags, the API's
    keywords, study specs and older records) and route them to ``params``. A setting that only
    another schedule reads is kept in ``unused`` and refused by ``validate`` (it would be recorded
    as if applied); a resumed record drops it. Unknown names are a UsageError.
    """

    data: str = "digits"
    data_dir: str | None = None
    schedule: str = "static"
    epochs: int = 10
    batch_size: int = 100
    lr: float | None = None               # default 0.1 for SGD, 1e-3 for Adam
    lr_schedule: str = "cosine"           # cosine | step (x0.1 at 50% and 75%) | constant
    warmup_steps: int | None = None       # linear warm-up from 0; None: one epoch, at most WARMUP_MAX_STEPS
    clip_grad_norm: float | None = 2.0    # clip the global gradient norm to this (None or 0: no clipping)
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    val_fraction: float = 0.1
    train_limit: int | None = None        # use only the first N training examples (quick runs, benchmarks)
    augment: bool | None = None           # random crop + flip of training batches; None: on for image folders
    workers: int | None = None            # DataLoader workers decoding an image folder; None: cores - 1, at most 4
    normalize: bool = True                # standardise inputs with the training split's mean / std (data.load_dataset)
    model_output: str | None = None       # logits | probabilities | log-probabilities (class_loss); None: fit detects it
    params: ScheduleParams = field(default_factory=ScheduleParams)  # the schedule's own settings
    unused: dict[str, Any] = field(default_factory=dict, repr=False)  # other schedules' settings given

    def __init__(self, params: ScheduleParams | None = None, **values: Any) -> None:
        shared = {f.name: f for f in dataclasses.fields(self) if f.name not in ("params", "unused")}
        settings = schedule_settings()
        unknown = sorted(set(values) - set(shared) - set(settings))
        if unknown:
            known = sorted(set(shared) | set(settings))
            raise UsageError(f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(known)}")
        values = {k: check_setting_type(k, v, shared[k].type if k in shared else settings[k][0].type)
                  for k, v in values.items()}  # epochs="2" was a TypeError deep in validate()
        for name, f in shared.items():
            setattr(self, name, values[name] if name in values else _default(f))
        cls = SCHEDULES.get(self.schedule)
        own = cls.Params.names() if cls is not None else ()
        given = {k: v for k, v in values.items() if k in settings}
        if params is not None:
            if cls is not None and not isinstance(params, cls.Params):
                raise UsageError(f"schedule {self.schedule!r} takes {cls.Params.__name__}, not {type(params).__name__}")
            if set(given) & set(own):
                raise UsageError(f"give {', '.join(sorted(set(given) & set(own)))} in params or as keywords, not both")
            self.params = params
        else:
            self.params = (cls.Params if cls is not None else ScheduleParams)(**{k: v for k, v in given.items() if k in own})
        self.unused = {k: v for k, v in given.items() if k not in own and v != _default(settings[k][0])}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build a config from flat keyword values (``to_dict``'s shape), refusing unknown names."""
        return cls(**values)

    @classmethod
    def setting_fields(cls) -> list[dataclasses.Field]:
        """The field (name, type, default) of every name ``from_dict`` takes."""
        shared = [f for f in dataclasses.fields(cls) if f.name not in ("params", "unused")]
        return shared + [f for f, _ in schedule_settings().values()]

    def to_dict(self) -> dict[str, Any]:
        """The flat record of every setting, with the keys (and order) it has always had: the shared
        settings, the schedule's own, other schedules' at their defaults unless given."""
        flat = {name: _default(f) for name, (f, _) in schedule_settings().items()}
        flat.update(copy.deepcopy(self.unused))
        flat.update(dataclasses.asdict(self.params))
        flat.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                     if f.name not in ("params", "unused")})
        return {k: flat[k] for k in RECORD_KEYS if k in flat} | {k: v for k, v in flat.items() if k not in RECORD_KEYS}

    #: settings that are no flag of ``sparsify train`` (the API's and study specs' only)
    _NOT_FLAGS = ("val_fraction", "model_output")

    def cli_args(self) -> list[str]:
        """The ``sparsify train`` flags that give this config: every setting away from its default
        (``--no-augment`` for augment False, one ``--init-profile-param NAME=VALUE`` per entry)."""
        defaults = TrainConfig(schedule=self.schedule).to_dict()
        args: list[str] = []
        for name, value in self.to_dict().items():
            at_default = value == defaults.get(name, object())
            if name in self._NOT_FLAGS or at_default or (value is None and name != "clip_grad_norm"):
                continue
            if isinstance(value, bool):
                args.append(flag(name) if value else flag(f"no_{name}"))
            elif isinstance(value, dict):
                for k, v in value.items():
                    args += ["--init-profile-param", f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"]
            else:
                args += [flag(name), "0" if value is None else f"{value:g}" if isinstance(value, float) else str(value)]
        return args

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return 0.1 if self.optimizer == "sgd" else 1e-3

    def validate(self) -> None:
        """Raise UsageError on a value that cannot work."""
        schedule_class(self.schedule)
        try:
            check_data_name(self.data)
        except DataError as e:  # an argument, here: a usage error like the others
            raise UsageError(str(e)) from None
        checks = [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.lr is None or 0 < self.lr < math.inf, "--lr must be a positive, finite number"),
            (math.isfinite(self.weight_decay), "--weight-decay must be a finite number"),
            # the optimisers compute in float32: 1e308 ended in torch's "cannot be converted to type
            # float without overflow" (a traceback)
            (self.lr is None or self.lr <= _FLOAT32_MAX, f"--lr must be at most {_FLOAT32_MAX:.3g} (float32's largest)"),
            (self.weight_decay <= _FLOAT32_MAX,
             f"--weight-decay must be at most {_FLOAT32_MAX:.3g} (float32's largest)"),
            (self.warmup_steps is None or self.warmup_steps >= 0, "--warmup-steps must be >= 0"),
            (self.clip_grad_norm is None or self.clip_grad_norm >= 0, "--clip-grad-norm must be >= 0 (0: off)"),
            (self.lr_schedule in LR_SCHEDULES, f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (0 <= self.momentum < 1, "--momentum must be in [0, 1)"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
            (self.train_limit is None or self.train_limit >= 1, "--train-limit must be at least 1"),
            (self.workers is None or self.workers >= 0, "--workers must be >= 0"),
            (seed_problem(self.seed) is None, seed_problem(self.seed) or ""),
            (self.model_output is None or self.model_output in MODEL_OUTPUTS,
             f"model_output must be one of {', '.join(MODEL_OUTPUTS)} (or None: detected from the first batch)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        settings = schedule_settings()
        for name in self.unused:  # given, and never read: recorded as if applied, it misled (--stop-fraction on set)
            owners = settings[name][1]
            raise UsageError(f"{flag(name)} applies to --schedule {' / '.join(owners)} only, not {self.schedule}; "
                             f"drop it or choose one of those schedules")
        self.params.validate()


def warmup_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Steps of linear learning-rate warm-up: ``cfg.warmup_steps``, else one epoch (at most WARMUP_MAX_STEPS)."""
    if cfg.warmup_steps is not None:
        return int(cfg.warmup_steps)
    return min(steps_per_epoch, WARMUP_MAX_STEPS)


def lr_at(cfg: TrainConfig, step: int, total: int, warmup: int = 0) -> float:
    """Learning rate for 0-based ``step`` of ``total``: the schedule, times a linear warm-up over ``warmup`` steps."""
    factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return factor * _scheduled_lr(cfg, step, total)


def _scheduled_lr(cfg: TrainConfig, step: int, total: int) -> float:
    base = cfg.learning_rate
    if cfg.lr_schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))
    if cfg.lr_schedule == "step":
        return base * (0.1 ** (int(step >= total // 2) + int(step >= (3 * total) // 4)))
    return base


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum, or Adam; weight decay as L2 in the gradient, as in the papers."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum,
                               nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


@torch.no_grad()
def enforce_masks(layers: dict[str, nn.Module], optimizer: torch.optim.Optimizer | None) -> None:
    """Zero masked weights and every optimiser-state tensor of the same shape, exactly."""
    for m in layers.values():
        wm = m.weight_mask()
        m.weight.mul_(wm)
        if optimizer is not None:
            for v in optimizer.state.get(m.weight, {}).values():
                if torch.is_tensor(v) and v.shape == m.weight.shape:
                    v.mul_(wm)


class DenseGradTap:
    """Capture the dense gradient d loss / d (weight * mask) of each masked layer for one step.

    ``weight.grad`` is zero at masked entries; growth criteria need the gradient there too. While
    active, each layer's ``masked_weight`` is shadowed by an instance attribute that hooks the
    product tensor; hooks fire during ``backward``.
    """

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.layers = layers
        self.grads: dict[str, torch.Tensor] = {}

    def _store(self, name: str, g: torch.Tensor) -> None:
        g = g.detach()  # a fresh tensor from autograd: kept without copying
        self.grads[name] = self.grads[name] + g if name in self.grads else g

    def _tapped(self, name: str, module: nn.Module) -> Callable[[], torch.Tensor]:
        method = type(module).masked_weight

        def masked_weight() -> torch.Tensor:
            w = method(module)
            if w.requires_grad:
                w.register_hook(lambda g: self._store(name, g))
            return w

        return masked_weight

    def __enter__(self) -> "DenseGradTap":
        for n, m in self.layers.items():
            object.__setattr__(m, "masked_weight", self._tapped(n, m))
        return self

    def __exit__(self, *exc: object) -> None:
        for m in self.layers.values():
            m.__dict__.pop("masked_weight", None)


def _describe_output(out: Any) -> str:
    """What a model's forward returned, for a message: 'a dict (keys: logits, feat)', 'a tuple of 2', ..."""
    if isinstance(out, dict):
        keys = ", ".join(str(k) for k in list(out)[:6]) + (", ..." if len(out) > 6 else "")
        return f"a dict (keys: {keys})"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)}"
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {list(out.shape)}"
    kind = type(out).__name__
    return f"{'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}"


def _tensors_only(out: Any) -> bool:
    """Whether every leaf of a (nested) output is a tensor: what export writes as ONNX outputs."""
    if isinstance(out, dict):
        return all(_tensors_only(v) for v in out.values())
    if isinstance(out, (tuple, list)):
        return all(_tensors_only(v) for v in out)
    return isinstance(out, torch.Tensor)


@torch.no_grad()
def output_classes(model: nn.Module, model_input: tuple[int, ...], name: str, seed: int = 0) -> int:
    """The number of classes ``model`` scores: the width of its output [N, classes] on one example input.

    Raises TrainingError (one line) when forward returns anything but one 2-d tensor of two or more
    scores per example (a dict, a tuple, a per-position map, one logit): cross-entropy training
    needs class scores; also when it does so only in eval mode (an auxiliary head returned in
    training, GoogLeNet / Inception style). Both forwards run on a seeded example, the training one
    on a copy (the model's BatchNorm statistics and the global RNG are left as they were).
    """
    import copy

    from ..replay import example_inputs

    was_training = model.training
    model.eval()
    try:
        out = model(example_inputs([tuple(model_input)], seed))
    finally:
        model.train(was_training)
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] == 1:
        raise TrainingError(f"{name} returns one score per example ({_describe_output(out)}): train minimises "
                            "cross-entropy over classes, which needs two or more; give the model one output per "
                            "class (two for a yes/no task), or train it in your own loop")
    mode = ""
    if isinstance(out, torch.Tensor) and out.dim() == 2:
        classes = int(out.shape[1])
        try:
            with torch.random.fork_rng(devices=[]):
                twin = copy.deepcopy(model).train()
                out = twin(example_inputs([(2, *tuple(model_input)[1:])], seed))  # two rows: BatchNorm needs them
        except Exception:  # noqa: BLE001 - a model failing in training: the first step reports it in one line
            return classes
        if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] >= 2:
            return classes
        mode = " in training mode"
    want = "[N, classes] scores" if isinstance(out, torch.Tensor) else "the logits"
    exports = "; export works" if _tensors_only(out) else ""  # export refuses outputs that are no tensors
    raise TrainingError(f"train needs a model whose forward returns one tensor of class scores [N, classes]; "
                        f"{name} returns {_describe_output(out)}{mode}{exports}; wrap the model so forward "
                        f"returns {want}" + (" in training too (e.g. drop the auxiliary outputs)" if mode else ""))


def output_kind(out: torch.Tensor, tolerance: float = MODEL_OUTPUT_TOLERANCE) -> str:
    """What a batch of class scores ``out`` [N, C] holds, one of ``MODEL_OUTPUTS``.

    "probabilities" when every row is >= 0 and sums to 1 within ``tolerance`` (a softmax),
    "log-probabilities" when every row's logsumexp is 0 within it (a log_softmax), else "logits".
    One class (C == 1), no rows or non-finite values: "logits".
    """
    if out.dim() != 2 or out.shape[0] == 0 or out.shape[1] < 2:
        return "logits"
    out = out.detach().double()
    if bool((out >= 0).all()) and bool(((out.sum(1) - 1).abs() <= tolerance).all()):
        return "probabilities"
    if bool((out.logsumexp(1).abs() <= tolerance).all()):
        return "log-probabilities"
    return "logits"


def class_loss(out: torch.Tensor, y: torch.Tensor, model_output: str | None, reduction: str = "mean") -> torch.Tensor:
    """The loss of class scores ``out`` [N, C] (``model_output`` says what they are) for labels ``y`` [N] (int64).

    Cross-entropy for logits, and for log-probabilities as they are (log_softmax of a log_softmax
    is itself: the cross-entropy is their negative log-likelihood). For probabilities, the negative
    log-likelihood of ``log p`` (``-log p[label]``), p clamped below at the smallest normal float so
    the log stays finite; cross-entropy would softmax them again and hardly train (a softmax model
    on digits: 18% test accuracy after 10 epochs, 90% for the same model returning logits).
    """
    if model_output == "probabilities":
        return F.nll_loss(torch.log(out.clamp_min(torch.finfo(out.dtype).tiny)), y, reduction=reduction)
    return F.cross_entropy(out, y, reduction=reduction)


_SIGMOIDS = (torch.sigmoid, F.sigmoid, torch.special.expit, F.hardsigmoid)


def _sigmoid_scores(model: nn.Module, out: Any) -> bool:
    """Whether class scores ``out`` [N, C] come from a sigmoid at the model's end: read off the graph
    when the model is a traced one (its output node made by a sigmoid), else off the values: all in
    [0, 1] on both sides of 0.5 (a sigmoid of logits of either sign; an untrained net's small positive
    logits, all in [0, 0.2], were taken for one)."""
    if not (isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] >= 2):
        return False
    graph = getattr(model, "graph", None)
    if isinstance(graph, torch.fx.Graph):
        ends = [n for n in graph.nodes if n.op == "output"]
        made = ends[0].args[0] if ends and ends[0].args else None
        if isinstance(made, torch.fx.Node):
            mods = dict(model.named_modules())
            return (made.op == "call_function" and made.target in _SIGMOIDS
                    or made.op == "call_method" and made.target in ("sigmoid", "sigmoid_")
                    or made.op == "call_module" and isinstance(mods.get(made.target), (nn.Sigmoid, nn.Hardsigmoid)))
    return bool(((out >= 0) & (out <= 1)).all()) and bool((out < 0.5).any()) and bool((out > 0.5).any())


@torch.no_grad()
def detect_model_output(model: nn.Module, split: Split, batch_size: int, model_input: tuple[int, ...],
                        reducer: Reducer, notes: list[str] | None = None) -> str:
    """What ``model`` returns (``output_kind``) on the first training batch of every rank; "logits" unless all agree.

    The forward runs in training mode (what the loss sees: a model may return logits in training
    and probabilities in eval mode) without gradients; the model's buffers (BatchNorm statistics)
    and the global RNG are left as they were. ``notes`` gets a note when the scores taken as logits
    all lie in [0, 1] (a sigmoid at the model's end: cross-entropy hardly moves scores squeezed so).
    """
    x, _ = next(iter(batches(split, batch_size, shuffle=False, rank=reducer.rank, world_size=reducer.world_size,
                             merge_single=True, workers=0)))
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[]):
            out = model(_adapt_batch(x, model_input))
    finally:
        model.train(was_training)
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    kind = output_kind(out) if isinstance(out, torch.Tensor) else "logits"
    if notes is not None and kind == "logits" and _sigmoid_scores(model, out):
        # a sigmoid head reached 42% where the same net returning logits reached 100%, without a word
        notes.append("note: the model's class scores all lie in [0, 1] without summing to 1 (a sigmoid at its end?); "
                     "they are trained as logits with cross-entropy, which moves scores squeezed into [0, 1] "
                     "little: return the logits (drop the final sigmoid) to train it")
    votes = torch.zeros(len(MODEL_OUTPUTS), dtype=torch.float64)
    votes[MODEL_OUTPUTS.index(kind)] = 1
    reducer.sum_(votes)
    agreed = [k for k, v in zip(MODEL_OUTPUTS, votes.tolist()) if v == reducer.world_size]
    return agreed[0] if agreed else "logits"


@contextlib.contextmanager
def _model_errors(epoch: int, step: int) -> Iterator[None]:
    """A model that fails in a training step (its forward, loss or backward) is one TrainingError line;
    sparsify's own errors pass as they are."""
    try:
        yield
    except SparsifyError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's model code: any error it raises
        msg = (str(e).splitlines()[0] if str(e) else type(e).__name__).split(" Hint:")[0]
        hint = ("its forward writes in place into a tensor autograd saved (e.g. y.add_(1) or y += 1 after a relu "
                "read by a later op): write it out of place (y = y + 1), as PyTorch itself requires to train it"
                if "modified by an inplace operation" in msg else
                "check that the model trains in plain PyTorch on inputs of this shape")
        raise TrainingError(f"the model fails in training at epoch {epoch} step {step + 1} "
                            f"({type(e).__name__}: {msg[:300]}); {hint}") from None


def _adapt_batch(x: torch.Tensor, model_input: tuple[int, ...]) -> torch.Tensor:
    """Flatten images for a model whose input is a vector (MLPs with a flat input shape)."""
    if len(model_input) == 2 and x.dim() == 4:
        return x.flatten(1)
    return x


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int, reducer: Reducer,
             model_input: tuple[int, ...], workers: int | None = None,
             model_output: str | None = None) -> tuple[float, float]:
    """Mean loss (``class_loss``) and accuracy (argmax of the output) over ``split`` (sharded over ranks, reduced)."""
    was_training = model.training
    model.eval()
    acc = torch.zeros(3, dtype=torch.float64)
    for x, y in batches(split, max(batch_size, 256), shuffle=False, rank=reducer.rank, world_size=reducer.world_size,
                        workers=workers):
        out = model(_adapt_batch(x, model_input))
        acc[0] += float(class_loss(out, y, model_output, reduction="sum"))
        acc[1] += float((out.argmax(1) == y).sum())
        acc[2] += len(y)
    reducer.sum_(acc)
    model.train(was_training)
    n = max(float(acc[2]), 1.0)
    return float(acc[0]) / n, float(acc[1]) / n


def data_identity(data: DataBundle) -> dict[str, Any]:
    """What a resumed training must find again in its data: the split sizes, the class names and the
    input normalisation (statistics of the training split, so a file rewritten with other
    contents under the same name changes it)."""
    return {"splits": [len(data.train), len(data.val), len(data.test)], "classes": data.class_names,
            "normalization": data.normalization}


def _check_same_data(state: dict[str, Any], data: DataBundle) -> None:
    """TrainingError unless the checkpoint's data (``data_identity``, absent from older ones) is ``data``'s."""
    if "data" not in state:
        return
    saved, now = json.loads(state["data"]), json.loads(json.dumps(data_identity(data)))
    changed = [k for k in now if saved.get(k) != now[k]]
    if changed:
        what = {"splits": "train / val / test sizes", "classes": "class names", "normalization": "input normalisation"}
        k = changed[0]

        texts = [v.get("text") if isinstance(v, dict) else None for v in (saved.get(k), now[k])]
        by_mean = k == "normalization" and texts[0] is not None and texts[0] == texts[1]

        def shown(v: Any) -> str:
            if k != "normalization" or not isinstance(v, dict):
                return str(v)
            if not by_mean:
                return v["text"]
            # per channel the formula read the same both times ("(x - mean[c]) / std[c] ... then, (x -
            # mean[c]) / std[c] ... now"): the statistics are what differ
            mean = v.get("mean", [])
            return f"per-channel mean [{', '.join(f'{x:.4g}' for x in mean[:4])}{', ...' if len(mean) > 4 else ''}]"

        raise TrainingError(f"--resume: {data.name} is not the data the checkpoint trained on ({what[k]} "
                            f"{shown(saved.get(k))} then, {shown(now[k])} now); resume with the same data or "
                            f"start again with --force")


def _one_example_fails(model: nn.Module, model_input: tuple[int, ...]) -> bool:
    """Whether a training batch of one example fails in ``model``'s BatchNorm layers: one that sees a
    single value per channel (BatchNorm1d on [N, C], a 1x1 plane) cannot normalise it; over a plane of
    pixels it can. Tried on a copy (the model's statistics are not touched)."""
    from ..replay import example_inputs

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return False
    try:
        with torch.no_grad():
            copy.deepcopy(model).train()(example_inputs([(1, *tuple(model_input)[1:])], 0))
    except ValueError as e:
        return "more than 1 value per channel" in str(e)
    except Exception:  # noqa: BLE001 - other failures: the first step reports them in one line
        return False
    return False


def _frozen_bn(bn: nn.modules.batchnorm._BatchNorm) -> str | None:
    """Why the model keeps ``bn``'s running statistics as they are ("momentum 0", "held in eval mode"), or None.

    Read with the model in training mode: a BatchNorm still in eval mode then is held there by the
    model's own ``train()`` (mmdetection's ``norm_eval``); one with ``momentum=0`` never moves its
    statistics in training (PyTorch: ``running = (1 - momentum) * running + momentum * batch``).
    """
    if bn.momentum == 0:
        return "momentum 0"
    if not bn.training:
        return "held in eval mode"
    return None


@dataclass
class BNRecalibration:
    """What ``recalibrate_bn`` did: the BatchNorm layers (module names) it re-estimated, and the ones
    it left as they were, each with why (``_frozen_bn``)."""

    estimated: list[str]
    kept: dict[str, str]

    def notes(self) -> list[str]:
        """The lines that tell a user: none when the model has no BatchNorm with running statistics."""
        lines = []
        if self.estimated:
            lines.append("re-estimated the BatchNorm statistics of the final weights (one pass over the training data)")
        if self.kept:
            n = len(self.kept)
            by_why: dict[str, list[str]] = {}
            for name, why in self.kept.items():
                by_why.setdefault(why, []).append(name)
            which = "; ".join(f"{why}: {', '.join(names[:6])}{', ...' if len(names) > 6 else ''}"
                              for why, names in by_why.items())
            lines.append(f"note: kept the running statistics of {n} BatchNorm layer{'s' if n != 1 else ''} the model "
                         f"freezes ({which}) as they were, not re-estimated")
        return lines


@torch.no_grad()
def recalibrate_bn(model: nn.Module, split: Split, batch_size: int, model_input: tuple[int, ...],
                   workers: int | None = None) -> BNRecalibration:
    """Re-estimate the BatchNorm running statistics for the final weights, except those the model freezes.

    One pass over ``split`` (at most ``BN_RECALIBRATION_SAMPLES`` images, the same on every rank, so
    ranks agree) in training mode without gradients, averaging each batch's statistics with equal
    weight, as ``torch.optim.swa_utils.update_bn`` does (Izmailov et al. 2018, "Averaging Weights
    Leads to Wider Optima", sect. 3.2). The exponential running averages trail weights that moved
    fast: mobilenetv2 trained 5 epochs on digits with the defaults reached 95% train accuracy and
    12% test accuracy before this pass.

    A BatchNorm whose statistics the model freezes (``momentum=0``, or held in eval mode by the
    model's ``train()``: ``_frozen_bn``) keeps them, and normalises with them during the pass (in
    eval mode), as it does at inference, so the layers after it are estimated on what they will
    see. BatchNorms without running statistics (``track_running_stats=False``) have nothing to
    re-estimate. Every BatchNorm's momentum and the model's mode are restored afterwards.
    """
    was_training = model.training
    model.train()
    bns = {n: m for n, m in model.named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}
    kept = {n: why for n, m in bns.items() if (why := _frozen_bn(m)) is not None}
    estimate = {n: m for n, m in bns.items() if n not in kept}
    momenta = {n: m.momentum for n, m in estimate.items()}
    try:
        if estimate:
            for m in estimate.values():
                m.reset_running_stats()
                m.momentum = None  # a cumulative average: every batch weighs the same
            for n in kept:
                bns[n].eval()
            size = max(batch_size, 256)
            for x, _ in itertools.islice(batches(split, size, shuffle=False, merge_single=True, workers=workers),
                                         max(1, BN_RECALIBRATION_SAMPLES // size)):
                model(_adapt_batch(x, model_input))
    finally:
        for n, m in estimate.items():
            m.momentum = momenta[n]
        model.train(was_training)
    return BNRecalibration(list(estimate), kept)


# One-sided p-value below which an accuracy counts as above chance: three standard deviations.
CHANCE_P = 0.00135


def at_chance(acc: float, num_classes: int, n: int) -> bool:
    """True when accuracy ``acc`` on ``n`` examples is not significantly above guessing 1 of
    ``num_classes``: the exact binomial test (``scipy.stats.binomtest``, one-sided) at ``CHANCE_P``."""
    if not math.isfinite(acc) or n <= 0 or num_classes < 2:
        return False
    from scipy.stats import binomtest

    return binomtest(round(acc * n), n, 1.0 / num_classes, alternative="greater").pvalue >= CHANCE_P


def below_chance(acc: float, num_classes: int, n: int) -> bool:
    """True when accuracy ``acc`` on ``n`` examples is significantly below guessing 1 of
    ``num_classes`` (the exact binomial test, one-sided, at ``CHANCE_P``): labels that contradict
    what the model learned, not a model that learned nothing."""
    if not math.isfinite(acc) or n <= 0 or num_classes < 2:
        return False
    from scipy.stats import binomtest

    return binomtest(round(acc * n), n, 1.0 / num_classes, alternative="less").pvalue < CHANCE_P


def too_few_to_tell(num_classes: int, n: int) -> bool:
    """True when even a perfect score on ``n`` examples would not be significantly above chance."""
    return num_classes >= 2 and 0 < n and at_chance(1.0, num_classes, n)


def _check_divergence(train_loss: float, val_loss: float | None, start_loss: float | None, epoch: int,
                      good_epochs: int, cfg: TrainConfig) -> None:
    """Raise DivergenceError when the epoch's loss is non-finite, or its mean train loss far above the start.

    Only the train loss is compared with the start: early in training the validation loss (eval
    mode, BatchNorm's running statistics still settling) can be many times the start in runs that
    then learn (resnet20 on digits after its warm-up epoch).
    """
    for name, value in (("train", train_loss), ("validation", val_loss)):
        if value is not None and not math.isfinite(value):
            raise DivergenceError(f"{name} loss became {value:.4g} at epoch {epoch}", epoch=epoch,
                                  good_epochs=good_epochs, lr=cfg.learning_rate)
    if start_loss is not None and train_loss > DIVERGED_FACTOR * start_loss:
        raise DivergenceError(f"the train loss of epoch {epoch} ({train_loss:.4g}) is {train_loss / start_loss:.0f}x "
                              f"the loss training started from ({start_loss:.3g})", epoch=epoch,
                              good_epochs=good_epochs, lr=cfg.learning_rate)


def _epochs_done(history: list[dict[str, Any]]) -> int:
    return sum(1 for r in history if r.get("event") == "epoch")


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in history))


def _merge(total: Change, change: Change | None) -> None:
    if change is not None:
        for n in set(change.pruned) | set(change.grown):
            total.add(n, change.pruned.get(n, 0), change.grown.get(n, 0))


def fit(model: nn.Module, data: DataBundle, cfg: TrainConfig, *, model_input: tuple[int, ...],
        checkpoint: str | Path | None = None, metrics_path: str | Path | None = None,
        resume_state: dict[str, Any] | None = None, log: LogFn | None = None,
        progress: ProgressFn | None = None) -> dict[str, Any]:
    """Train ``model`` in place on ``data`` with ``cfg``; return the final metrics.

    ``checkpoint`` (a file path) is rewritten atomically after every epoch; ``resume_state`` is a
    loaded checkpoint to continue from; ``metrics_path`` receives one JSON line per epoch.
    ``log`` gets one-line messages, ``progress`` per-step and per-epoch events (main rank only).
    ``cfg.model_output`` None is set to what the model returns on the first training batch
    (``detect_model_output``), before anything records ``cfg``; the loss is ``class_loss``.
    """
    cfg.validate()
    reducer = Reducer()
    say = log if (log is not None and reducer.is_main) else (lambda _m: None)
    report = progress if (progress is not None and reducer.is_main) else (lambda _e: None)
    layers = sparse_modules(model)
    if not layers and cfg.schedule != "static":
        raise TrainingError(f"schedule {cfg.schedule!r} needs masked layers but the model has none; "
                            f"transform it with a sparse method first or use --schedule static")
    if cfg.augment and isinstance(data.train, Split) and data.train.x.dim() != 4:
        raise UsageError(f"--augment crops and flips images, but {data.name} holds examples of shape "
                         f"{list(data.train.x.shape[1:])}; drop --augment")
    torch.manual_seed(cfg.seed)
    steps_per_epoch = num_batches(data.train, cfg.batch_size, reducer.world_size, merge_single=True)
    if steps_per_epoch == 0:
        raise TrainingError(f"the training split has fewer examples ({len(data.train)}) than ranks; use more data")
    per_rank = len(data.train) // reducer.world_size
    if (per_rank == 1 or cfg.batch_size == 1) and _one_example_fails(model, model_input):
        why, fix = (("--batch-size is 1", "use --batch-size 2 or more") if cfg.batch_size == 1 else
                    (f"the training split has {len(data.train)} example(s) for {reducer.world_size} rank(s)",
                     f"give at least {2 * reducer.world_size} training examples"))
        raise TrainingError(f"the model's BatchNorm layers see one value per channel in a training batch of one "
                            f"example, and {why}; {fix}")
    plan = Plan(cfg.epochs, steps_per_epoch)
    warmup = warmup_steps(cfg, steps_per_epoch)
    if resume_state is not None:
        _check_same_data(resume_state, data)
        model.load_state_dict(resume_state["model"])  # before the schedule looks at the masks
    schedule = schedule_class(cfg.schedule)(layers, plan, cfg, reducer)
    schedule.check_masks()
    optimizer = make_optimizer(model, cfg)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    start_loss: float | None = None
    first_losses: list[float] = []
    warned_chance = False
    initial = Change()
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        schedule.load_state_dict(resume_state["schedule"])
        torch.set_rng_state(resume_state["rng"]["torch"])
        history = json.loads(resume_state["history"])
        start_epoch = int(resume_state["epoch"])
        start_loss = resume_state.get("start_loss")
        say(f"resuming after epoch {start_epoch} of {cfg.epochs}")
    else:
        _merge(initial, schedule.start())
        if initial.pruned or initial.grown:
            say(f"{cfg.schedule}: initial topology set (pruned {sum(initial.pruned.values())}, "
                f"grown {sum(initial.grown.values())} connections)")
    enforce_masks(layers, optimizer)
    if cfg.model_output is None:
        with _model_errors(start_epoch + 1, 0):  # the first training-mode forward: its failure is one line too
            head_notes: list[str] = []
            cfg.model_output = detect_model_output(model, data.train, cfg.batch_size, model_input, reducer,
                                                   head_notes)
        for note in head_notes:
            say(note)
    if cfg.model_output == "probabilities":
        say("note: the model returns probabilities (rows >= 0 summing to 1, e.g. a softmax at its end), so the loss "
            "is their negative log-likelihood -log p[label], not cross-entropy, which takes logits "
            "(train.config.model_output in summary.json)")
    if resume_state is None:  # metrics.jsonl starts with the topology training starts from
        history.append(start_record(model, layers, cfg.to_dict()))
        if metrics_path is not None and reducer.is_main:
            _write_metrics(Path(metrics_path), history)
    for note in data.notes:
        say(note)
    if data.normalization is not None:
        # the deployed model needs the same; summary.json keeps the numbers (train.input_normalization)
        say(f"inputs normalised: {data.normalization['text']}")
    augment = data.augment if cfg.augment is None else cfg.augment
    flip = data.name not in ("mnist", "digits")  # a mirrored digit is another digit, or none
    if augment:
        say(f"augmenting training batches: random crop with padding{' and horizontal flip' if flip else ''}"
            f" (--no-augment turns it off)")

    net: nn.Module = model
    if reducer.active:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)

    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    grad_acc = GradAccumulator(layers)
    total = plan.total_steps
    report({"kind": "start", "total_steps": total, "epochs": cfg.epochs, "start_step": start_epoch * steps_per_epoch})
    try:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            grad_acc.reset()
            changes = Change()
            sums = torch.zeros(3, dtype=torch.float64)
            step = (epoch - 1) * steps_per_epoch
            for b, (x, y) in enumerate(batches(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                                               rank=reducer.rank, world_size=reducer.world_size, merge_single=True,
                                               workers=cfg.workers)):
                if augment:
                    x = augment_batch(x, augment_generator(cfg.seed, epoch, b, reducer.rank), flip=flip)
                lr = lr_at(cfg, step, total, warmup)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                tap = DenseGradTap(layers) if schedule.wants_dense_grad(step) else None
                with _model_errors(epoch, step):
                    if tap is not None:
                        with tap:
                            out = net(_adapt_batch(x, model_input))
                    else:
                        out = net(_adapt_batch(x, model_input))
                    loss = class_loss(out, y, cfg.model_output)
                batch = torch.tensor([float(loss.detach()) * len(y), float((out.argmax(1) == y).sum()), len(y)],
                                     dtype=torch.float64)
                reducer.sum_(batch)
                if not math.isfinite(float(batch[0])):
                    raise DivergenceError(f"loss became {float(batch[0]):.4g} at epoch {epoch} step {step + 1}",
                                          epoch=epoch, good_epochs=_epochs_done(history), lr=cfg.learning_rate,
                                          step=step + 1)
                if start_loss is None:
                    first_losses.append(float(batch[0] / batch[2]))
                    if len(first_losses) == min(START_STEPS, steps_per_epoch):
                        start_loss = sum(first_losses) / len(first_losses)
                sums += batch
                optimizer.zero_grad(set_to_none=True)
                with _model_errors(epoch, step):
                    loss.backward()
                grad_acc.add(step)
                if cfg.clip_grad_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
                optimizer.step()
                enforce_masks(layers, optimizer)
                step += 1
                change = schedule.after_step(step, tap.grads if tap is not None else None)
                if change is not None:
                    enforce_masks(layers, optimizer)
                    _merge(changes, change)
                report({"kind": "step", "step": step, "epoch": epoch, "loss": float(batch[0] / batch[2]),
                        "acc": float(batch[1] / batch[2]), "lr": lr})
            for buf in model.buffers():  # BN statistics drift per rank between DDP's broadcasts
                reducer.broadcast_(buf)
            change = schedule.after_epoch(epoch)
            if change is not None:
                enforce_masks(layers, optimizer)
                _merge(changes, change)
            if epoch == start_epoch + 1 and resume_state is None:
                _merge(changes, initial)
            val_loss, val_acc = (evaluate(model, data.val, cfg.batch_size, reducer, model_input, cfg.workers,
                                          cfg.model_output)
                                 if len(data.val) else (float("nan"), float("nan")))
            for s in grad_acc.sums.values():
                reducer.sum_(s)
            stats = layer_stats(layers, grad_acc)
            for n, rec in stats.items():
                rec["pruned"] = changes.pruned.get(n, 0)
                rec["grown"] = changes.grown.get(n, 0)
            train_loss = float(sums[0] / sums[2])
            _check_divergence(train_loss, val_loss if len(data.val) else None, start_loss, epoch, _epochs_done(history), cfg)
            # judged from epoch 2: the first is the learning-rate warm-up; and on the training batches
            # too (their own BatchNorm statistics): validation at chance alone is often running
            # statistics that trail fast-moving weights, which the end of training re-estimates
            train_at_chance = at_chance(float(sums[1] / sums[2]), data.num_classes, int(sums[2]))
            val_at_chance = not len(data.val) or at_chance(val_acc, data.num_classes, len(data.val))
            if epoch >= 2 and not warned_chance and train_at_chance and val_at_chance:
                warned_chance = True
                say(f"warning: accuracy is at chance after epoch {epoch}; if it stays there, retry with --force "
                    f"--lr {cfg.learning_rate / 10:g}")
            record = {
                "event": "epoch", "epoch": epoch, "step": step, "lr": lr_at(cfg, step - 1, total, warmup),
                "train_loss": train_loss, "train_acc": float(sums[1] / sums[2]),
                "val_loss": val_loss, "val_acc": val_acc,
                "pruned": sum(changes.pruned.values()), "grown": sum(changes.grown.values()),
                "live": live_connections(model, layers), "live_params": live_params(model),
                "epoch_time_s": round(time.perf_counter() - t0, 4), "layers": stats,
            }
            history.append(record)
            if reducer.is_main:
                if checkpoint is not None:
                    save_checkpoint(checkpoint, {
                        "epoch": epoch, "step": step, "config": json.dumps(cfg.to_dict()),
                        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                        "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                        "rng": {"torch": torch.get_rng_state()}, "history": json.dumps(history),
                        "start_loss": start_loss, "data": json.dumps(data_identity(data)),
                    })
                if metrics_path is not None:
                    _write_metrics(Path(metrics_path), history)
            reducer.barrier()
            report({"kind": "epoch", **{k: v for k, v in record.items() if k != "layers"}})
    except DivergenceError as e:  # the partial metrics stay, with the divergence as their last record
        history.append({"event": "diverged", "epoch": e.epoch, "step": e.step, "what": e.what, "lr": e.lr})
        if metrics_path is not None and reducer.is_main:
            _write_metrics(Path(metrics_path), history)
        raise
    finally:
        torch.use_deterministic_algorithms(prev_det)

    last = dict(history[-1]) if history else {}
    recalibrated = recalibrate_bn(model, data.train, cfg.batch_size, model_input, cfg.workers)
    for note in recalibrated.notes():
        say(note)
    if recalibrated.estimated and len(data.val):  # the summary's validation figures go with its test figures
        last["val_loss"], last["val_acc"] = evaluate(model, data.val, cfg.batch_size, reducer, model_input,
                                                     cfg.workers, cfg.model_output)
    test_loss, test_acc = evaluate(model, data.test, cfg.batch_size, reducer, model_input, cfg.workers,
                                   cfg.model_output)
    warnings = list(schedule.notes())
    if at_chance(test_acc, data.num_classes, len(data.test)):
        if test_acc > 1.5 / data.num_classes or too_few_to_tell(data.num_classes, len(data.test)):
            # well above the guessing rate, but on too few images to be sure: not "did not learn"
            warnings.append(f"test accuracy {test_acc:.1%} on {len(data.test)} test examples cannot be told from "
                            f"chance ({1 / data.num_classes:.1%}): too few to measure; test on more examples")
        elif below_chance(test_acc, data.num_classes, len(data.test)):
            # 0% on four balanced classes: test labels shifted by one, not a learning rate
            warnings.append(f"test accuracy {test_acc:.1%} is far below chance ({1 / data.num_classes:.1%}): the "
                            f"model learned something the test labels contradict; check that the test split's "
                            f"labels (and class order) match the training split's")
        elif len(data.val) and not at_chance(last.get("val_acc", float("nan")), data.num_classes, len(data.val)):
            # validation 100%, test 21%: the test inputs were on another scale, not a failed training
            warnings.append(f"test accuracy {test_acc:.1%} is at chance while validation accuracy is "
                            f"{last['val_acc']:.1%}: the model learned, and the test split differs from the "
                            f"training data; check that its inputs are preprocessed (scaled, typed) and labelled "
                            f"as the training split's")
        else:
            warnings.append(f"test accuracy {test_acc:.1%} is at chance: the model did not learn; retry with "
                            f"--force --lr {cfg.learning_rate / 10:g}, or more --epochs")
    result = {
        "schedule": cfg.schedule, "data": data.name, "epochs": cfg.epochs, "steps": plan.total_steps,
        "test_loss": test_loss, "test_acc": test_acc,
        "val_loss": last.get("val_loss"), "val_acc": last.get("val_acc"),
        "train_loss": last.get("train_loss"), "train_acc": last.get("train_acc"),
        "live": live_connections(model, layers), "live_params": live_params(model),
        "density": (sum(int(m.mask.sum()) for m in layers.values()) / sum(m.mask.numel() for m in layers.values())
                    if layers else 1.0),
        # the masked layers' live weights over their weights: connections of a 3x3 conv weigh 9 times
        # a 1x1's, so a schedule that moves connections between layers (RigL / SET with --init erk,
        # sparse momentum) changes the density of connections at an unchanged weight count
        "weight_density": (sum(int(m.mask.sum()) * (m.weight.numel() // m.mask.numel()) for m in layers.values())
                           / sum(m.weight.numel() for m in layers.values()) if layers else 1.0),
        "layers": layer_stats(layers),
        # what density and live count cover: the masked layers; the other convs and linears are dense
        "masked_layers": len(layers),
        "dense_layers": sum(isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and m not in layers.values()
                            for m in model.modules()) if layers else 0,
        "config": cfg.to_dict(),
        "input_normalization": data.normalization,
        "warnings": warnings,
    }
    if data.class_names is not None:
        result["class_names"] = data.class_names
    if metrics_path is not None and reducer.is_main:
        _write_metrics(Path(metrics_path), history + [{"event": "test", "test_loss": test_loss, "test_acc": test_acc}])
    report({"kind": "done", **{k: v for k, v in result.items() if k not in ("layers", "config")}})
    return result


__all__ = ["TrainConfig", "fit", "enforce_masks", "DenseGradTap", "lr_at", "SCHEDULES"]
