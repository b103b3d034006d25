"""The `graphopt` command line.

    graphopt optimize MODEL -o OUT.onnx [--int8 dynamic|static|weight-only] [--prune R] [--report r.html] …
    graphopt compare A B [--calibration DATA] [--labels y.npy] [--report compare.html]
    graphopt tune MODEL --eval module:function --budget B [--trials N] [--target T] [--storage URL] …
    graphopt demo [--out DIR] [--prune R] [--epochs N] [--level O1|O2|O3]
    graphopt report RUN.json [--html report.html]

Arguments are parsed before anything heavy is imported: `--help` and usage
errors answer at once; torch, ONNX and transformers load when a command runs.
Progress goes to stderr, results to stdout (`--json`: one JSON document).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..engine.schemes import Scheme
from ..errors import GraphoptError

#: Exit statuses (also in `graphopt --help`).
EXIT_OK, EXIT_UNEXPECTED, EXIT_BAD_INPUT, EXIT_FALLBACK = 0, 1, 2, 3
SCHEMES = {s.short: s.value for s in Scheme}

MODEL_HELP = """\
MODEL is any of:
  path/to/hf-folder/          a Hugging Face model folder (config.json + weights); the class comes from
                              the config's architectures, or from --task
  model.safetensors           weights beside their config.json
  model.pt                    TorchScript (torch.jit.save)
  model.pt2                   a torch.export program (torch.export.save); its example inputs are used
  model.pth --trust-pickle    a pickled nn.Module (torch.save(model)); unpickling runs code from the file
  package.module:factory      a callable returning a model, (model, example_inputs) or (model, args, kwargs);
                              modules in the current folder are found without PYTHONPATH
  path/to/file.py:factory     the same, from a file
  model.onnx                  ONNX (external data beside it is read too); optimized with optimize_onnx

