"""A tuned configuration made into a module: `graphopt.optimize(model, **config)`; when the configuration
fine-tunes: optimize without int8 (pruning), `graphopt.finetune` from the original as teacher, then the
config's int8 scheme at O2 on the tuned graph (int8 kernels have no gradient; the demo's order). The one code path of `graphopt.tune`'s trials and of
`graphopt optimize --config best.json`, so a saved configuration rebuilds the module its trial measured.

The file `graphopt tune` writes (and `--config` reads):

    {"optimize": {"level": "O3", "quantize": "int8-dynamic", "prune": 0.41, …},
     "finetune": {"epochs": 2} | null,
     "trial": 17, "score": 98.2, "reference_score": 98.4, "latency_ratio": 0.61, …}

`--config` also takes a plain dict of optimize keywords.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..errors import InputError, OptionError

#: Options a configuration may not carry: they are data or callbacks, given by the caller at build time.
NOT_CONFIG = ("calibration_data", "on_record", "progress", "measure_latency", "reproducer_dir")


def build(model: Any, example_inputs: tuple, config: Mapping[str, Any], finetune: Mapping[str, Any] | None = None,
          *, example_kwargs: Mapping[str, Any] | None = None, calibration_data: Iterable[Any] | None = None,
          train_data: Iterable[Any] | None = None, on_epoch: Callable[[int, Any], None] | None = None,
          progress: bool = False, **run_options: Any) -> Any:
    """The module `config` (optimize kwargs) and `finetune` (finetune kwargs, or None) make of `model`.

    run_options: optimize options that do not change the result (measure_latency, on_record,
    reproducer_dir); measure_latency is off unless given (the tuned configs turn speed_check off)."""
    from ..api import optimize
    bad = sorted(set(config) & set(NOT_CONFIG))
    if bad:
        raise OptionError(f"a tuned configuration cannot set {', '.join(bad)}: they are given at build time")
    options = {"measure_latency": False, **run_options, **config}
    common = {"example_kwargs": example_kwargs, "calibration_data": calibration_data, "progress": progress}
    if not finetune:
        return optimize(model, example_inputs, **common, **options)
    if train_data is None:
        raise InputError("this configuration fine-tunes: give train_data (or --calibration on the command line, "
                         "used as inputs for distillation from the original)")
    from ..training.finetuning import finetune as run_finetune
    scheme = options.get("quantize")
    float_options = {k: v for k, v in options.items() if k != "quantize_options"}
    opt = optimize(model, example_inputs, **common, **{**float_options, "quantize": None})
    tuned = run_finetune(opt, train_data, teacher=model, progress=progress, on_epoch=on_epoch, **dict(finetune))
    if not scheme:
        return tuned
    # int8 after the fine-tune, as the demo does (int8 kernels have no gradient): O2 on the tuned graph
    int8_options = {k: v for k, v in options.items() if k not in ("prune", "prune_options")}
    return optimize(tuned, example_inputs, **common, **{**int8_options, "level": "O2"})


def load(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(optimize kwargs, finetune kwargs or None) from a file `graphopt tune` wrote, or a plain kwargs dict."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"cannot read the configuration {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"the configuration {path} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"the configuration {path} must be a JSON object, got {type(data).__name__}")
    if "optimize" in data:
        config, finetune = data["optimize"], data.get("finetune")
        if not isinstance(config, dict) or not (finetune is None or isinstance(finetune, dict)):
            raise InputError(f"the configuration {path}: 'optimize' must be an object and 'finetune' an object "
                             "or null")
        return config, finetune
    return data, None
