"""The search space of ``roost tune``: which settings a trial varies, and over what.

A space maps a setting path (``train.lr``, ``model.embed_dim``) to one distribution::

    train.lr: {type: float, low: 1.0e-4, high: 3.0e-2, log: true}
    model.embed_dim: {type: categorical, choices: [32, 64, 128]}
    model.ngram: {type: int, low: 1, high: 3}

It is data (pydantic models), validated before any trial starts: an unknown setting, an
empty range, a log range reaching 0 or a value the setting itself would refuse is one
error naming the field. Only ``model.*`` and ``train.*`` settings are tunable; data and
tracking settings stay fixed so every trial sees the same split.

This module imports no optuna: :func:`suggest` takes the trial object it is given.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from roost.errors import ConfigError

TUNABLE_SECTIONS = ("model", "train")
# Settings that make no sense to search over (they change where or how, not what is learnt).
FIXED = frozenset(
    {
        "model.arch",
        "train.device",
        "train.amp",
        "train.num_threads",
        "train.checkpoint_dir",
        "train.seed",
    }
)

Scalar = int | float | str | bool


class _Param(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FloatParam(_Param):
    """A float in [low, high], on a log scale if ``log`` (or in steps of ``step``)."""

    type: Literal["float"] = "float"
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _range(self) -> FloatParam:
        _check_range(self.low, self.high, self.log, self.step)
        return self


class IntParam(_Param):
    """An integer in [low, high] (inclusive), in steps of ``step`` or on a log scale."""

    type: Literal["int"] = "int"
    low: int
    high: int
    log: bool = False
    step: int = Field(1, gt=0)

    @model_validator(mode="after")
    def _range(self) -> IntParam:
        _check_range(self.low, self.high, self.log, self.step if self.step != 1 else None)
        return self


class CategoricalParam(_Param):
    """One of ``choices``."""

    type: Literal["categorical"] = "categorical"
    choices: list[Scalar] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct(self) -> CategoricalParam:
        if len({repr(c) for c in self.choices}) != len(self.choices):
            raise ValueError("choices must be distinct")
        return self


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]
_SPACE = TypeAdapter(dict[str, Param])


def _check_range(low: float, high: float, log: bool, step: float | None) -> None:
    if not math.isfinite(low) or not math.isfinite(high):
        raise ValueError("low and high must be finite")
    if low > high:
        raise ValueError(f"low ({low:g}) is above high ({high:g})")
    if log and low <= 0:
        raise ValueError(f"a log scale needs low > 0 (got {low:g})")
    if log and step is not None:
        raise ValueError("log and step cannot be combined")


def default_space() -> dict[str, Param]:
    """The model's real knobs, around the defaults of ``roost train``."""
    return {
        "train.lr": FloatParam(low=3e-4, high=3e-2, log=True),
        "train.weight_decay": FloatParam(low=1e-6, high=1e-2, log=True),
        "train.batch_size": CategoricalParam(choices=[32, 64, 128, 256]),
        "train.epochs": IntParam(low=4, high=12),
        "model.embed_dim": CategoricalParam(choices=[32, 64, 128]),
        "model.ngram": IntParam(low=1, high=3),
        "model.max_vocab": CategoricalParam(choices=[50_000, 100_000, 200_000]),
        "model.dropout": FloatParam(low=0.0, high=0.5),
    }


def validate_space(raw: Any, source: str = "space") -> dict[str, Param]:
    """Parse and check a space (a mapping) or raise one :class:`ConfigError` naming the field."""
    from roost.config import ModelSettings, TrainSettings

    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: expected a mapping of setting -> distribution")
    try:
        space = _SPACE.validate_python(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"] if p not in ("float", "int", "categorical"))
        raise ConfigError(f"{source}: {where}: {err['msg']}") from None
    sections: dict[str, type[BaseModel]] = {"model": ModelSettings, "train": TrainSettings}
    for name, param in space.items():
        section, _, key = name.partition(".")
        if section not in TUNABLE_SECTIONS or key not in sections[section].model_fields:
            raise ConfigError(
                f"{source}: {name}: not a tunable setting (model.* or train.* fields, e.g. "
                "train.lr, model.embed_dim)"
            )
        if name in FIXED:
            raise ConfigError(f"{source}: {name}: fixed for every trial, not searchable")
        for value in _extremes(param):
            try:
                sections[section].model_validate({key: value})
            except ValidationError as exc:
                msg = exc.errors()[0]["msg"]
                raise ConfigError(
                    f"{source}: {name}: {value!r} is not a valid value: {msg}"
                ) from None
    return space


def load_space(path: Path) -> dict[str, Param]:
    """Read a YAML space file (``--space``); the top level may be the space or ``{space: ...}``."""
    import yaml

    if not path.is_file():
        raise ConfigError(f"--space {path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"--space {path}: not valid YAML: {first}") from None
    if isinstance(raw, dict) and set(raw) == {"space"}:
        raw = raw["space"]
    return validate_space(raw, f"--space {path}")


def _extremes(param: Param) -> list[Scalar]:
    if isinstance(param, CategoricalParam):
        return list(param.choices)
    return [param.low, param.high]


class TrialLike(Protocol):
    """The part of ``optuna.Trial`` that :func:`suggest` uses."""

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = ..., log: bool = ...
    ) -> float: ...
    def suggest_int(
        self, name: str, low: int, high: int, *, step: int = ..., log: bool = ...
    ) -> int: ...
    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


def suggest(trial: TrialLike, space: dict[str, Param]) -> dict[str, Any]:
    """One value per parameter, drawn through the trial's sampler: ``{"train.lr": 0.003, ...}``."""
    values: dict[str, Any] = {}
    for name, param in space.items():
        if isinstance(param, FloatParam):
            values[name] = trial.suggest_float(
                name, param.low, param.high, step=param.step, log=param.log
            )
        elif isinstance(param, IntParam):
            values[name] = trial.suggest_int(
                name, param.low, param.high, step=param.step, log=param.log
            )
        else:
            values[name] = trial.suggest_categorical(name, param.choices)
    return values


def grid(space: dict[str, Param]) -> dict[str, list[Scalar]]:
    """The values a grid search tries per parameter (floats need a ``step``)."""
    out: dict[str, list[Scalar]] = {}
    for name, param in space.items():
        if isinstance(param, CategoricalParam):
            out[name] = list(param.choices)
        elif isinstance(param, IntParam):
            if param.log:
                raise ConfigError(
                    f"--sampler grid: {name}: a log-scale int has no grid; use choices"
                )
            out[name] = list(range(param.low, param.high + 1, param.step))
        else:
            if param.step is None:
                raise ConfigError(
                    f"--sampler grid: {name}: a float range needs a step (or use choices)"
                )
            count = math.floor((param.high - param.low) / param.step + 1e-9) + 1
            out[name] = [round(param.low + i * param.step, 12) for i in range(count)]
    return out


def grid_size(space: dict[str, Param]) -> int:
    return math.prod(len(v) for v in grid(space).values())


def overrides(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"train.lr": 0.01}`` -> ``{"train": {"lr": 0.01}}`` (settings overrides)."""
    out: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        section, _, key = name.partition(".")
        out.setdefault(section, {})[key] = value
    return out


def dump(space: dict[str, Param]) -> dict[str, Any]:
    """JSON-able form (for env variables and the parent run's artifacts)."""
    return {name: param.model_dump(exclude_defaults=False) for name, param in space.items()}
