"""The int8 options, validated once: `quantize=`, `calibration_data=`, `accuracy_budget=`, `quantize_options=`.

    quantize            "int8-dynamic"      W8A8, activations quantized per token at run time
                        "int8-static"       W8A8, one activation scale per layer from calibration
                        "int8-weight-only"  W8A16: int8 weights, float activations
                        "int4-weight-only"  W4A16: group-wise int4 weights (int4.py), float activations;
                                            the output head (lm_head) int8 per channel, embeddings int8 rows
    calibration_data    an iterable of batches (read once, at most `max_calibration_batches`):
                        a tensor (the model's one positional input), a tuple/list of positional
                        inputs, a dict of keyword inputs, or an (inputs, labels) pair as a
                        DataLoader yields it: a tuple/list longer than the model's positional
                        inputs is cut to them (the rest are labels). Required by "int8-static",
                        SmoothQuant and `accuracy_budget`.
    accuracy_budget     0.01                 the outputs' cosine similarity to the float model
                                             on the calibration data stays ≥ 1 − 0.01
                        ("sqnr", 30.0)        the outputs' SQNR stays ≥ 30 dB
                        (metric, 0.5)         metric(module) -> float, higher is better (e.g. your
                                             accuracy on your data): it may drop by at most 0.5
    quantize_options    observer             "minmax" | "moving_average" | "percentile" | "mse"
                                             (static activation scales; default "mse")
                        percentile           for observer="percentile" (default 99.99)
                        averaging_constant   for observer="moving_average" (default 0.01)
                        weight_observer      "minmax" | "mse" per-channel weight clipping (default "minmax")
                        weight_bits          7 | 8 (default: 7 for weights on the CPU, whose int8 GEMM is
                                             exact and fast only with 7-bit weights without VNNI; 8 elsewhere)
                        smoothquant          True | False (default: True for W8A8 with calibration data)
                        alpha                SmoothQuant migration strength in [0, 1], or "search"
                                             (per layer group on calibration data; default)
                        alpha_grid           the α values "search" tries (default 0.3 … 0.85)
                        min_in_features      layers with in_features ≤ this stay float (default 16)
                        exclude              fnmatch patterns of layer names that stay float
                        max_calibration_batches  (default 32)
                        group_size           int4: columns per scale and zero point, 32 | 64 | 128 (default 128)
                        awq                  int4: activation-aware scale search on calibration_data
                                             (default: True when calibration_data is given)
                        head                 int4: the output head (last linear before an output, e.g.
                                             lm_head): "int8" weight-only per channel (default) | "float"
                                             | "int4"
                        layer_speed          True | False: time each layer's int8 form against the float layer
                                             here and keep the slower ones float (layer_speed.py); default:
                                             where speed_check is on
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from graphopt.errors import InputError, OptionError
from graphopt.engine.schemes import NAMES
from graphopt.engine.speed import SpeedCheck

from .observers import OBSERVERS, WEIGHT_OBSERVERS, default_weight_bits

SCHEMES = NAMES
WEIGHT_ONLY = ("int8-weight-only", "int4-weight-only")
GROUP_SIZES = (32, 64, 128)
HEAD_POLICIES = ("int8", "float", "int4")
DEFAULT_ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85)
#: Cosine the int8 pass must keep when no accuracy_budget is given: per-token / per-channel int8 on
#: sane models stays above 0.999; a wrong scale, channel or epilogue falls far below 0.99.
DEFAULT_MIN_COSINE = 0.99
#: The same for int4 weights: RTN noise is ~0.1 of a weight's rms (one layer's output SQNR ~19 dB,
#: cosine ~0.993), which compounds over a decoder's layers; a wrong code, nibble or group gives far below 0.9.
DEFAULT_MIN_COSINE_INT4 = 0.95


@dataclass(frozen=True)
class Fidelity:
    """What "accurate enough" means: a default metric with a threshold, or the user's metric."""
    kind: str                                   # "cosine" | "sqnr" | "metric"
    threshold: float                            # cosine ≥, SQNR dB ≥, or allowed drop of metric
    metric: Callable[[Any], float] | None = None

    def describe(self) -> str:
        if self.kind == "cosine":
            return f"output cosine ≥ {self.threshold:g}"
        if self.kind == "sqnr":
            return f"output SQNR ≥ {self.threshold:g} dB"
        return f"{getattr(self.metric, '__name__', 'metric')} drop ≤ {self.threshold:g}"


