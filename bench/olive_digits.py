"""Olive's search on the digits CNN, for bench/tune.py: the same model, data (512 calibration images in batches
of 64), budget and number of search points as `graphopt.tune` with target="onnxruntime".

Olive (olive-ai) loads its model, data and metric from a user script; this module is that script
(`load_model`, the `digits_calibration` and `digits_test` datasets) and runs the workflow (`search`). Olive's
own accuracy metric (torchmetrics, on the test split) carries the budget as an absolute accuracy goal:

    PyTorch model ─ OnnxConversion ─ OnnxPeepholeOptimizer ─ OnnxQuantization (searched: dynamic or static,
    per-channel, formats, calibration method, …) ─ ranked by latency (Olive's ONNX Runtime timer), candidates
    within the accuracy goal (at most `budget` points below the original) only.

Olive's best candidate is then scored and timed by bench/tune.py itself, as every other row. Two workarounds
for olive-ai 0.13.0 are applied here and named where they are made: its footprint's update by field alias,
which pydantic ≥ 2.12 refuses, and a search bound by `max_iter` (its `max_samples` did not stop the search).
"""
from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SCRIPT = Path(__file__).resolve()
CALIBRATION_SAMPLES = 512   # in batches of 64: what graphopt.tune calibrates on (bench/tune.py)
LOG_LEVEL = 2           # Olive's logger: 0 verbose … 4 fatal (2: its warnings name each failed search point)
TIME_LIMIT_S = 600


@functools.lru_cache(maxsize=1)
def _digits() -> Any:
    """The trained digits CNN and its data split, loaded once per process (model loader and datasets share it)."""
    from graphopt.data.zoo import trained_digits_resnet
    return trained_digits_resnet(progress=False)


def load_model(model_path: str | None = None) -> Any:
    """Olive's model_loader: the trained digits CNN (bundled weights)."""
    return _digits()[0].eval()


try:
    from olive.data.registry import Registry
except ImportError:         # olive-ai not installed: bench/tune.py says why and never calls search()
    Registry = None

if Registry is not None:
    @Registry.register_dataset()
    def digits_calibration(data_name: str | None = None, **kwargs: Any) -> list[tuple[dict[str, np.ndarray], int]]:
        """({"x": image}, label) pairs from the training split: calibration for static quantization (Olive's
        calibration reader takes only named inputs), latency inputs."""
        data = _digits()[1]
        return [({"x": data.x_train[i].numpy()}, int(data.y_train[i])) for i in range(CALIBRATION_SAMPLES)]

    @Registry.register_dataset()
    def digits_test(data_name: str | None = None, **kwargs: Any) -> list[tuple[dict[str, np.ndarray], int]]:
        """The test split, which bench/tune.py's accuracy reads too."""
        data = _digits()[1]
        return [({"x": data.x_test[i].numpy()}, int(data.y_test[i])) for i in range(len(data.y_test))]


