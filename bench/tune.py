"""graphopt.tune vs the best fixed level vs Olive's search, under the same accuracy budget and target.

    digits CNN (graphopt.data.zoo, bundled weights)  score: test accuracy in %, budget 0.5 points
    all-MiniLM-L6-v2 (real weights)             score: min cosine of the pooled embeddings to fp32 over
                                                real sentences, budget 0.01

Rows per model: the original; each fixed level (O1; O2 int8-dynamic with calibration; O3 = the demo's
recipe: prune, fine-tune by distillation, for the CNN; for MiniLM prune 0.3 without fine-tune), each built
with `graphopt.optimize`'s defaults (the speed check on, as a user gets it; tune's trials time themselves and
build without it), with its score and whether it is within budget; the best fixed level within budget; tune's best after `--trials`
(default 30) trials. For the digits CNN also the same search on ONNX Runtime (`target="onnxruntime"`) against
Olive's joint TPE search over its ONNX quantization passes (bench/olive_digits.py: same budget, sample count,
CPU execution provider), each candidate scored by the same accuracy and timed against the original exported to
ONNX, then head to head; where Olive cannot run or finds nothing, its row says why (the error its log printed).
Every latency is the project's interleaved A/B timer against the original in the same run (ratio with a
95 % interval; absolute ms only as context), then the fastest candidates timed against each other.
Goal (issue 16): tune's best ≥ 1.2× faster than the best fixed level within budget.

    python -m bench.tune [--quick] [--only digits|minilm] [--trials N]

`--quick` (a smoke run: 4 trials, fewer sentences, short timings) checks the pipeline end to end; its
figures are not results and it writes bench/results/tune_quick.md instead of tune.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Any, Callable

import torch

import graphopt
from bench.harness import earlier_rows, pin_threads, write_results
from graphopt.engine.speed import SpeedCheck

OLIVE_WHY: str | None = None


def olive_status() -> str | None:
    """Why Olive's search is not run here (None: it could be). Checked with pip's dry run, nothing installed."""
    try:
        import olive  # noqa: F401
    except ImportError:
        probe = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "olive-ai"],
                               capture_output=True, text=True)
        would = [line for line in probe.stdout.splitlines() if line.startswith("Would install")]
        if probe.returncode != 0:
            return f"olive-ai does not install here: {probe.stderr.strip().splitlines()[-1:]}"
        if would and " torch-" in would[0]:
            return f"olive-ai is not installed: installing it would replace torch ({would[0][:200]})"
        return "olive-ai is not installed in this environment (pip install olive-ai; its search needs a " \
               "workflow config per model)"
    return None


def digits(quick: bool) -> dict[str, Any]:
    from graphopt.data.zoo import accuracy, batches, trained_digits_resnet
    model, data = trained_digits_resnet()
    example = (data.x_test[:256],)
    calibration = [(xb,) for xb, _ in batches(data.x_train, data.y_train, 64, seed=1)][:8]
    train = list(batches(data.x_train, data.y_train, 64, seed=2))
    fixed = {
        "O1": ({"level": "O1"}, None),
        "O2 int8-dynamic": ({"level": "O2", "quantize": "int8-dynamic"}, None),
        "O3 prune 0.5 + finetune 3 + int8": ({"level": "O3", "prune": 0.5, "quantize": "int8-dynamic"},
                                             {"epochs": 3}),
    }
    def olive(budget: float, trials: int, folder: Any) -> dict[str, Any]:
        from bench import olive_digits
        floor = accuracy(model, data.x_test, data.y_test) - budget
        return olive_digits.search_in_subprocess(floor, trials, (1, *example[0].shape[1:]), str(folder))

    return {"name": "digits CNN", "model": model, "args": example, "kwargs": None, "budget": 0.5,
            "evaluate": lambda m: accuracy(m, data.x_test, data.y_test), "score": "accuracy %",
            "calibration": calibration, "train": train, "fixed": fixed, "olive": olive}


def minilm(quick: bool) -> dict[str, Any]:
    from bench.minilm import load_encoder, sentence_batches
    model, tokenizer = load_encoder()
    count, batch, seq = (64, 32, 64) if quick else (256, 32, 128)
    evaluation = sentence_batches(tokenizer, count, batch, seq)
    calibration = sentence_batches(tokenizer, count + 128, batch, seq)[count // batch:]   # other sentences
    with torch.no_grad():
        reference = [model(**b) for b in evaluation]

    def min_cosine(module: Any) -> float:
        with torch.no_grad():
            return min(torch.nn.functional.cosine_similarity(module(**b), r).min().item()
                       for b, r in zip(evaluation, reference))

    fixed = {"O1": ({"level": "O1"}, None),
             "O2 int8-dynamic": ({"level": "O2", "quantize": "int8-dynamic"}, None),
             "O3 prune 0.3 + int8": ({"level": "O3", "prune": 0.3, "quantize": "int8-dynamic"}, None)}
    return {"name": "all-MiniLM-L6-v2", "model": model, "args": (), "kwargs": evaluation[0], "budget": 0.01,
            "evaluate": min_cosine, "score": "min cosine", "calibration": calibration, "train": calibration,
            "fixed": fixed}


def _time(original: Callable, candidate: Callable, quick: bool) -> Any:
    check = SpeedCheck(min_rounds=5 if quick else 20, max_rounds=10 if quick else 60,
                       max_seconds=10 if quick else 60)
    return check.compare(original, candidate)


def run_case(case: dict[str, Any], trials: int, quick: bool) -> list[dict[str, Any]]:
    from graphopt.engine import ir
    from graphopt.search import recipe
    model, args, kwargs = case["model"], case["args"], dict(case["kwargs"] or {})
    reference = case["evaluate"](model)
    call = lambda m: (lambda: m(*args, **kwargs))  # noqa: E731
    rows = [{"model": case["name"], "method": "original", case["score"]: reference, "within budget": True,
             "× faster than original": 1.0, "size KiB": ir.param_bytes(model) / 1024}]
    candidates: dict[str, Any] = {}
    for name, (config, finetune) in case["fixed"].items():
        start = time.perf_counter()
        module = recipe.build(model, args, config, finetune, example_kwargs=kwargs,   # optimize's defaults: speed
                              calibration_data=case["calibration"], train_data=case["train"],   # check on, as a
                              measure_latency=True)                                             # user gets it
        wall = time.perf_counter() - start
        score = case["evaluate"](module)
        verdict = _time(call(model), call(module), quick)
        ok = reference - score <= case["budget"]
        rows.append({"model": case["name"], "method": f"fixed {name}", case["score"]: score, "within budget": ok,
                     **_speed(verdict),
                     "size KiB": _size(module) / 1024, "search s": wall})
        if ok:
            candidates[f"fixed {name}"] = module
    fixed_best = max((r for r in rows[1:] if r["within budget"]), key=lambda r: r["× faster than original"])
    rows.append({**fixed_best, "method": f"best fixed level: {fixed_best['method'][6:]}"})
    start = time.perf_counter()
    result = graphopt.tune(model, args, example_kwargs=kwargs, evaluate=case["evaluate"],
                           accuracy_budget=case["budget"], trials=trials, calibration_data=case["calibration"],
                           train_data=case["train"], speed_check={"min_rounds": 5, "max_rounds": 10 if quick else 30,
                                                                  "max_seconds": 5 if quick else 20})
    wall = time.perf_counter() - start
    if result.best is not None:
        row = result.best_row
        verdict = _time(call(model), call(result.best), quick)
        rows.append({"model": case["name"], "method": f"tune ({trials} trials): "
                     + _describe(result), case["score"]: row["score"],
                     "within budget": True, **_speed(verdict),
                     "size KiB": row["size_bytes"] / 1024, "search s": wall})
        candidates["tune"] = result.best
        head = _time(call(candidates[fixed_best["method"]]), call(result.best), quick)
        rows.append({"model": case["name"], "method": "tune's best vs best fixed level (head to head)",
                     "× faster than original": None, "95% CI": f"{1 / head.ratio:.2f}× faster "
                     f"({1 / head.high:.2f}–{1 / head.low:.2f})"})
    else:
        rows.append({"model": case["name"], "method": f"tune ({trials} trials): no trial within budget",
                     "search s": wall})
    if "olive" not in case:
        rows.append({"model": case["name"], "method": "Olive search", "95% CI": "not wired for this model"})
    elif OLIVE_WHY:
        rows.append({"model": case["name"], "method": "Olive search", "95% CI": OLIVE_WHY})
    else:
        rows += olive_rows(case, trials, quick)
    return rows


def olive_rows(case: dict[str, Any], trials: int, quick: bool) -> list[dict[str, Any]]:
    """graphopt.tune and Olive's search on the same target (ONNX Runtime, CPU), budget and trial count; every
    candidate scored by the case's own evaluate and timed by the project's A/B timer against the original
    exported to ONNX."""
    import tempfile
    from pathlib import Path

    from graphopt.frontend.loaders import file_bytes
    model, args, name, score = case["model"], case["args"], case["name"], case["score"]
    folder = Path(tempfile.mkdtemp(prefix="bench-tune-olive-"))
    from graphopt.search.target import Target
    target = Target("onnxruntime", model, args, None, SpeedCheck())
    graphopt.export_onnx(model, args, folder / "original.onnx")   # the baseline, exported as tune's target does
    original = target.onnx_runner(folder / "original.onnx")
    start = time.perf_counter()
    result = graphopt.tune(model, args, evaluate=case["evaluate"], accuracy_budget=case["budget"], trials=trials,
                           target="onnxruntime", calibration_data=case["calibration"], train_data=case["train"],
                           speed_check={"min_rounds": 5, "max_rounds": 10 if quick else 30,
                                        "max_seconds": 5 if quick else 20})
    graphopt_wall = time.perf_counter() - start
    rows: list[dict[str, Any]] = []
    runs: dict[str, Callable] = {}
    if result.best is not None:
        path = folder / "graphopt.onnx"
        graphopt.export_onnx(result.best, args, path)
        runs["graphopt"] = target.onnx_runner(path)
        verdict = _time(original, runs["graphopt"], quick)
        rows.append({"model": name, "method": f"tune on onnxruntime ({trials} trials): " + _describe(result),
                     score: case["evaluate"](_OnnxModule(path)), "within budget": True,
                     **_speed(verdict),
                     "size KiB": file_bytes(path) / 1024, "search s": graphopt_wall})
    olive = case["olive"](case["budget"], trials, folder / "olive")
    if olive["path"] is None:
        rows.append({"model": name, "method": f"Olive search ({trials} samples)", "95% CI": olive["why"],
                     "search s": olive["wall_s"]})
        return rows
    olive_score = case["evaluate"](_OnnxModule(olive["path"]))
    runs["Olive"] = target.onnx_runner(olive["path"])
    verdict = _time(original, runs["Olive"], quick)
    rows.append({"model": name, "method": f"Olive search ({trials} samples, TPE): {_olive_describe(olive['config'])}",
                 score: olive_score, "within budget": case["evaluate"](model) - olive_score <= case["budget"],
                 **_speed(verdict),
                 "size KiB": file_bytes(olive["path"]) / 1024, "search s": olive["wall_s"]})
    if len(runs) == 2:
        head = _time(runs["Olive"], runs["graphopt"], quick)
        rows.append({"model": name, "method": "tune (onnxruntime) vs Olive's best (head to head)",
                     "95% CI": f"{1 / head.ratio:.2f}× faster ({1 / head.high:.2f}–{1 / head.low:.2f})"})
    return rows


class _OnnxModule(torch.nn.Module):
    """An ONNX file as a callable module for the case's evaluate (one tensor in, the first output out)."""

    def __init__(self, path: Any) -> None:
        super().__init__()
        from graphopt.onnx.sessions import session
        self.session = session(path)
        self.input = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.numpy()})[0])