@dataclass
class QuantConfig:
    scheme: str
    batches: list[Any] = field(default_factory=list)   # raw calibration items, normalized per graph
    fidelity: Fidelity | None = None
    observer: str = "mse"
    percentile: float = 99.99
    averaging_constant: float = 0.01
    weight_observer: str = "minmax"
    weight_bits: int | None = None                      # None: chosen by the weight's device (weight_bits_for)
    smoothquant: bool = False
    alpha: float | str = "search"
    alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID
    min_in_features: int = 16
    exclude: tuple[str, ...] = ()
    max_calibration_batches: int = 32
    progress: bool = True
    speed: SpeedCheck | None = None   # times each layer: those whose int8 form is slower here stay float
    layer_speed: bool | None = None   # see the module docstring; parse() turns it into `speed`
    group_size: int = 128
    awq: bool = False
    head: str = "int8"

    @property
    def w8a8(self) -> bool:
        return self.scheme not in WEIGHT_ONLY

    def weight_bits_for(self, device: torch.device) -> int:
        """The `weight_bits` knob, else `observers.default_weight_bits` for the weight's device."""
        return self.weight_bits if self.weight_bits is not None else default_weight_bits(device, self.w8a8)


KNOBS = ("observer", "percentile", "averaging_constant", "weight_observer", "weight_bits", "smoothquant", "alpha",
         "alpha_grid", "min_in_features", "exclude", "max_calibration_batches", "group_size", "awq", "head",
         "layer_speed")
INT4_KNOBS = ("group_size", "awq", "head")


def parse(options: Any) -> QuantConfig:
    """Validate the int8 options of `graphopt.Options`; raises OptionError / InputError."""
    scheme = options.quantize
    if scheme not in SCHEMES:
        raise OptionError(f"quantize={scheme!r}: choose one of {', '.join(SCHEMES)}")
    knobs = dict(options.quantize_options or {})
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise OptionError(f"unknown quantize_options key(s): {', '.join(unknown)}; known: {', '.join(KNOBS)}")
    config = QuantConfig(scheme=scheme, progress=getattr(options, "progress", True),
                         speed=getattr(options, "speed_check", None))
    _set_knobs(config, knobs)
    if config.layer_speed is False:
        config.speed = None
    elif config.layer_speed and config.speed is None:
        config.speed = SpeedCheck()
    if options.calibration_data is not None:
        config.batches = _read_batches(options.calibration_data, config.max_calibration_batches)
    config.fidelity = parse_budget(options.accuracy_budget)
    has_data = bool(config.batches)
    smooth = knobs.get("smoothquant")
    if smooth and not config.w8a8:
        raise OptionError(f"smoothquant applies to W8A8 schemes (int8-dynamic, int8-static), not {scheme}")
    int4_only = sorted(set(knobs) & set(INT4_KNOBS))
    if int4_only and scheme != "int4-weight-only":
        raise OptionError(f"quantize_options {', '.join(int4_only)} apply to quantize='int4-weight-only', not {scheme}")
    if knobs.get("awq") and not has_data:
        raise OptionError("awq=True needs calibration_data= (it weighs weight columns by their activations)")
    if scheme == "int4-weight-only" and "awq" not in knobs:
        config.awq = has_data
    if smooth and not has_data:
        raise OptionError("smoothquant=True needs calibration_data= (it measures activation ranges)")
    config.smoothquant = config.w8a8 and has_data if smooth is None else bool(smooth)
    if scheme == "int8-static" and not has_data:
        raise OptionError('quantize="int8-static" needs calibration_data= to choose the activation scales')
    if config.fidelity is not None and not has_data:
        raise OptionError("accuracy_budget= needs calibration_data= to measure each layer's sensitivity")
    return config


