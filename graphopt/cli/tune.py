"""`graphopt tune MODEL --eval module:function --budget B …`: search the config, print a line per trial,
write the best config (JSON for `graphopt optimize --config`) and an HTML report.

The study lives in a SQLite file beside the output (`best.json` → `best.tune.db`) unless `--storage URL`
names a database: running the same command again resumes it; the same command with the same
`--storage URL --study NAME` on several machines shares the trials. `--calibration` batches are the
calibration data, and (pure distillation from the original) the fine-tune data.
"""
from __future__ import annotations

import argparse
import json
import re

from ..errors import OptionError
from ..frontend import datasets, loaders
from ..outputs import check_writable, write_atomic
from . import EXIT_FALLBACK, EXIT_OK
from .progress import Console


def run(args: argparse.Namespace) -> int:
    import graphopt
    console = Console(quiet=args.quiet)
    output = check_writable(args.output)
    if output.suffix.lower() != ".json":
        raise OptionError(f"output {output} must end in .json (the best config, for graphopt optimize --config)")
    report_path = check_writable(args.report, "report") if args.report else output.with_suffix(".html")
    if args.budget < 0:
        raise OptionError(f"--budget {args.budget:g}: the largest allowed drop of the --eval score, ≥ 0")
    evaluate = loaders.load_callable(args.eval)
    shapes = datasets.parse_shapes(args.input_shape)
    console.stage(f"loading {args.model}")
    loaded = loaders.load(args.model, args.task, args.trust_pickle)
    if loaded.is_onnx:
        raise OptionError("graphopt tune searches torch models (ONNX files are optimized with graphopt optimize)")
    example_args, example_kwargs, batches = datasets.torch_inputs(loaded, shapes, args.calibration, args.batch_size)
    module, example_args, example_kwargs = loaded.torch_module(example_args, example_kwargs)
    study = args.study or _study_name(loaded.name, args.target, args.budget)
    storage = args.storage or str(output.with_suffix(".tune.db"))
    console.stage(f"tuning {loaded.describe()} on {args.target}: study {study!r} in "
                  f"{'SQLite ' + storage if not args.storage else 'the --storage database'}")
    result = graphopt.tune(module, example_args, example_kwargs=example_kwargs, evaluate=evaluate,
                           accuracy_budget=args.budget, objectives=tuple(args.objectives.split(",")),
                           target=args.target, trials=args.trials, timeout=args.timeout, storage=storage,
                           study_name=study, calibration_data=batches, train_data=batches, seed=args.seed,
                           progress=not args.quiet)
    result.to_html(report_path)
    if result.best is None:
        console.warn(f"no trial was within --budget {args.budget:g} of the original's score "
                     f"{result.reference_score:.4g}; nothing written but the report {report_path}")
        return EXIT_FALLBACK
    write_atomic(output, json.dumps(result.to_json(), indent=2) + "\n")
    row = result.best_row
    timed = result.final[0] if result.final else row
    print(f"best: trial {row['trial']}: {timed['latency_ratio']:.3f}× the original's latency on {args.target} "
          f"({timed['verdict']}{', in the final' if result.final else ''}), score {row['score']:.4g} "
          f"(original {result.reference_score:.4g})")
    print(f"wrote {output} (graphopt optimize MODEL --config {output} …) and {report_path}")
    return EXIT_OK


def _study_name(model: str, target: str, budget: float) -> str:
    """The same command resumes the same study: named after what it searches."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{model}-{target}-budget{budget:g}")