def search(min_accuracy: float, trials: int, example_shape: tuple[int, ...], workdir: str | None = None) -> dict[str, Any]:
    """Run Olive's joint TPE search with the accuracy goal `min_accuracy` (percent: the original's accuracy less
    the budget); returns the best candidate's ONNX path, its config and the wall time.

    The evaluator is typed (`OnnxEvaluator`) and the input model is not evaluated: Olive 0.13.0 fails on an
    untyped evaluator config (its resource scan calls `None.lower()` on the evaluator's `type`), and a typed
    ONNX evaluator cannot score the PyTorch input, so the goal is the equivalent absolute threshold instead of
    a max-degradation relative to the input."""
    from olive import run as olive_run
    workdir = workdir or tempfile.mkdtemp(prefix="olive-digits-")
    calibration = {"name": "digits", "user_script": str(SCRIPT),
                   "load_dataset_config": {"type": "digits_calibration"}, "dataloader_config": {"batch_size": 64}}
    test = {"name": "digits_test", "user_script": str(SCRIPT), "load_dataset_config": {"type": "digits_test"},
            "post_process_data_config": {"type": "text_classification_post_process"},
            "dataloader_config": {"batch_size": 64}}
    config = {
        "input_model": {"type": "PyTorchModel", "model_script": str(SCRIPT), "model_loader": "load_model",
                        "io_config": {"input_names": ["x"], "input_shapes": [list(example_shape)],
                                      "output_names": ["logits"],
                                      "dynamic_axes": {"x": {"0": "batch"}, "logits": {"0": "batch"}}}},
        "systems": {"local": {"type": "LocalSystem", "accelerators": [
            {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
        "data_configs": [calibration, test],
        "evaluators": {"digits": {"type": "OnnxEvaluator", "metrics": [
            {"name": "accuracy", "type": "accuracy", "data_config": "digits_test",
             "sub_types": [{"name": "accuracy_score", "priority": 2, "goal": {"type": "threshold",
                                                                              "value": min_accuracy / 100},
                            "metric_config": {"task": "multiclass", "num_classes": 10}}]},
            {"name": "latency", "type": "latency", "data_config": "digits",
             "sub_types": [{"name": "avg", "priority": 1}]}]}},
        "passes": {"conversion": {"type": "OnnxConversion", "target_opset": 17},
                   "peephole": {"type": "OnnxPeepholeOptimizer"},
                   "quantization": {"type": "OnnxQuantization", "data_config": "digits"}},
        # max_samples alone did not stop Olive 0.13.0's joint search (a 4-sample try ran ~30 search points in
        # 15 min); max_iter counts every point it draws, max_time ends it with its best so far before our limit
        "search_strategy": {"execution_order": "joint", "sampler": "tpe", "max_samples": trials, "seed": 0,
                            "max_iter": trials, "max_time": TIME_LIMIT_S - 120},
        "evaluator": "digits", "host": "local", "target": "local",
        "cache_dir": str(Path(workdir) / "cache"), "output_dir": str(Path(workdir) / "output"),
        "log_severity_level": LOG_LEVEL, "evaluate_input_model": False,
    }
    _set_footprint_fields_by_alias()
    start = time.perf_counter()
    output = olive_run(config)
    wall = time.perf_counter() - start
    best = output.get_best_candidate() if output is not None else None
    if best is None or not best.model_path:
        return {"path": None, "wall_s": wall, "why": "Olive found no candidate within the accuracy goal"}
    path = Path(best.model_path)
    if path.is_dir():
        path = next(path.glob("*.onnx"))
    return {"path": str(path), "wall_s": wall, "config": _chosen_settings(workdir, best.model_id),
            "metrics": best.metrics_value}


#: The quantization settings Olive searched, as its footprint records them for a candidate.
SEARCHED = ("quant_mode", "precision", "quant_format", "activation_type", "per_channel", "reduce_range",
            "calibrate_method")


def _chosen_settings(workdir: str, model_id: str) -> dict[str, Any]:
    """The searched pass settings of the candidate `model_id`, read from Olive's footprint of the run."""
    footprint = json.loads((Path(workdir) / "output" / "footprint.json").read_text())
    settings = (footprint.get(model_id) or {}).get("pass_run_config") or {}
    return {key: settings[key] for key in SEARCHED if key in settings and not isinstance(settings[key], dict)}


def _set_footprint_fields_by_alias() -> None:
    """Olive 0.13.0 records a cached pass run with `FootprintNode.update(model_config=…)`, a plain setattr by the
    field's alias (the field is `model_config_data`), which pydantic ≥ 2.12 refuses (`"FootprintNode" object
    has no field "model_config"`), so every search point after the first failed and no search finished. This
    maps each alias to its field name before setting it: Olive's own intent, nothing else changed."""
    from olive.engine.footprint import FootprintNode

    def update(self: Any, **kwargs: Any) -> None:
        names = {field.alias: name for name, field in type(self).model_fields.items() if field.alias}
        for key, value in kwargs.items():
            setattr(self, names.get(key, key), value)

    FootprintNode.update = update


def search_in_subprocess(min_accuracy: float, trials: int, example_shape: tuple[int, ...], workdir: str) -> dict[str, Any]:
    """`search` in a child process under TIME_LIMIT_S; when Olive returns no candidate, the reason is the last
    error its log printed (a search point that raised), not a guess."""
    code = ("import json, sys; from bench import olive_digits; "
            f"print('RESULT' + json.dumps(olive_digits.search({min_accuracy!r}, {trials}, {tuple(example_shape)!r}, "
            f"{workdir!r}), default=str))")
    start = time.perf_counter()
    try:
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIME_LIMIT_S,
                               cwd=SCRIPT.parent.parent)
        output, status = child.stdout + child.stderr, f"exit status {child.returncode}"
    except subprocess.TimeoutExpired as stopped:
        output = "".join(o.decode(errors="replace") if isinstance(o, bytes) else (o or "")
                         for o in (stopped.stdout, stopped.stderr))
        status = f"stopped after {TIME_LIMIT_S} s"
    lines = output.splitlines()
    results = [line[len("RESULT"):] for line in lines if line.startswith("RESULT")]
    result = json.loads(results[-1]) if results else {"path": None}
    result["wall_s"] = time.perf_counter() - start
    if result.get("path") is None:
        import olive
        errors = [line.strip() for line in lines if "Error" in line and ":" in line]
        result["why"] = (f"olive-ai {olive.__version__}: no candidate ({result.get('why', status)})"
                         + (f"; the last error in its log: {errors[-1][:240]}" if errors else ""))
    return result