def _set_knobs(config: QuantConfig, knobs: dict[str, Any]) -> None:
    def check(name: str, ok: bool, what: str) -> None:
        if not ok:
            raise OptionError(f"quantize_options[{name!r}]={knobs[name]!r}: {what}")

    if "observer" in knobs:
        check("observer", knobs["observer"] in OBSERVERS, f"choose one of {', '.join(OBSERVERS)}")
    if "weight_observer" in knobs:
        check("weight_observer", knobs["weight_observer"] in WEIGHT_OBSERVERS,
              f"choose one of {', '.join(WEIGHT_OBSERVERS)}")
    if "weight_bits" in knobs:
        check("weight_bits", knobs["weight_bits"] in (7, 8) and not isinstance(knobs["weight_bits"], bool),
              "7 or 8")
    if "percentile" in knobs:
        check("percentile", _number(knobs["percentile"]) and 50 < knobs["percentile"] <= 100, "a number in (50, 100]")
    if "averaging_constant" in knobs:
        check("averaging_constant", _number(knobs["averaging_constant"]) and 0 < knobs["averaging_constant"] <= 1,
              "a number in (0, 1]")
    for name in ("smoothquant", "layer_speed"):
        if name in knobs:
            check(name, isinstance(knobs[name], bool), "True or False")
    if "alpha" in knobs:
        alpha = knobs["alpha"]
        check("alpha", alpha == "search" or (_number(alpha) and 0 <= alpha <= 1), 'a number in [0, 1] or "search"')
    if "alpha_grid" in knobs:
        grid = knobs["alpha_grid"]
        check("alpha_grid", isinstance(grid, (list, tuple)) and len(grid) > 0
              and all(_number(a) and 0 <= a <= 1 for a in grid), "a non-empty list of numbers in [0, 1]")
        knobs["alpha_grid"] = tuple(grid)
    for name in ("min_in_features", "max_calibration_batches"):
        if name in knobs:
            value = knobs[name]
            check(name, isinstance(value, int) and not isinstance(value, bool)
                  and value >= (0 if name == "min_in_features" else 1), "a non-negative integer"
                  if name == "min_in_features" else "a positive integer")
    if "group_size" in knobs:
        check("group_size", knobs["group_size"] in GROUP_SIZES and not isinstance(knobs["group_size"], bool),
              f"one of {', '.join(map(str, GROUP_SIZES))}")
    if "awq" in knobs:
        check("awq", isinstance(knobs["awq"], bool), "True or False")
    if "head" in knobs:
        check("head", knobs["head"] in HEAD_POLICIES, f"one of {', '.join(HEAD_POLICIES)}")
    if "exclude" in knobs:
        patterns = knobs["exclude"]
        if isinstance(patterns, str):
            patterns = (patterns,)
        check("exclude", isinstance(patterns, (list, tuple)) and all(isinstance(p, str) for p in patterns),
              "a pattern or a list of fnmatch patterns")
        knobs["exclude"] = tuple(patterns)
    for name, value in knobs.items():
        setattr(config, name, value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_batches(data: Iterable[Any], limit: int) -> list[Any]:
    try:
        iterator = iter(data)
    except TypeError as exc:
        raise InputError(f"calibration_data must be an iterable of batches, got {type(data).__name__}") from exc
    batches = []
    for item in iterator:
        batches.append(item)
        if len(batches) >= limit:
            break
    if not batches:
        raise InputError("calibration_data is empty: give at least one batch of example inputs")
    return batches


def parse_budget(budget: Any) -> Fidelity | None:
    if budget is None:
        return None
    if _number(budget):
        if not 0 <= budget < 1:
            raise OptionError(f"accuracy_budget={budget!r}: a cosine tolerance in [0, 1) (0.01 keeps cosine ≥ 0.99)")
        return Fidelity("cosine", 1.0 - float(budget))
    if isinstance(budget, tuple) and len(budget) == 2:
        what, tolerance = budget
        if what == "sqnr" and _number(tolerance):
            return Fidelity("sqnr", float(tolerance))
        if callable(what) and _number(tolerance) and tolerance >= 0:
            return Fidelity("metric", float(tolerance), what)
    raise OptionError(f"accuracy_budget={budget!r}: give a cosine tolerance (0.01), ('sqnr', dB) "
                      "or (metric, allowed_drop) with metric(module) -> float, higher is better")
