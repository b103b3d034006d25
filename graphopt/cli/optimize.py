"""`graphopt optimize MODEL -o OUT.onnx …`: load, optimize, export, report, and say honestly what happened.

Order of work: the output and report folders are checked first (a read-only
folder fails in a second, not after the run); then MODEL is loaded, its
example inputs and calibration batches built, the model optimized (torch:
`graphopt.optimize` then `export_onnx`; ONNX: `optimize_onnx`), one line
printed per pass, the report written. A requested int8 scheme or pruning
that was rolled back, or a result outside `--accuracy-budget`, is announced
in a frame on stderr and exits with status 3 unless `--allow-fallback`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from ..engine.rules import Reason
from ..engine.schemes import Scheme
from ..errors import OptionError
from ..frontend import datasets, loaders
from ..outputs import apply_umask, check_writable, write_atomic
from ..report import PassRecord, Report, environment
from ..search import recipe
from . import EXIT_FALLBACK, EXIT_OK, SCHEMES
from .progress import Console


def run(args: argparse.Namespace) -> int:
    console = Console(quiet=args.quiet or args.json)
    output = check_writable(args.output)
    if output.suffix.lower() != ".onnx":
        raise OptionError(f"output {output} must end in .onnx")
    report_path = check_writable(args.report, "report") if args.report else None
    if report_path is not None and report_path.suffix.lower() not in (".html", ".htm"):
        raise OptionError(f"--report {report_path} must end in .html (the run's JSON is written beside it)")
    shapes = datasets.parse_shapes(args.input_shape)
    quantize = SCHEMES[args.int8] if args.int8 else None

    console.stage(f"loading {args.model}")
    loaded = loaders.load(args.model, args.task, args.trust_pickle)
    console.stage(f"loaded {loaded.describe()}")
    if loaded.is_onnx:
        report = _optimize_onnx(args, loaded, quantize, shapes, console)
    else:
        report = _optimize_torch(args, loaded, quantize, shapes, console)
    for path in (output, output.with_name(output.name + ".data")):
        if path.exists():
            apply_umask(path)
    report.meta.update(model=loaded.name, model_source=loaded.source, model_form=loaders.KIND_NAMES[loaded.kind],
                       output=str(output), file_bytes=loaders.file_bytes(output), **environment())
    source_bytes = _source_bytes(Path(loaded.source))
    if source_bytes:
        report.meta["source_bytes"] = source_bytes
    problems = outcome(report, args.accuracy_budget, args.prune)
    report.meta["outcome"] = problems or ["as requested"]
    if report_path is not None:
        from ..report.html import write_html
        write_html(report, report_path)
        write_atomic(report_path.with_suffix(".json"), report.to_json())
    if args.json:
        print(json.dumps({**report.to_dict(), "problems": problems}, indent=2, default=str))
    elif not args.quiet:
        print(report)
    for problem in problems:
        console.warn(problem + ("" if args.allow_fallback else
                                f" (exit status {EXIT_FALLBACK}; --allow-fallback accepts this)"))
    if not args.json:
        print(f"wrote {output}" + (f", {report_path} and {report_path.with_suffix('.json')}" if report_path else ""))
    return EXIT_FALLBACK if problems and not args.allow_fallback else EXIT_OK


def _optimize_torch(args: argparse.Namespace, loaded: loaders.LoadedModel, quantize: str | None,
                    shapes: dict, console: Console) -> Report:
    import graphopt
    example_args, example_kwargs, batches = datasets.torch_inputs(loaded, shapes, args.calibration, args.batch_size)
    module, example_args, example_kwargs = loaded.torch_module(example_args, example_kwargs)
    console.stage(f"example inputs: {_describe_inputs(example_args, example_kwargs)}"
                  + (f"; {len(batches)} calibration batch(es) from {args.calibration}" if batches else ""))
    if args.config:
        return _optimize_config(args, module, example_args, example_kwargs, batches, console)
    console.stage(f"capturing with torch.export and optimizing at {args.level or 'the level the options imply'}")
    opt = graphopt.optimize(module, example_args, example_kwargs=example_kwargs, level=args.level,
                            quantize=quantize or "auto", prune=args.prune, calibration_data=batches,
                            accuracy_budget=args.accuracy_budget, verify=not args.no_verify,
                            speed_check=not args.no_speed_check,
                            progress=not console.quiet, on_record=console.record)
    console.stage(f"exporting to ONNX: {args.output}")
    _silence_exporter_registry()
    graphopt.export_onnx(opt, example_args, args.output, example_kwargs=example_kwargs,
                         output_names=args.output_names.split(",") if args.output_names else None,
                         on_record=_export_line(console), ops=args.ops)
    return opt.report


def _optimize_config(args: argparse.Namespace, module: Any, example_args: tuple, example_kwargs: dict,
                     batches: list | None, console: Console) -> Report:
    """The configuration `graphopt tune` chose (recipe.build: optimize, then finetune where it fine-tuned)."""
    import graphopt
    clashing = [flag for flag, value in (("--level", args.level), ("--int8", args.int8), ("--prune", args.prune),
                                         ("--accuracy-budget", args.accuracy_budget)) if value is not None]
    if clashing:
        raise OptionError(f"--config sets the options itself: drop {', '.join(clashing)}")
    config, finetune = recipe.load(args.config)
    console.stage(f"optimizing with the configuration in {args.config}"
                  + (f", then fine-tuning {finetune.get('epochs')} epoch(s) on --calibration" if finetune else ""))
    opt = recipe.build(module, example_args, config, finetune, example_kwargs=example_kwargs,
                       calibration_data=batches, train_data=batches, progress=not console.quiet,
                       on_record=console.record, measure_latency=not args.no_speed_check)
    console.stage(f"exporting to ONNX: {args.output}")
    _silence_exporter_registry()
    graphopt.export_onnx(opt, example_args, args.output, example_kwargs=example_kwargs, on_record=_export_line(console),
                         ops=args.ops)
    return opt.report


def _optimize_onnx(args: argparse.Namespace, loaded: loaders.LoadedModel, quantize: str | None,
                   shapes: dict, console: Console) -> Report:
    if args.prune is not None:
        raise OptionError("--prune needs a torch model; ONNX files are not pruned")
    if args.config:
        raise OptionError("--config holds a configuration graphopt tune chose for a torch model, not for ONNX")
    from ..onnx import optimize_onnx
    feeds = datasets.onnx_feeds(loaded, args.calibration, shapes, args.batch_size)
    if feeds:
        console.stage(f"{len(feeds)} calibration feed(s) from {args.calibration}")
    console.stage(f"optimizing {loaded.onnx_path} in ONNX Runtime")
    if args.output_names:
        raise OptionError("--output-names renames a torch model's outputs; an ONNX file keeps its own")
    if args.ops != "standard":
        raise OptionError(f"--ops {args.ops} chooses the operators a torch model is exported with; an ONNX file "
                          "keeps its own")
    return optimize_onnx(loaded.onnx_path, args.output, level=args.level, quantize=quantize,
                         calibration_data=feeds, accuracy_budget=args.accuracy_budget, force=args.force,
                         verify=not args.no_verify, speed_check=not args.no_speed_check,
                         progress=not console.quiet, on_record=console.record)


def _silence_exporter_registry() -> None:
    """torch's ONNX exporter logs a warning per torchvision op it skips when torchvision is absent: noise."""
    import logging
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def _export_line(console: Console):
    """The export's passes as progress lines, named as export passes (the optimize passes came before)."""
    def line(record: PassRecord) -> None:
        console.record(dataclasses.replace(record, name=f"export: {record.name}"))
    return line


