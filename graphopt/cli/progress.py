"""What the command line prints while it works (stderr) and what it concludes (stdout).

`pass_line(record)` is the one line printed per pass: name, time, nodes,
error against the original, and what happened (changed, no change, rolled
back and why). `Console` prints stages and those lines unless `--quiet` or
`--json` asked for silence; warnings and failures always reach stderr.
"""
from __future__ import annotations

import sys
import time

from ..report import PassRecord
from ..report.formatting import format_bytes, format_error


def pass_line(record: PassRecord) -> str:
    """One line for one finished pass."""
    if record.rolled_back:
        status = f"ROLLED BACK: {record.reason or 'no reason given'}"
    elif record.modified:
        matches = ", ".join(f"{k}×{v}" for k, v in record.matches.items())
        status = "changed" + (f" ({matches})" if matches else "")
    else:
        status = "no change"
    error = format_error(record)
    return (f"  {'✗' if record.rolled_back else '✓' if record.modified else '·'} {record.name:<28} "
            f"{record.wall_s:7.2f} s  {record.nodes:>6} nodes  {format_bytes(record.param_bytes):>10}  "
            f"{error:<22}  {status}")


class Console:
    """Stage lines and pass lines on stderr, with the time since the command started."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.start = time.perf_counter()

    def stage(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.start:6.1f} s] {message}", file=sys.stderr, flush=True)

    def record(self, record: PassRecord) -> None:
        if not self.quiet:
            print(pass_line(record), file=sys.stderr, flush=True)

    @staticmethod
    def warn(message: str) -> None:
        """Always shown: a framed message a user cannot miss."""
        bar = "!" * 78
        print(f"{bar}\ngraphopt: {message}\n{bar}", file=sys.stderr, flush=True)


__all__ = ["pass_line", "Console"]
