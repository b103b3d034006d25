"""Options of `graphopt.optimize`, validated once, in one place.

Levels: O0 capture only · O1 lossless rewrites · O2 + int8 · O3 + pruning.
When `level` is not given it follows the other options: `prune` implies O3,
`quantize` implies O2, otherwise O1. `quantize="auto"` (the default) means
"int8-dynamic" at O2 and O3 and no int8 below; `quantize=None` keeps the
model float at any level (e.g. O3 pruning alone, before `finetune`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

from ..errors import OptionError
from .schemes import NAMES
from .speed import SpeedCheck, parse_speed_check

LEVELS = {"O0": 0, "O1": 1, "O2": 2, "O3": 3}
QUANT_SCHEMES = NAMES
AUTO = "auto"
BACKENDS = (None, "eager", "inductor")
KV_CACHES = (None, "int8")
#: The operators `export_onnx(ops=…)` writes: the default ONNX domain only, or ONNX Runtime's contrib operators too.
EXPORT_OPS = ("standard", "onnxruntime")


@dataclass
class Options:
    level: int = 1
    quantize: str | None = None
    prune: float | Mapping[str, float] | None = None
    calibration_data: Iterable[Any] | None = None
    accuracy_budget: float | tuple[Callable[..., float], float] | None = None
    verify: bool = True
    verify_samples: int = 2
    enable: tuple[str, ...] = ()
    disable: tuple[str, ...] = ()
    backend: str | None = None
    reproducer_dir: str | os.PathLike | None = None
    measure_latency: bool = True
    speed_check: SpeedCheck | None = None    # parsed from True/False/dict; on by default while timing is on
    on_record: Callable[[Any], None] | None = None   # called with each pass's PassRecord as it is made
    progress: bool = True
    seed: int = 0
    quantize_options: dict[str, Any] = field(default_factory=dict)  # validated by passes/quantize
    prune_options: dict[str, Any] = field(default_factory=dict)     # validated by passes/pruning
    generation: bool = False                 # capture a causal LM's decoder step for generate() (graphopt.llm)
    max_cache_len: int | None = None         # the static KV cache's length in tokens (generation only)
    kv_cache: str | None = None              # "int8": keys and values stored int8 per head (generation only)
    kv_cache_budget: float = 0.99            # an int8 cache's least next-token-logits cosine to the float cache

    @property
    def level_name(self) -> str:
        return f"O{self.level}"


def parse_options(level: str | int | None = None, quantize: str | None = AUTO,
                  prune: float | Mapping[str, float] | None = None, **rest: Any) -> Options:
    """Validate user options and fill in what they imply."""
    if quantize not in (None, AUTO, *QUANT_SCHEMES):
        raise OptionError(f"quantize={quantize!r} is not a scheme; choose one of {', '.join(QUANT_SCHEMES)} or None")
    _check_prune(prune)
    explicit = quantize if quantize != AUTO else None
    if level is None:
        numeric = 3 if prune is not None else 2 if explicit is not None else 1
    else:
        numeric = parse_level(level)
    if explicit is not None and numeric < 2:
        raise OptionError(f"quantize={quantize!r} needs level O2 or O3, not O{numeric}")
    if prune is not None and numeric < 3:
        raise OptionError(f"prune={prune!r} needs level O3, not O{numeric}")
    if quantize == AUTO:
        quantize = "int8-dynamic" if numeric >= 2 else None
    backend = rest.get("backend")
    if backend not in BACKENDS:
        raise OptionError(f"backend={backend!r}: choose None/'eager' or 'inductor'")
    for name in ("enable", "disable"):
        value = rest.get(name) or ()
        if isinstance(value, str):
            value = (value,)
        rest[name] = tuple(value)
    known = set(Options.__dataclass_fields__)
    unknown = sorted(set(rest) - known)
    if unknown:
        raise OptionError(f"unknown option(s): {', '.join(unknown)}")
    measure_latency = rest.get("measure_latency", True)
    if "speed_check" in rest:
        rest["speed_check"] = parse_speed_check(rest["speed_check"], measure_latency)
    else:   # default: on, unless the caller turned timing off
        rest["speed_check"] = SpeedCheck() if measure_latency else None
    _check_generation(rest.get("generation", False), rest.get("max_cache_len"))
    _check_kv_cache(rest.get("generation", False), rest.get("kv_cache"),
                    rest.get("kv_cache_budget", Options.kv_cache_budget))
    if rest.get("on_record") is not None and not callable(rest["on_record"]):
        raise OptionError(f"on_record={rest['on_record']!r} must be a callable taking a PassRecord")
    if isinstance(rest.get("calibration_data"), Iterator):   # a generator is read once: keep its batches
        rest["calibration_data"] = list(rest["calibration_data"])
    return Options(level=numeric, quantize=quantize, prune=prune, **rest)


def parse_level(level: str | int) -> int:
    if isinstance(level, int) and not isinstance(level, bool) and 0 <= level <= 3:
        return level
    if isinstance(level, str) and level.upper() in LEVELS:
        return LEVELS[level.upper()]
    raise OptionError(f"level={level!r}: choose one of O0 (capture only), O1 (lossless), O2 (+ int8), O3 (+ pruning)")


def _check_generation(generation: Any, max_cache_len: Any) -> None:
    if not isinstance(generation, bool):
        raise OptionError(f"generation={generation!r} must be True or False")
    if max_cache_len is None:
        return
    if not generation:
        raise OptionError("max_cache_len= applies to generation=True only")
    if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
        raise OptionError(f"max_cache_len={max_cache_len!r} must be a positive int (tokens)")


def _check_kv_cache(generation: bool, kv_cache: Any, budget: Any) -> None:
    if kv_cache not in KV_CACHES:
        raise OptionError(f"kv_cache={kv_cache!r}: choose None (the model's dtype) or 'int8'")
    if kv_cache is not None and not generation:
        raise OptionError("kv_cache= applies to generation=True only")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise OptionError(f"kv_cache_budget={budget!r} must be a cosine in (0, 1]")


def _check_prune(prune: Any) -> None:
    if prune is None:
        return
    ratios = prune.values() if isinstance(prune, Mapping) else [prune]
    for ratio in ratios:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise OptionError(f"prune ratio {ratio!r} must be a number in [0, 1)")
