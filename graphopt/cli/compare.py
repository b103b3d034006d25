"""`graphopt compare A B`: the A/B test before shipping a model.

Both models (each any MODEL form, torch or ONNX) run on the same inputs
(`--calibration` batches, else inputs generated as `graphopt optimize` does).
Reported: fidelity of B against A (max abs error and min row cosine of the
first output, top-1 accuracy of each with `--labels`), latency of both timed
interleaved in rotating round-robin (so a busy machine slows both alike) with
the ratio's 95% bootstrap confidence interval, peak resident memory during a
forward (Linux: the process's high-water mark, reset before each model),
parameter bytes and file bytes, and one verdict line.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError, OptionError
from ..frontend import datasets, loaders
from ..outputs import check_writable, write_atomic
from ..report import environment
from ..report.formatting import format_bytes, size_unit
from . import EXIT_OK
from .progress import Console


@dataclass
class Side:
    label: str
    model: str
    form: str
    latency_ms: float = 0.0
    latency_p10_ms: float = 0.0
    latency_p90_ms: float = 0.0
    peak_memory_bytes: int | None = None
    param_bytes: int = 0
    file_bytes: int | None = None
    accuracy: float | None = None
    samples_ms: list[float] = field(default_factory=list)


def run(args: argparse.Namespace) -> int:
    console = Console(quiet=args.json)
    report_path = check_writable(args.report, "report") if args.report else None
    shapes = datasets.parse_shapes(args.input_shape)
    models = []
    for label, spec in (("A", args.a), ("B", args.b)):
        console.stage(f"loading {label}: {spec}")
        models.append(loaders.load(spec, args.task, args.trust_pickle))
    batches = _batches(models, shapes, args)
    console.stage(f"{len(batches)} batch(es) of inputs: {', '.join(_names(batches[0]))}")
    runners = [_runner(m, batches[0]) for m in models]
    sides = [Side(label, m.source, loaders.KIND_NAMES[m.kind], param_bytes=_param_bytes(m),
                  file_bytes=_file_bytes(m)) for label, m in zip("AB", models)]
    console.stage("running both on every batch")
    outputs = [[_first_output(run_one(b)) for b in batches] for run_one in runners]
    fidelity = _fidelity(outputs[0], outputs[1])
    if args.labels:
        labels = _labels(args.labels)
        for side, outs in zip(sides, outputs):
            side.accuracy = _accuracy(outs, labels)
    for side, run_one in zip(sides, runners):
        side.peak_memory_bytes = _peak_memory(lambda: run_one(batches[0]))
    console.stage(f"timing A and B interleaved, {args.rounds} rounds")
    from ..engine.timing import measure_interleaved
    timed = measure_interleaved({"A": lambda: runners[0](batches[0]), "B": lambda: runners[1](batches[0])},
                                rounds=args.rounds)
    for side in sides:
        t = timed.timing(side.label)
        side.latency_ms, side.latency_p10_ms, side.latency_p90_ms = t.median_ms, t.p10_s * 1e3, t.p90_s * 1e3
        side.samples_ms = [s * 1e3 for s in timed.samples[side.label]]
    speedup = timed.ratio("A", "B")
    result = {"a": asdict(sides[0]), "b": asdict(sides[1]), "fidelity": fidelity, "speedup_b_over_a": speedup,
              "verdict": verdict(sides, fidelity, speedup), **environment()}
    if report_path is not None:
        write_atomic(report_path, render_html(result))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(render_text(result))
        if report_path is not None:
            print(f"wrote {report_path}")
    return EXIT_OK


# --- inputs and runners ------------------------------------------------------------------------------

def _batches(models: list[loaders.LoadedModel], shapes: dict, args: argparse.Namespace) -> list[dict]:
    """The same batches for both: {input name: numpy array}, built from the first torch model if any."""
    torch_side = next((m for m in models if not m.is_onnx), None)
    if torch_side is not None:
        example_args, example_kwargs, batches = datasets.torch_inputs(torch_side, shapes, args.calibration,
                                                                      args.batch_size)
        names = datasets.forward_names(torch_side.module)
        batches = batches or [example_args if example_args else example_kwargs]
        return [_as_named(b, names) for b in batches]
    feeds = datasets.onnx_feeds(models[0], args.calibration, shapes, args.batch_size)
    if feeds:
        return feeds
    from ..onnx.files import load_model
    from ..onnx.ir import OnnxModel, random_inputs
    model = OnnxModel.from_proto(load_model(models[0].onnx_path))
    return [random_inputs(model, 1, 0, {})[0][1]]


def _as_named(batch: Any, names: list[str]) -> dict:
    items = dict(zip(names, batch)) if isinstance(batch, tuple) else dict(batch)
    return {k: v.detach().cpu().numpy() if hasattr(v, "detach") else v for k, v in items.items()}


def _names(batch: dict) -> list[str]:
    return [f"{k}{list(getattr(v, 'shape', ()))}" for k, v in batch.items()]


def _runner(model: loaders.LoadedModel, example: dict) -> Callable[[dict], Any]:
    if model.is_onnx:
        import onnxruntime as ort
        session = ort.InferenceSession(str(model.onnx_path), providers=["CPUExecutionProvider"])
        wanted = [i.name for i in session.get_inputs()]
        missing = [n for n in wanted if n not in example]
        if not missing:
            return lambda batch: session.run(None, {n: batch[n] for n in wanted})
        if len(wanted) != len(example):
            raise InputError(f"{model.source} needs inputs {', '.join(missing)} that the batches lack "
                             f"(they have {', '.join(example)})")
        return lambda batch: session.run(None, dict(zip(wanted, batch.values())))   # same inputs, other names
    import torch
    kwargs = {k: torch.from_numpy(v) for k, v in example.items()}
    module, args, kwargs = model.torch_module((), kwargs)
    positional = bool(args)

    def run_torch(batch: dict) -> Any:
        tensors = [torch.from_numpy(v) for v in batch.values()]
        with torch.inference_mode():
            return module(*tensors) if positional else module(**dict(zip(batch, tensors)))
    return run_torch


def _first_output(value: Any) -> Any:
    """The first tensor of a model's output (a tensor, a tuple/list, a dict or a ModelOutput), as numpy."""
    import numpy as np
    while not hasattr(value, "shape"):
        if isinstance(value, dict) or hasattr(value, "values"):
            value = next(iter(value.values()))
        elif isinstance(value, (list, tuple)):
            value = value[0]
        else:
            raise InputError(f"cannot read the model's output: {type(value).__name__}")
    return np.asarray(value.detach().float().cpu().numpy() if hasattr(value, "detach") else value, dtype=np.float64)