def _olive_describe(config: dict[str, Any]) -> str:
    """The quantization settings of Olive's best candidate (bench/olive_digits.py reads them from its footprint)."""
    return ", ".join(f"{key}={value}" for key, value in config.items()) or "settings not in Olive's footprint"


def _describe(result: Any) -> str:
    from graphopt.search.report import describe_config
    return describe_config(result.config, result.finetune)


def _speed(verdict: Any) -> dict[str, Any]:
    """A timed row's speed columns: the ratio to the original with its 95 % interval, and both latencies
    (median, p10–p90 of the interleaved rounds) from the same run."""
    def latency(timing: Any) -> str:
        return f"{timing.median_s * 1e3:.3g} ({timing.p10_s * 1e3:.3g}–{timing.p90_s * 1e3:.3g})"
    return {"× faster than original": 1 / verdict.ratio, "95% CI": f"{1 / verdict.high:.2f}–{1 / verdict.low:.2f}×",
            "ms (p10–p90)": latency(verdict.after), "original ms (p10–p90)": latency(verdict.before)}


def _size(module: Any) -> int:
    from graphopt.search.target import _param_bytes
    return _param_bytes(module)


def main() -> None:
    global OLIVE_WHY
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 trials, short timings (no figures)")
    parser.add_argument("--only", choices=["digits", "minilm"], default=None,
                        help="run one model; the table keeps the other model's rows from its last run")
    parser.add_argument("--trials", type=int, default=None, help="tune trials (default 30, --quick 4)")
    args = parser.parse_args()
    pin_threads()
    trials = args.trials or (4 if args.quick else 30)
    OLIVE_WHY = olive_status()
    rows: list[dict[str, Any]] = []
    for key, case in (("digits", digits), ("minilm", minilm)):
        if args.only in (None, key):
            rows += run_case(case(args.quick), trials, args.quick)
    name = "tune_quick" if args.quick else "tune"
    if args.only:   # the other model's rows stay, tagged with the run they came from
        rows = earlier_rows(name, sorted({row["model"] for row in rows})) + rows
    notes = (f"Budget: 0.5 accuracy points (digits), 0.01 min cosine (MiniLM). Target torch (CPU), and for the "
             f"digits CNN also onnxruntime (CPU) against Olive. "
             f"Latency: interleaved A/B ratio against the original (graphopt.engine.speed.SpeedCheck), 95 % bootstrap "
             f"interval; `ms` and `original ms`: both medians of that same run with their p10–p90 over its rounds. "
             f"`search s`: the wall time of one search (or one optimize for a fixed level), not a latency. "
             f"1-minute load average at the start: {os.getloadavg()[0]:.2f}. Olive: {OLIVE_WHY or 'installed'}.")
    print(write_results(name, "graphopt.tune vs fixed levels vs Olive", rows, notes).read_text())


if __name__ == "__main__":
    main()
