"""Study specs: a TOML file that names the model, data, seeds, shared training settings and arms.

A *study* trains every *arm* (a method with its parameters and training settings) once per seed,
one run directory per arm x seed, so that ``sparsify compare`` can report mean +- standard error
and paired differences. The format::

    [study]
    name = "dettmers-lenet300"        # optional; default: the file's stem
    description = "..."               # optional, free text
    model = "zoo:lenet300-100"        # MODEL as `sparsify transform` takes it
    model_args = {}                   # optional: keyword arguments of the model factory
    input_shape = [1, 1, 28, 28]      # optional: default from the model
    seeds = 5                         # N (seeds 0..N-1) or a list such as [0, 1, 2]
    baseline = "dense"                # optional: default baseline arm of `sparsify compare`

    [train]                           # settings shared by every arm (`sparsify train` options,
    data = "mnist"                    #   with underscores: batch_size, lr_schedule, prune_rate, ...)
    epochs = 100

    [arms.dense]                      # one table per arm; the name is its directory name
    method = "none"

    [arms.momentum]
    method = "sparse-random"          # sparse-random | psn | depth-multiplier | none
    density = 0.05                    # transform parameters: density, alpha, divisor, profile,
    include_linear = true             #   profile_params, allocation, include_linear,
    include_classifier = true         #   include_classifier, rescale_init, block
    seeds = 10                        # optional: this arm's own seeds
    series = "sparse momentum"        # optional: legend entry of `compare --plot` (default: method)
    train = { schedule = "sparse-momentum" }   # optional: overrides of [train] for this arm

    [arms.depth-conv]
    method = "depth-multiplier"
    match = "momentum"                # alpha chosen so that this arm's live parameters equal
    count = "conv"                    #   those of arm "momentum" (same seed): conv | total

Arms may also override ``model``, ``model_args`` and ``input_shape``. A relative model file or data
folder is looked up next to the spec first, then in the current directory. Every problem in a spec is
reported as one line that names the key and says what to do (``SpecError``, exit code 2).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import read_json
from ..errors import SparsifyError, UsageError, annotation_kind, is_kind
from ..models import model_file
from ..passes.base import MAX_SEED, seed_problem
from ..passes.depth_multiplier import COUNTS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

STUDY_KEYS = {"name", "description", "model", "model_args", "input_shape", "seeds", "baseline"}
TRANSFORM_KEYS = {"density", "alpha", "divisor", "profile", "profile_params", "allocation", "include_linear",
                  "include_classifier", "rescale_init", "block"}
ARM_KEYS = {"method", "model", "model_args", "input_shape", "seeds", "series", "train", "match", "count"} | TRANSFORM_KEYS
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# What a study directory holds beside its arms' folders (runner.py): no arm may take these names.
STUDY_JSON = "study.json"
SPEC_COPY = "spec.toml"
LOGS = "logs"
RESERVED = {STUDY_JSON, SPEC_COPY, LOGS}
MAX_SEEDS = 10_000  # runs per arm


class SpecError(UsageError):
    """A study spec that cannot be run: one line naming the key and what to do."""


@dataclass
class Arm:
    """One arm of a study: how to transform the model and how to train it."""

    name: str
    method: str
    model: str
    model_args: dict[str, Any]
    input_shape: list[int] | None
    seeds: list[int]
    transform: dict[str, Any]            # keyword arguments of ``api.transform`` (density, alpha, ...)
    train: dict[str, Any]                # TrainConfig fields ([train] merged with the arm's own)
    series: str
    match: str | None = None             # depth-multiplier: the arm whose parameter count is matched
    count: str | None = None             # which count: "conv" or "total"


@dataclass
class StudySpec:
    """A parsed, validated study spec."""

    name: str
    description: str
    path: Path | None
    arms: dict[str, Arm]
    baseline: str | None
    text: str = ""
    raw: dict[str, Any] = field(default_factory=dict)
    named: bool = False  # the name was given ([study] name), not taken from the file's stem
    base_dir: Path | None = None  # what its relative file names were read against (absolute)

    def jobs(self) -> list[tuple[Arm, int]]:
        """Every (arm, seed) in spec order, arms whose parameters are matched after the arms they match."""
        order = _match_order(self.arms)
        return [(self.arms[a], s) for a in order for s in self.arms[a].seeds]


def job_key(arm: Arm, seed: int, arms: dict[str, Arm] | None = None) -> dict[str, Any]:
    """Everything that determines the run of ``arm`` at ``seed`` (compared on resume). An arm that
    matches another's parameters (``match``) depends on that arm's run too: with ``arms`` (the
    spec's) its key holds the matched arm's key under ``"matched"``, so changing the matched arm
    redoes it as well (its alpha was chosen for the old parameter count)."""
    key = {"arm": arm.name, "seed": seed, "model": arm.model, "model_args": arm.model_args,
           "input_shape": arm.input_shape, "method": arm.method, "transform": arm.transform,
           "match": arm.match, "count": arm.count, "train": {**arm.train, "seed": seed}}
    if arms is not None and arm.match is not None and arm.match in arms:
        key["matched"] = job_key(arms[arm.match], seed, arms)
    return key


def job_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _where(path: Path | None) -> str:
    return f"{path}: " if path is not None else ""


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study spec (TOML); SpecError with one line on any problem."""
    p = Path(path)
    if p.is_dir():
        raise SpecError(f"study spec {p} is a directory; give the spec's .toml file (see `sparsify study --help`)")
    if not p.is_file():
        raise SpecError(f"study spec {p} does not exist; write one (see `sparsify study --help`)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{p}: not UTF-8 text, so not a TOML spec; save it as UTF-8") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{p}: not valid TOML ({str(e).splitlines()[0]}); fix the syntax") from None
    # a study's own copy of its spec names files relative to where the original spec was
    record = read_json(p.parent / STUDY_JSON) if p.name == SPEC_COPY else {}
    spec_dir = record.get("spec_dir")
    spec = parse_spec(raw, path=p, base_dir=Path(spec_dir) if isinstance(spec_dir, str) else None)
    spec.text = text
    return spec


def parse_spec(raw: dict[str, Any], path: Path | None = None, name: str | None = None,
               base_dir: Path | None = None) -> StudySpec:
    """Validate a spec already read into a dict (``load_spec`` does the reading); relative file
    names are read against ``base_dir`` (default: the spec's folder, else the working directory)."""
    at = _where(path)

    def fail(msg: str) -> SpecError:
        return SpecError(at + msg)

    unknown_top = sorted(set(raw) - {"study", "train", "arms"})
    if unknown_top:
        raise fail(f"unknown table [{unknown_top[0]}]; a spec has [study], [train] and [arms.NAME] tables")
    study = raw.get("study")
    if not isinstance(study, dict):
        raise fail("missing [study] table; add one with at least model = \"zoo:NAME\" and seeds = 3")
    bad = sorted(set(study) - STUDY_KEYS)
    if bad:
        raise fail(f"[study] key {bad[0]!r} is unknown; known keys: {', '.join(sorted(STUDY_KEYS))}")
    if not isinstance(study.get("model"), str) or not study["model"]:
        raise fail("[study] model is missing; set model = \"zoo:NAME\" or a model file path")
    for key in ("name", "baseline"):
        if key in study and not isinstance(study[key], str):
            raise fail(f"[study] {key} must be a string, e.g. {key} = \"dense\"")
    if study.get("name") is not None and not NAME.match(study["name"]):
        raise fail("[study] name becomes a directory name (runs/study-NAME); use letters, digits, '.', '_', "
                   "'+' or '-'")
    from ..train.data import absolute_data_paths

    base_dir = base_dir if base_dir is not None else path.parent if path is not None else Path.cwd()
    seeds = _seeds(study.get("seeds"), "[study] seeds", fail, required=True)
    shared = raw.get("train", {})
    if not isinstance(shared, dict):
        raise fail("[train] must be a table of training settings, e.g. epochs = 10")
    shared = absolute_data_paths(shared, base_dir)
    arms_raw = raw.get("arms")
    if not isinstance(arms_raw, dict) or not arms_raw:
        raise fail("no arms: add at least one [arms.NAME] table with a method")
    arms: dict[str, Arm] = {}
    for arm_name, a in arms_raw.items():
        where = f"[arms.{arm_name}]"
        if not NAME.match(arm_name):
            raise fail(f"{where}: arm names become directory names; use letters, digits, '.', '_', '+' or '-'")
        if arm_name in RESERVED:
            raise fail(f"{where}: {arm_name!r} is the name of the study's own {'folder' if arm_name == LOGS else 'file'}"
                       f"; rename the arm")
        if not isinstance(a, dict):
            raise fail(f"{where} must be a table with at least method = \"...\"")
        bad = sorted(set(a) - ARM_KEYS)
        if bad:
            hint = (f" (a '.' in a table name nests tables: write [arms.\"{arm_name}.{bad[0]}\"])"
                    if isinstance(a[bad[0]], dict) else "")
            raise fail(f"{where} key {bad[0]!r} is unknown{hint}; known keys: {', '.join(sorted(ARM_KEYS))}")
        method = a.get("method")
        if not isinstance(method, str):
            raise fail(f"{where} method is missing; set method = \"sparse-random\", \"psn\", "
                       f"\"depth-multiplier\" or \"none\"")
        train_override = a.get("train", {})
        if not isinstance(train_override, dict):
            raise fail(f"{where} train must be a table, e.g. train = {{ schedule = \"rigl\" }}")
        if "seed" in shared or "seed" in train_override:
            raise fail(f"{'[train]' if 'seed' in shared else where + ' train'} sets seed; seeds come from "
                       f"[study] seeds (or an arm's seeds)")
        model = a.get("model", study["model"])
        if not isinstance(model, str) or not model:
            raise fail(f"{where} model must be a string such as \"zoo:NAME\" or a model file path")
        if model.startswith("zoo:"):
            from ..zoo import get as zoo_model

            try:
                zoo_model(model[len("zoo:"):])
            except SparsifyError as e:
                raise fail(f"{where if 'model' in a else '[study]'} model: {e}") from None
        resolved = _model_path(model, base_dir)
        file = model_file(resolved)
        if file is not None and not file.is_file():
            # found before any run starts (it failed as the arm's job, after the others had begun)
            raise fail(f"{where if 'model' in a else '[study]'} model {model}: no such file (looked next to the "
                       f"spec and in the working directory); give the model file's path or zoo:NAME")
        model_args = a.get("model_args", study.get("model_args", {}))
        arms[arm_name] = Arm(
            name=arm_name, method=method, model=resolved,
            model_args=dict(model_args) if isinstance(model_args, dict) else model_args,
            input_shape=a.get("input_shape", study.get("input_shape")),
            seeds=_seeds(a["seeds"], f"{where} seeds", fail) if "seeds" in a else list(seeds),
            transform={k: a[k] for k in sorted(TRANSFORM_KEYS) if k in a},
            train={**shared, **absolute_data_paths(train_override, base_dir)},
            series=str(a.get("series", method if "match" not in a else f"{method} (equal {a.get('count')})")),
            match=a.get("match"), count=a.get("count"),
        )
        _check_arm(arms[arm_name], where, fail)
    for arm in arms.values():
        _check_match(arm, arms, fail)
    _match_order(arms, fail)
    baseline = study.get("baseline")
    if baseline is not None and baseline not in arms:
        raise fail(f"[study] baseline {baseline!r} is not an arm; choose one of {', '.join(arms)}")
    stem = path.stem if path is not None else "study"
    return StudySpec(name=str(study.get("name") or name or stem), description=str(study.get("description", "")),
                     path=path, arms=arms, baseline=baseline, raw=raw, named=bool(study.get("name") or name),
                     base_dir=base_dir.resolve())


def _model_path(model: Any, base_dir: Path) -> str:
    """A model file named relative to the spec is resolved against the spec's folder (``file.py[:NAME]``)."""
    model = str(model)
    if model.startswith(("zoo:", "torchvision:")):
        return model
    file, sep, factory = model.partition(":")
    p = Path(file)
    if not p.is_absolute() and (base_dir / p).is_file():
        p = base_dir / p
    return str(p.resolve()) + sep + factory


def _seeds(value: Any, key: str, fail: Any, required: bool = False) -> list[int]:
    if value is None and required:
        raise fail(f"{key} is missing; set seeds = 3 (seeds 0, 1, 2) or a list such as seeds = [0, 1, 2]")
    if isinstance(value, bool):
        value = None
    if isinstance(value, int) and 1 <= value <= MAX_SEEDS:
        return list(range(value))
    if isinstance(value, int) and value > MAX_SEEDS:  # seeds = 10**13 built a list of that many
        raise fail(f"{key} = {value} runs per arm is more than a study can hold (at most {MAX_SEEDS}); "
                   f"write e.g. seeds = 5")
    if isinstance(value, list) and value and all(seed_problem(s) is None for s in value) and len(set(value)) == len(value):
        return list(value)
    raise fail(f"{key} = {value!r} is not a positive count or a list of distinct integers in [0, {MAX_SEED}]; "
               f"write e.g. seeds = 3")


def _check_arm(arm: Arm, where: str, fail: Any) -> None:
    """Validate the arm's method, transform parameters and training settings without building anything."""
    from ..methods import METHODS, check_refused, make_config
    from ..passes.base import check_fraction
    from ..profiles import resolve_params
    from ..train.trainer import TrainConfig

    if arm.method not in METHODS:
        raise fail(f"{where} method {arm.method!r} is unknown; choose one of {', '.join(METHODS)}")
    for key, example in (("match", 'match = "sparse"'), ("count", 'count = "conv"')):
        if getattr(arm, key) is not None and not isinstance(getattr(arm, key), str):
            raise fail(f"{where} {key} must be a string, e.g. {example}")
    if arm.match is not None or arm.count is not None:
        if arm.method != "depth-multiplier":
            raise fail(f"{where} match/count apply to method = \"depth-multiplier\" only")
        if arm.match is None or arm.count not in COUNTS:
            raise fail(f"{where} needs both match = \"ARM\" and count = \"conv\" or \"total\" "
                       f"(which live parameters to equalise)")
        if "alpha" in arm.transform:
            raise fail(f"{where} sets both alpha and match; drop alpha (match finds it)")
    for key, value in arm.transform.items():
        _check_type(value, _transform_type(key), f"{where} {key}", fail)
    for key, value in arm.train.items():
        _check_type(value, _train_type(key), f"{where} train setting {key}", fail)
    t = dict(arm.transform)
    if arm.match is not None:
        t["alpha"] = 0.5  # stands for the alpha the match will find
    if arm.input_shape is not None and (not isinstance(arm.input_shape, list)
                                        or not all(isinstance(d, int) and d > 0 for d in arm.input_shape)):
        raise fail(f"{where} input_shape must be a list of positive integers such as [1, 3, 32, 32]")
    if not isinstance(arm.model_args, dict):
        raise fail(f"{where} model_args must be a table, e.g. model_args = {{ hidden = [300, 100] }}")
    try:
        check_refused(arm.method, t)
        if arm.method in ("sparse-random", "psn"):
            if t.get("density") is None:
                raise UsageError(f"{arm.method} needs density = a fraction in (0, 1]")
            check_fraction(t["density"], "density", "0.1")
        if arm.method == "psn":
            resolve_params(t.get("profile") or "lognormal", t.get("profile_params"))
        if arm.method == "depth-multiplier":
            if t.get("alpha") is None:
                raise UsageError("depth-multiplier needs alpha = a fraction in (0, 1], or match = \"ARM\" and count")
            check_fraction(t["alpha"], "alpha", "0.5")
        make_config(arm.method, **t)
    except UsageError as e:
        raise fail(f"{where} {_spec_words(str(e))}") from None
    try:
        TrainConfig.from_dict({**arm.train, "seed": 0}).validate()
    except UsageError as e:
        raise fail(f"{where} training settings ([train] and the arm's train): {_spec_words(str(e))}") from None


_EXAMPLES = {"float": "0.1", "int": "10", "str": '"text"', "bool": "true", "dict": "{ sigma = 1.0 }"}


def _field_kinds(fields: Any) -> dict[str, str | None]:
    """The basic TOML type each field takes, from its annotation (errors.annotation_kind)."""
    return {f.name: annotation_kind(f.type) for f in fields}


def _transform_type(key: str) -> str | None:
    """The basic TOML type a method option takes (its field in the methods' configs)."""
    from ..methods import METHODS

    for cls in METHODS.values():
        kinds = _field_kinds(dataclasses.fields(cls))
        if key in kinds:
            return kinds[key]
    return None


def _train_type(key: str) -> str | None:
    """The basic TOML type a TrainConfig field takes (None: unknown key, left to TrainConfig to refuse)."""
    from ..train.trainer import TrainConfig

    return _field_kinds(TrainConfig.setting_fields()).get(key)


def _check_type(value: Any, kind: str | None, key: str, fail: Any) -> None:
    # a table of numbers (profile parameters), else the kind's own test
    ok = kind is None or (is_kind(value, kind) and (kind != "dict" or all(is_kind(v, "float") for v in value.values())))
    if not ok:
        what = {"dict": "a table of numbers", "int": "an int"}.get(kind or "", f"a {kind}")
        raise fail(f"{key} = {value!r} is not {what}; "
                   f"write e.g. {key.split()[-1]} = {_EXAMPLES[kind or 'str']}")


def _spec_words(message: str) -> str:
    """Name spec keys, not CLI flags, in a message written for the command line (--lr-schedule -> lr_schedule)."""
    return re.sub(r"--([a-z][a-z-]*)", lambda m: m.group(1).replace("-", "_"), message)


def _check_match(arm: Arm, arms: dict[str, Arm], fail: Any) -> None:
    if arm.match is None:
        return
    where = f"[arms.{arm.name}]"
    if arm.match not in arms:
        raise fail(f"{where} match = {arm.match!r} is not an arm; choose one of "
                   f"{', '.join(a for a in arms if a != arm.name)}")
    missing = sorted(set(arm.seeds) - set(arms[arm.match].seeds))
    if missing:
        raise fail(f"{where} seed {missing[0]} has no run in arm {arm.match!r} to match; give both arms the same seeds")


def _match_order(arms: dict[str, Arm], fail: Any = None) -> list[str]:
    """Arm names in spec order, each after the arm it matches; a cycle is a SpecError."""
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(name: str, chain: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            msg = f"[arms.{name}] match forms a cycle ({' -> '.join(chain + [name])}); one arm must set alpha"
            raise (fail(msg) if fail else SpecError(msg))
        state[name] = 1
        target = arms[name].match
        if target is not None and target in arms:
            visit(target, chain + [name])
        state[name] = 2
        order.append(name)

    for name in arms:
        visit(name, [])
    return order