def _fidelity(a: list, b: list) -> dict[str, float]:
    import numpy as np
    worst_abs, worst_cos = 0.0, 1.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            raise InputError(f"A's first output has shape {list(x.shape)}, B's {list(y.shape)}: not comparable")
        worst_abs = max(worst_abs, float(np.abs(x - y).max()))
        rows_x, rows_y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
        norms = np.linalg.norm(rows_x, axis=1) * np.linalg.norm(rows_y, axis=1)
        cos = (rows_x * rows_y).sum(axis=1) / np.where(norms > 0, norms, 1.0)
        worst_cos = min(worst_cos, float(cos.min()))
    return {"max_abs_err": worst_abs, "min_cosine": worst_cos}


def _labels(path: str) -> Any:
    import numpy as np
    p = Path(path)
    if p.suffix == ".npy":
        return np.load(p).reshape(-1)
    if p.suffix in (".pt", ".pth"):
        import torch
        return torch.load(str(p), weights_only=True).numpy().reshape(-1)
    try:
        return np.array([int(line) for line in p.read_text().split()])
    except (OSError, ValueError) as exc:
        raise OptionError(f"--labels {path}: give .npy, .pt or a text file of integer class ids") from exc


def _accuracy(outputs: list, labels: Any) -> float:
    import numpy as np
    predicted = np.concatenate([o.reshape(o.shape[0], -1).argmax(axis=1) for o in outputs])
    if len(labels) < len(predicted):
        raise OptionError(f"--labels has {len(labels)} labels for {len(predicted)} rows of inputs")
    return float((predicted == labels[:len(predicted)]).mean())


def _peak_memory(fn: Callable[[], Any]) -> int | None:
    """Peak resident bytes a call adds (Linux: reset the high-water mark, run, read it); None elsewhere."""
    status = Path("/proc/self/status")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib(status, "VmRSS")
        fn()
        return max(0, _status_kib(status, "VmHWM") - before) * 1024
    except OSError:
        return None


