"""The sweep: graphopt, as a new user runs it, over many public architectures with random weights.

    python -m bench.sweep                       # every model, results in bench/results/sweep.md (+ .json)
    python -m bench.sweep --only bert,resnet    # some of them (names from MODELS)
    python -m bench.sweep --stages O1,export_onnx --timeout 300

Each model runs in its own subprocess under a time limit (a hang or a crash costs one row, not the run).
Stages, each timed, each compared with the eager model on the example inputs (max relative error):
O1, O2 (int8-dynamic), O3 (int8 + prune=0.3) through `graphopt.optimize`; `export_onnx` of the O2
module (int8, opset 23) run by ONNX Runtime; `optimize_onnx` (O2) of a float export (O1 module).
A failed stage records the error's class and first line; a model torch.export cannot capture fails
every stage with the same CaptureError.

Model definitions: Hugging Face `transformers` architectures built from tiny configs (random weights,
no download): encoders, decoders (use_cache=False), encoder-decoders, speech, vision. torchvision is
not used: the registry's torchvision builds for torch 2.13.0 (0.28.0, pinned to torch==2.13.0) are CUDA
builds whose operators library links libtorch_cuda/libc10_cuda, so `import torchvision` fails next
to the CPU torch ("operator torchvision::nms does not exist"), and importing transformers' vision
models then fails with it. Hugging Face's ResNet, ConvNeXt, EfficientNet, MobileNetV2 (with its
DeepLabV3 segmentation head), RegNet, Swin, ViT, BEiT and SegFormer stand for the torchvision zoo.

A correctness table, not a speed claim: times are context (the machine is shared), errors are the point.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from graphopt.errors import first_line

STAGES = ("O1", "O2", "O3", "export_onnx", "optimize_onnx")
DEFAULT_TIMEOUT_S = 900

Factory = Callable[[], tuple[Any, tuple, dict]]


def _tokens(vocab: int = 99, batch: int = 2, length: int = 8) -> Any:
    import torch
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def _image(size: int = 32, channels: int = 3, batch: int = 2) -> Any:
    import torch
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(0))


def _hf(cls: str, config: str, inputs: Callable[[], dict], **config_kwargs: Any) -> Factory:
    def build() -> tuple[Any, tuple, dict]:
        import torch
        import transformers
        torch.manual_seed(0)
        model = getattr(transformers, cls)(getattr(transformers, config)(**config_kwargs)).eval()
        return model, (), inputs()
    return build


_TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_DECODER = dict(_TEXT, num_key_value_heads=2, max_position_embeddings=64)
_VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64)


def _ids() -> dict:
    return {"input_ids": _tokens()}


def _ids_no_cache() -> dict:
    return {"input_ids": _tokens(), "use_cache": False}


def _pixels(size: int = 32, channels: int = 3) -> Callable[[], dict]:
    return lambda: {"pixel_values": _image(size, channels)}


def _seq2seq() -> dict:
    return {"input_ids": _tokens(), "decoder_input_ids": _tokens(length=4), "use_cache": False}


def _audio() -> dict:
    import torch
    return {"input_values": torch.randn(2, 1600, generator=torch.Generator().manual_seed(0))}


def _features() -> dict:
    import torch
    return {"input_features": torch.randn(2, 16, 40, generator=torch.Generator().manual_seed(0)),
            "decoder_input_ids": _tokens(length=4), "use_cache": False}


MODELS: dict[str, Factory] = {
    # encoders
    "bert": _hf("BertModel", "BertConfig", _ids, **_TEXT),
    "roberta": _hf("RobertaModel", "RobertaConfig", _ids, **_TEXT),
    "distilbert": _hf("DistilBertModel", "DistilBertConfig", _ids, vocab_size=99, dim=32, n_layers=2, n_heads=4,
                      hidden_dim=64),
    "albert": _hf("AlbertModel", "AlbertConfig", _ids, embedding_size=16, **_TEXT),
    "mobilebert": _hf("MobileBertModel", "MobileBertConfig", _ids, vocab_size=99, hidden_size=32,
                      embedding_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      intra_bottleneck_size=16, true_hidden_size=16, num_feedforward_networks=2),
    "electra": _hf("ElectraModel", "ElectraConfig", _ids, embedding_size=16, **_TEXT),
    # decoders (use_cache=False)
    "gpt2": _hf("GPT2Model", "GPT2Config", _ids_no_cache, vocab_size=99, n_embd=32, n_layer=2, n_head=4,
                n_positions=64),
    "llama": _hf("LlamaModel", "LlamaConfig", _ids_no_cache, **_DECODER),
    "mistral": _hf("MistralModel", "MistralConfig", _ids_no_cache, **_DECODER),
    "qwen2": _hf("Qwen2Model", "Qwen2Config", _ids_no_cache, **_DECODER),
    "phi3": _hf("Phi3Model", "Phi3Config", _ids_no_cache, pad_token_id=0, **_DECODER),
    "gemma": _hf("GemmaModel", "GemmaConfig", _ids_no_cache, head_dim=8, **_DECODER),
    # encoder-decoders
    "t5_encoder": _hf("T5EncoderModel", "T5Config", _ids, vocab_size=99, d_model=32, d_kv=8, d_ff=64,
                      num_layers=2, num_heads=4),
    "t5": _hf("T5Model", "T5Config", _seq2seq, vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2,
              num_heads=4),
    "bart": _hf("BartModel", "BartConfig", _seq2seq, vocab_size=99, d_model=32, encoder_layers=2,
                decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                decoder_ffn_dim=64, max_position_embeddings=64),
    # speech
    "wav2vec2": _hf("Wav2Vec2Model", "Wav2Vec2Config", _audio, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 4),
                    conv_kernel=(10, 4), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4),
    "whisper": _hf("WhisperModel", "WhisperConfig", _features, vocab_size=99, num_mel_bins=16, d_model=32,
                   encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                   encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=20, max_target_positions=32,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1),   # inside the vocabulary
    # vision
    "vit": _hf("ViTModel", "ViTConfig", _pixels(), **_VISION),
    "deit": _hf("DeiTModel", "DeiTConfig", _pixels(), **_VISION),
    "beit": _hf("BeitModel", "BeitConfig", _pixels(), use_relative_position_bias=True, **_VISION),
    "swin": _hf("SwinModel", "SwinConfig", _pixels(), image_size=32, patch_size=2, embed_dim=16,
                depths=[1, 1], num_heads=[2, 4], window_size=4),
    "convnext": _hf("ConvNextModel", "ConvNextConfig", _pixels(), hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]),
    "resnet": _hf("ResNetModel", "ResNetConfig", _pixels(), embedding_size=16, hidden_sizes=[16, 32, 64, 128],
                  depths=[1, 1, 1, 1]),
    "regnet": _hf("RegNetModel", "RegNetConfig", _pixels(), embedding_size=16, hidden_sizes=[16, 32, 64, 128],
                  depths=[1, 1, 1, 1], groups_width=8),
    "mobilenet_v2": _hf("MobileNetV2Model", "MobileNetV2Config", _pixels(), image_size=32, depth_multiplier=0.25),
    "efficientnet": _hf("EfficientNetModel", "EfficientNetConfig", _pixels(), image_size=32, width_coefficient=0.25,
                        depth_coefficient=0.25, hidden_dim=320),   # the top conv's width: round_filters(1280 × 0.25)
    "deeplabv3_mobilenet_v2": _hf("MobileNetV2ForSemanticSegmentation", "MobileNetV2Config", _pixels(64),
                                  image_size=64, depth_multiplier=0.25, num_labels=3),
    "segformer": _hf("SegformerModel", "SegformerConfig", _pixels(), num_encoder_blocks=2, depths=[1, 1],
                     sr_ratios=[2, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2], patch_sizes=[7, 3],
                     strides=[4, 2], decoder_hidden_size=32),
}

#: The fast subset the test suite runs (tests/bench/test_sweep.py).
FAST = ("bert", "resnet")


def run_model(name: str, stages: tuple[str, ...] = STAGES,
              on_stage: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """One model's row: for each stage its status ("ok" or the error's class and first line), max
    relative error against the eager model and seconds. `on_stage(row)` is called after each stage
    (the subprocess writes the row so far, so a model stopped by its time limit keeps its finished
    stages)."""
    import torch
    import torch.utils._pytree as pytree

    import graphopt
    from graphopt.engine.verify import compare

    model, args, kwargs = MODELS[name]()
    with torch.no_grad():
        eager = model(*args, **kwargs)
    expected = [leaf for leaf in pytree.tree_leaves(eager) if isinstance(leaf, torch.Tensor)]
    row: dict[str, Any] = {"model": name}
    modules: dict[str, Any] = {}
    options = dict(measure_latency=False, progress=False)
    settings = {"O1": dict(level="O1"), "O2": dict(level="O2", quantize="int8-dynamic"),
                "O3": dict(level="O3", quantize="int8-dynamic", prune=0.3)}

    def error_of(outputs: list[Any]) -> float:
        got = [torch.as_tensor(o) for o in outputs]
        return max(compare(g.float(), e.float()).max_rel for g, e in zip(got, expected))

    with tempfile.TemporaryDirectory(prefix="sweep-") as directory:
        for stage in stages:
            start = time.perf_counter()
            try:
                if stage in settings:
                    opt = graphopt.optimize(model, args, example_kwargs=kwargs, **settings[stage], **options)
                    modules[stage] = opt
                    with torch.no_grad():
                        err = error_of([leaf for leaf in pytree.tree_leaves(opt(*args, **kwargs))
                                        if isinstance(leaf, torch.Tensor)])
                elif stage == "export_onnx":
                    source = modules.get("O2") or graphopt.optimize(model, args, example_kwargs=kwargs,
                                                                     **settings["O2"], **options)
                    path = graphopt.export_onnx(source, args, Path(directory) / "o2.onnx", example_kwargs=kwargs)
                    err = error_of(_ort(path, args, kwargs))
                else:   # optimize_onnx: O2 of a float export
                    source = modules.get("O1") or graphopt.optimize(model, args, example_kwargs=kwargs,
                                                                     **settings["O1"], **options)
                    float_path = graphopt.export_onnx(source, args, Path(directory) / "o1.onnx",
                                                      example_kwargs=kwargs)
                    out = Path(directory) / "o1_o2.onnx"
                    graphopt.optimize_onnx(float_path, out, level="O2", measure_latency=False, progress=False)
                    err = error_of(_ort(out, args, kwargs))
                row[stage] = "ok"
                row[f"{stage} err"] = err
            except Exception as exc:  # noqa: BLE001  (the table records every failure)
                row[stage] = f"{type(exc).__name__}: {first_line(exc, 300)}"
                row[f"{stage} err"] = None
                if os.environ.get("SWEEP_TRACEBACK"):
                    traceback.print_exc()
            row[f"{stage} s"] = round(time.perf_counter() - start, 1)
            if on_stage is not None:
                on_stage(row)
    return row


def _ort(path: Path, args: tuple, kwargs: dict) -> list[Any]:
    import onnxruntime as ort
    import torch
    import torch.utils._pytree as pytree
    leaves = [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: leaf.numpy() for i, leaf in zip(sess.get_inputs(), leaves)}
    return sess.run(None, feeds)


def run_isolated(name: str, stages: tuple[str, ...], timeout_s: float) -> dict[str, Any]:
    """`run_model` in a subprocess under `timeout_s`; a timeout or a crash is the row's error."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    command = [sys.executable, "-m", "bench.sweep", "--child", name, "--stages", ",".join(stages), "--out", str(out)]
    try:
        done = subprocess.run(command, timeout=timeout_s, capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
        failure = None
        if done.returncode != 0:
            tail = [line for line in (done.stderr or "").splitlines() if line.strip()][-1:] or ["no output"]
            failure = f"crashed (exit {done.returncode}): {tail[0][:300]}"
    except subprocess.TimeoutExpired:
        failure = f"timed out after {timeout_s:.0f} s"
    try:
        row = json.loads(out.read_text()) if out.stat().st_size else {"model": name}
    finally:
        out.unlink(missing_ok=True)
    if failure is not None:     # the stage that was running gets the failure; later ones did not run
        unfinished = [stage for stage in stages if stage not in row]
        for stage in unfinished:
            row[stage] = failure if stage == unfinished[0] else "not run"
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated model names (default: all)")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per model")
    parser.add_argument("--name", default="sweep", help="results file name (bench/results/NAME.md)")
    parser.add_argument("--budget", type=float, help="seconds for the whole run: no model starts after it")
    parser.add_argument("--keep", action="store_true",
                        help="keep the rows of bench/results/NAME.json for models this run does not run "
                             "(each row names the commit and date it came from)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    stages = tuple(s for s in options.stages.split(",") if s)
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    if options.child:
        run_model(options.child, stages,
                  on_stage=lambda row: Path(options.out).write_text(json.dumps(row, default=str)))
        return
    names = options.only.split(",") if options.only else list(MODELS)
    missing = [n for n in names if n not in MODELS]
    if missing:
        parser.error(f"unknown models {missing}; choose from {', '.join(MODELS)}")
    from bench.harness import earlier_rows
    kept = earlier_rows(options.name, names) if options.keep else []
    rows: list[dict[str, Any]] = []
    load = [os.getloadavg()[0]]
    start = time.perf_counter()
    for name in names:
        if options.budget is not None and time.perf_counter() - start > options.budget:
            break
        rows.append(run_isolated(name, stages, options.timeout) | {"run": _commit()})
        print(json.dumps(rows[-1], default=str), flush=True)
        load.append(os.getloadavg()[0])
        path = _write(options.name, rows, kept, stages, options.timeout, names, load)   # a partial run keeps its rows
    print(path)


def _commit() -> str:
    from bench.harness import machine_info
    info = machine_info()
    return f"{info.get('graphopt_commit', '?')} {info['date']}"


def _write(name: str, rows: list[dict[str, Any]], kept: list[dict[str, Any]], stages: tuple[str, ...],
           timeout_s: float, planned: list[str], load: list[float]) -> Path:
    from bench.harness import write_results
    table = kept + rows
    failed = [r["model"] for r in table if any(r.get(s) != "ok" for s in stages)]
    done = {r["model"] for r in table}
    left = [m for m in MODELS if m not in done]
    notes = (f"Stages: {', '.join(stages)}; per-model limit {timeout_s:.0f} s (a model stopped by it keeps its "
             "finished stages; the stage it was in says `timed out`, later ones `not run`). "
             f"This run: {len(rows)} of the {len(planned)} models it planned"
             + (f", {len(kept)} rows kept from earlier runs (`run` names each row's commit and date)" if kept else "")
             + f"; {len(table)} of {len(MODELS)} models in the table"
             + (f"; not run: {', '.join(left)}" if left else "") + ". "
             "`err`: max relative error of the stage's outputs against the eager model on the example inputs. "
             f"{len(table) - len(failed)} of {len(table)} models ok at every stage"
             + (f"; not ok: {', '.join(failed)}." if failed else ".")
             + f"\n\nProduced on a shared, loaded machine ({os.cpu_count()} cores; 1-minute load average "
             + ", ".join(f"{x:.1f}" for x in load) + " before and after each model): times are context, not "
             "speed figures, and a model that times out here may finish on an idle machine."
             + "\n\nModel definitions: Hugging Face tiny configs (see bench/sweep.py for why not torchvision).")
    return write_results(name, "graphopt sweep over public architectures (random weights)", table, notes)


if __name__ == "__main__":
    main()