Example inputs come from the factory or .pt2, from --input-shape, from a Hugging Face config
(token ids of length 128, or images of the config's size), or from the first --calibration batch.
--calibration takes a text file (one sentence per line, tokenized with the model's tokenizer), a
folder of images (resized with the model's image processor, or to --input-shape C,H,W), an .npz
file or a folder of them (one batch each, arrays named after the inputs), or a .pt file (a tensor,
a dict of tensors, or a list of batches). Real calibration data also verifies each pass.

examples:
  graphopt optimize ./all-MiniLM-L6-v2 -o minilm.onnx --int8 dynamic --calibration sentences.txt \\
      --report report.html
  graphopt optimize resnet.pt --input-shape 1,3,224,224 -o resnet.onnx --level O1
  graphopt optimize models.py:build -o small.onnx --prune 0.3 --calibration batches.pt
  graphopt optimize model.onnx -o model.int8.onnx --int8 static --calibration feeds/
"""

EXIT_HELP = (f"exit status: {EXIT_OK} done; {EXIT_BAD_INPUT} bad model, data or option (one line on stderr); "
             f"{EXIT_FALLBACK} a requested int8 scheme or pruning was rolled back, or the result misses "
             f"--accuracy-budget (the model is still written; --allow-fallback makes this 0); "
             f"{EXIT_UNEXPECTED} anything unexpected.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "demo":          # the demo parses its own options (graphopt demo --help)
        args.rest = extra + list(args.rest)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    import warnings
    warnings.formatwarning = lambda message, category, *rest, **kw: f"{category.__name__}: {message}\n"
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    try:
        return args.handler(args)
    except GraphoptError as exc:
        return _fail(f"error: {exc}", EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:  # noqa: BLE001  (one line, never a traceback, for any failure)
        return _fail(f"{type(exc).__name__}: {exc}", EXIT_UNEXPECTED)


def _fail(message: str, code: int) -> int:
    print(f"graphopt: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def _run(module: str):
    """A handler that imports its command's module only when the command runs."""
    def handler(args: argparse.Namespace) -> int:
        import importlib
        return importlib.import_module(f"graphopt.cli.{module}").run(args)
    return handler


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-shape", action="append", metavar="[NAME=]D0,D1,…",
                        help="shape of an input (repeat for several); token ids for Hugging Face text models")
    parser.add_argument("--calibration", metavar="DATA",
                        help="sentences.txt, an image folder, .npz file(s) or a .pt file (see above)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size for --calibration (default 8)")
    parser.add_argument("--task", default=None, help="Hugging Face task when the config does not name the "
                        "class: feature-extraction, text-classification, image-classification, …")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow MODEL to be a pickled nn.Module (unpickling runs code from the file)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphopt", description="Compiler-style graph optimizer for PyTorch "
                                     "and ONNX models, verified pass by pass.", epilog=EXIT_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter
    opt = commands.add_parser("optimize", help="optimize a model into an ONNX file", formatter_class=raw,
                              description="Optimize MODEL (torch or ONNX) and write an ONNX file.",
                              epilog=MODEL_HELP + "\n" + EXIT_HELP)
    opt.add_argument("model", metavar="MODEL", help="the model (forms below)")
    opt.add_argument("-o", "--output", required=True, help="where to write the optimized .onnx")
    opt.add_argument("--level", choices=["O0", "O1", "O2", "O3"], default=None,
                     help="O0 capture · O1 lossless · O2 + int8 · O3 + pruning (default: from the other options)")
    opt.add_argument("--int8", choices=sorted(SCHEMES), default=None, help="int8 scheme (implies O2)")
    opt.add_argument("--prune", type=float, default=None, help="structured pruning ratio (torch models, O3)")
    opt.add_argument("--accuracy-budget", type=float, default=None, metavar="TOL",
                     help="the outputs' cosine to the original stays ≥ 1 − TOL (0.01: ≥ 0.99) on the calibration "
                          "data; the most sensitive int8 layers fall back to float until it holds (torch and "
                          "ONNX models alike; needs --calibration)")
    opt.add_argument("--config", default=None, metavar="JSON",
                     help="the configuration graphopt tune wrote (best.json): optimize (and fine-tune on "
                          "--calibration) exactly as its best trial did")
    opt.add_argument("--output-names", default=None, metavar="NAME,…",
                     help="names of the ONNX outputs (default: the model's own, e.g. last_hidden_state, "
                          "a dict's keys, or output)")
    opt.add_argument("--ops", choices=("standard", "onnxruntime"), default="standard",   # engine.config.EXPORT_OPS
                     help="operators of the written file: standard (default domain, any runtime) or onnxruntime "
                          "(ONNX Runtime's contrib ops: weight-only linears as MatMulNBits; torch models)")
    opt.add_argument("--allow-fallback", action="store_true",
                     help=f"exit 0 even when a requested scheme was rolled back (else exit {EXIT_FALLBACK})")
    _model_options(opt)
    opt.add_argument("--report", default=None, metavar="HTML",
                     help="write an HTML report (and the run as JSON beside it)")
    opt.add_argument("--quiet", action="store_true", help="print nothing but warnings, errors and the outcome")
    opt.add_argument("--json", action="store_true", help="print the run as one JSON document on stdout")
    opt.add_argument("--force", action="store_true", help="allow the output to overwrite the input")
    opt.add_argument("--no-verify", action="store_true", help="skip verification (models ONNX Runtime cannot run)")
    opt.add_argument("--no-speed-check", action="store_true",
                     help="keep passes that make the model slower on this machine (default: each pass is timed "
                          "against the graph before it and rolled back if measurably slower)")
    opt.set_defaults(handler=_run("optimize"))

    cmp = commands.add_parser("compare", help="A/B test two models on the same inputs", formatter_class=raw,
                              description="Compare two models (each any MODEL form, torch or ONNX) on the same "
                                          "inputs: fidelity, interleaved latency with 95% confidence "
                                          "intervals, peak memory, parameter and file size, and a verdict.",
                              epilog=MODEL_HELP)
    cmp.add_argument("a", metavar="A", help="the reference model (e.g. the original)")
    cmp.add_argument("b", metavar="B", help="the candidate (e.g. the optimized ONNX)")
    _model_options(cmp)
    cmp.add_argument("--labels", default=None, help=".npy/.pt/.txt class labels of the --calibration rows: "
                     "report top-1 accuracy of each model")
    cmp.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds (default 20)")
    cmp.add_argument("--report", default=None, metavar="HTML", help="write an HTML comparison with plots")
    cmp.add_argument("--json", action="store_true", help="print the comparison as JSON on stdout")
    cmp.set_defaults(handler=_run("compare"))

    tun = commands.add_parser("tune", help="search the optimization config under an accuracy budget",
                               formatter_class=raw, epilog=MODEL_HELP,
                               description="Search levels, int8 schemes, float fallbacks, SmoothQuant α, "
                                           "pruning and fine-tune length (Optuna) for the fastest model whose "
                                           "--eval score drops by at most --budget; every trial is optimized, "
                                           "scored and timed against the original on --target.")
    tun.add_argument("model", metavar="MODEL", help="the model (forms below)")
    tun.add_argument("--eval", required=True, metavar="MODULE:FUNCTION",
                     help="evaluate(module) -> float, higher is better (module.py:function also works)")
    tun.add_argument("--budget", type=float, required=True, help="largest allowed drop of the --eval score")
    tun.add_argument("--trials", type=int, default=40, help="the study's total trials (default 40)")
    tun.add_argument("--timeout", type=float, default=None, help="stop this run after this many seconds")
    tun.add_argument("--target", choices=["torch", "inductor", "onnxruntime"], default="torch",
                     help="where the model will run; trials are timed there against the original")
    tun.add_argument("--objectives", default="latency", help="comma-separated: latency, size, fidelity")
    tun.add_argument("--storage", default=None, metavar="URL", help="an SQLAlchemy URL (postgresql://…) to share "
                      "the study across machines (default: SQLite beside -o)")
    tun.add_argument("--study", default=None, help="study name (default: from the model, target and budget)")
    tun.add_argument("--seed", type=int, default=0)
    tun.add_argument("-o", "--output", default="best.json", help="where to write the best config (default best.json)")
    tun.add_argument("--report", default=None, metavar="HTML", help="the HTML report (default: beside -o)")
    tun.add_argument("--quiet", action="store_true", help="no per-trial lines")
    _model_options(tun)
    tun.set_defaults(handler=_run("tune"))

    demo = commands.add_parser("demo", help="the whole pipeline on a built-in model, explained as it runs",
                               add_help=False)
    demo.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the demo (graphopt demo --help)")
    demo.set_defaults(handler=_demo)

    rep = commands.add_parser("report", help="show a saved run (the JSON written by --report)")
    rep.add_argument("run", help="the run's .json")
    rep.add_argument("--html", default=None, help="also render it as HTML here")
    rep.set_defaults(handler=_report)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from . import demo
    return int(demo.main(list(args.rest)) or 0)


def _report(args: argparse.Namespace) -> int:
    from ..report import load_report
    from ..report.html import write_html
    report = load_report(args.run)
    print(report)
    if args.html:
        write_html(report, args.html)
        print(f"wrote {args.html}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