def _status_kib(status: Path, key: str) -> int:
    for line in status.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"no {key} in {status}")


def _param_bytes(model: loaders.LoadedModel) -> int:
    if model.is_onnx:
        import onnx
        import numpy as np
        proto = onnx.load(str(model.onnx_path))
        return sum(onnx.numpy_helper.to_array(t).nbytes for t in proto.graph.initializer
                   if np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type), np.number))
    module = model.module
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _file_bytes(model: loaders.LoadedModel) -> int | None:
    path = Path(model.source)
    if path.is_file():
        return loaders.file_bytes(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".bin")) or None
    return None


# --- conclusions -------------------------------------------------------------------------------------

def verdict(sides: list[Side], fidelity: dict[str, float], speedup: tuple[float, float, float]) -> str:
    ratio, low, high = speedup
    if low > 1:
        speed = f"B is {ratio:.2f}× faster than A (95% CI {low:.2f}–{high:.2f}×)"
    elif high < 1:
        speed = f"B is {1 / ratio:.2f}× SLOWER than A (95% CI {1 / high:.2f}–{1 / low:.2f}×)"
    else:
        speed = f"no measurable speed difference (B/A speed-up {ratio:.2f}×, 95% CI {low:.2f}–{high:.2f}×)"
    parts = [speed, f"min cosine {fidelity['min_cosine']:.5f}, max abs error {fidelity['max_abs_err']:.3g}"]
    a, b = sides
    if a.accuracy is not None and b.accuracy is not None:
        parts.append(f"accuracy {a.accuracy:.2%} → {b.accuracy:.2%}")
    if a.param_bytes and b.param_bytes and a.param_bytes != b.param_bytes:
        parts.append(f"parameters {a.param_bytes / b.param_bytes:.2f}× smaller" if b.param_bytes < a.param_bytes
                     else f"parameters {b.param_bytes / a.param_bytes:.2f}× larger")
    return "verdict: " + "; ".join(parts)


def _rows(result: dict) -> list[tuple[str, str, str]]:
    a, b = result["a"], result["b"]
    unit = size_unit(max(a["param_bytes"], b["param_bytes"], a["file_bytes"] or 0, b["file_bytes"] or 0))
    def size(v: int | None) -> str:
        return "-" if v is None else format_bytes(v, unit)
    def acc(v: float | None) -> str:
        return "-" if v is None else f"{v:.2%}"
    return [("model", a["model"], b["model"]), ("form", a["form"], b["form"]),
            ("latency ms (median, p10–p90)", *(f"{s['latency_ms']:.3f} ({s['latency_p10_ms']:.3f}–"
                                              f"{s['latency_p90_ms']:.3f})" for s in (a, b))),
            ("peak memory during a forward", size(a["peak_memory_bytes"]), size(b["peak_memory_bytes"])),
            ("parameters", size(a["param_bytes"]), size(b["param_bytes"])),
            ("file", size(a["file_bytes"]), size(b["file_bytes"])),
            ("top-1 accuracy", acc(a["accuracy"]), acc(b["accuracy"]))]


def render_text(result: dict) -> str:
    rows = [("", "A", "B")] + _rows(result)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    f = result["fidelity"]
    lines.append(f"B against A: max abs error {f['max_abs_err']:.3g}, min row cosine {f['min_cosine']:.5f}")
    lines.append(result["verdict"])
    return "\n".join(lines)


def render_html(result: dict) -> str:
    from ..report.html import _PAGE, _e, _png, _pyplot
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(x)}</td><td>{_e(y)}</td></tr>" for k, x, y in _rows(result))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 2.6))
    samples = [result["a"]["samples_ms"], result["b"]["samples_ms"]]
    ax.boxplot(samples, vert=False, tick_labels=["A", "B"])
    ax.set_xlabel("latency per call (ms), interleaved rounds")
    ax.grid(axis="x", alpha=0.3)
    body = (f"<h1>graphopt compare</h1><p class='provenance'>{_e(result['date'])} · {_e(result['machine'])}</p>"
            f"<div class='summary'>{_e(result['verdict'])}</div><table><tr><th></th><th>A</th><th>B</th></tr>"
            f"{rows}</table><h2>Latency</h2><img alt='latency' src='data:image/png;base64,{_png(fig)}'>")
    return _PAGE.format(title="graphopt compare", body=body)


__all__ = ["run", "verdict", "render_text", "render_html"]
