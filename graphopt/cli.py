"""The `graphopt` command line.

    graphopt optimize MODEL -o OUT.onnx [--level O1|O2|O3] [--int8 dynamic|static|weight-only]
                                        [--prune R] [--calibration DIR_OR_NPZ] [--report report.html]
    graphopt demo
    graphopt report RUN.json [--html report.html]

MODEL is an `.onnx` file (optimized with `optimize_onnx`) or
`package.module:factory`, a Python callable returning `(model, example_inputs)`
(or `(model, args, kwargs)`): the torch model is optimized with
`graphopt.optimize` and exported with `graphopt.export_onnx`. `--report`
writes an HTML report and, beside it, the run as JSON (for `graphopt report`).
Exit status: 0 on success; 2 with a one-line `graphopt: error: …` for bad
input or options; 1 with a one-line message for anything unexpected.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import GraphoptError, InputError, OptionError

SCHEMES = {"dynamic": "int8-dynamic", "static": "int8-static", "weight-only": "int8-weight-only"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except GraphoptError as exc:
        return _fail(f"error: {exc}", 2)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:  # noqa: BLE001  (one line, never a traceback, for any failure)
        return _fail(f"{type(exc).__name__}: {exc}", 1)


def _fail(message: str, code: int) -> int:
    print(f"graphopt: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphopt", description="Compiler-style graph optimizer for PyTorch "
                                     "and ONNX models, verified pass by pass.")
    commands = parser.add_subparsers(dest="command", required=True)
    opt = commands.add_parser("optimize", help="optimize an ONNX file or a torch model factory into an ONNX file")
    opt.add_argument("model", help="an .onnx file, or package.module:factory returning (model, example_inputs)")
    opt.add_argument("-o", "--output", required=True, help="where to write the optimized .onnx")
    opt.add_argument("--level", choices=["O0", "O1", "O2", "O3"], default=None)
    opt.add_argument("--int8", choices=sorted(SCHEMES), default=None, help="int8 scheme (implies O2)")
    opt.add_argument("--prune", type=float, default=None, help="structured pruning ratio (torch models, O3)")
    opt.add_argument("--calibration", default=None, help="an .npz file or a directory of them (one feed each)")
    opt.add_argument("--report", default=None, help="write an HTML report (and the run as JSON beside it)")
    opt.add_argument("--force", action="store_true", help="allow the output to overwrite the input")
    opt.add_argument("--no-verify", action="store_true", help="skip verification (models ONNX Runtime cannot run)")
    opt.set_defaults(handler=_optimize)
    demo = commands.add_parser("demo", help="run the whole pipeline on a built-in model")
    demo.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the demo")
    demo.set_defaults(handler=_demo)
    rep = commands.add_parser("report", help="show a saved run (the JSON written by --report)")
    rep.add_argument("run", help="the run's .json")
    rep.add_argument("--html", default=None, help="also render it as HTML here")
    rep.set_defaults(handler=_report)
    return parser


def _optimize(args: argparse.Namespace) -> int:
    quantize = SCHEMES[args.int8] if args.int8 else None
    if args.model.lower().endswith(".onnx"):
        if args.prune is not None:
            raise OptionError("--prune needs a torch model (package.module:factory); ONNX files are not pruned")
        from .onnx import optimize_onnx
        report = optimize_onnx(args.model, args.output, level=args.level, quantize=quantize,
                               calibration_data=args.calibration, force=args.force, verify=not args.no_verify)
    else:
        report = _optimize_torch(args, quantize)
    if args.report:
        from .report_html import write_html
        write_html(report, args.report)
        Path(args.report).with_suffix(".json").write_text(report.to_json())
    print(report)
    print(f"wrote {args.output}" + (f" and {args.report}" if args.report else ""))
    return 0


def _optimize_torch(args: argparse.Namespace, quantize: str | None) -> Any:
    import graphopt
    from .onnx import export_onnx
    from .onnx.files import check_destination
    check_destination(None, args.output)
    model, example_args, example_kwargs = load_factory(args.model)
    calibration = _torch_calibration(args.calibration, model, example_args) if args.calibration else None
    opt = graphopt.optimize(model, example_args, example_kwargs=example_kwargs, level=args.level,
                            quantize=quantize, prune=args.prune, calibration_data=calibration,
                            verify=not args.no_verify)
    export_onnx(opt, example_args, args.output, example_kwargs=example_kwargs)
    opt.report.meta["output"] = args.output
    return opt.report


def load_factory(spec: str) -> tuple[Any, tuple, dict]:
    """Import `package.module:factory` and call it: (model, args) or (model, args, kwargs)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"MODEL {spec!r} is neither an .onnx file nor package.module:factory")
    if Path(spec).exists() or module_name.endswith((".pt", ".pth")):
        raise InputError(f"MODEL {spec!r}: pass an .onnx file or package.module:factory")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"cannot load {spec!r}: {exc}") from exc
    built = factory()
    if not isinstance(built, tuple) or len(built) not in (2, 3):
        raise InputError(f"{spec} must return (model, example_inputs) or (model, args, kwargs), "
                         f"got {type(built).__name__}")
    model, example = built[0], built[1]
    kwargs = dict(built[2]) if len(built) == 3 else {}
    if isinstance(example, dict):
        example, kwargs = (), {**example, **kwargs}
    elif not isinstance(example, tuple):
        example = tuple(example) if isinstance(example, list) else (example,)
    return model, example, kwargs


def _torch_calibration(source: str, model: Any, example_args: tuple) -> list[tuple]:
    """Calibration batches for a torch model: each .npz's arrays, in forward()'s parameter order."""
    import inspect

    import torch

    from .onnx.optimize import load_calibration
    names = list(inspect.signature(model.forward).parameters)[:len(example_args)]
    batches = []
    for feed in load_calibration(source):
        missing = [n for n in names if n not in feed]
        if missing:
            raise OptionError(f"calibration .npz lacks {', '.join(missing)} (it needs one array per input of "
                              f"forward(): {', '.join(names)})")
        batches.append(tuple(torch.from_numpy(feed[n]) for n in names))
    return batches


def _demo(args: argparse.Namespace) -> int:
    try:
        demo = importlib.import_module("graphopt.demo")
    except ModuleNotFoundError as exc:
        if exc.name != "graphopt.demo":
            raise
        raise GraphoptError("the demo is not available in this version of graphopt") from exc
    result = demo.main(list(args.rest))
    return int(result or 0)


def _report(args: argparse.Namespace) -> int:
    from .report_html import load_report, write_html
    report = load_report(args.run)
    print(report)
    if args.html:
        write_html(report, args.html)
        print(f"wrote {args.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