def outcome(report: Report, accuracy_budget: float | None, prune: float | None) -> list[str]:
    """What the user asked for and did not get: each a sentence, empty when all was done."""
    problems = []
    scheme = report.meta.get("quantize")
    if scheme:
        problems += _not_applied(report, scheme, {Scheme(scheme).pass_name, Scheme(scheme).onnx_pass_name})
    if prune is not None:
        problems += _not_applied(report, f"pruning {prune:g}", {"structured_pruning"})
    final = report.final
    if accuracy_budget is not None and final is not None and final.min_cosine is not None \
            and final.min_cosine < 1 - accuracy_budget:
        problems.append(f"the result misses --accuracy-budget {accuracy_budget:g}: min cosine to the original "
                        f"{final.min_cosine:.5f} < {1 - accuracy_budget:.5f}")
    return problems


def _not_applied(report: Report, what: str, names: set[str]) -> list[str]:
    records = [r for r in report.records if r.name.split(" (step")[0] in names]
    if any(r.modified and not r.rolled_back for r in records):
        return []
    rolled = [r for r in records if r.rolled_back]
    if rolled:
        return [f"{what} was requested but ROLLED BACK: {rolled[0].reason}; the model written does not have it"]
    reasons = [code for r in records for code in r.reasons]
    if reasons and all(code == Reason.EXCLUDED for code in reasons):
        return []   # every candidate is one the user's own exclude list keeps float: as requested
    if records:
        rejected = records[0].stats.get("rejected") or []
        why = f" ({len(rejected)} candidate(s) rejected, e.g. {rejected[0]})" if rejected else ""
        return [f"{what} was requested but changed nothing{why}; the model written does not have it"]
    return [f"{what} was requested but its pass did not run at this level"]


def _describe_inputs(args: tuple, kwargs: dict) -> str:
    def one(value: Any) -> str:
        shape = getattr(value, "shape", None)
        return f"{str(value.dtype).removeprefix('torch.')}[{','.join(map(str, shape))}]" if shape is not None \
            else type(value).__name__
    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return ", ".join(parts) or "none"


def _source_bytes(path: Path) -> int | None:
    """Bytes of the model on disk: a file (with ONNX external data) or a folder's weight files."""
    if path.is_file():
        return loaders.file_bytes(path)
    if path.is_dir():
        weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth")]
        return sum(p.stat().st_size for p in weights) or None
    return None


__all__ = ["run", "outcome"]
