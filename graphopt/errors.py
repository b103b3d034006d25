"""Errors raised by graphopt. Every user-facing failure is a `GraphoptError` subclass."""


class GraphoptError(Exception):
    """Base class of every error graphopt raises on purpose."""


class OptionError(GraphoptError, ValueError):
    """An option of `optimize` (or of a pass) is invalid, unknown or does not apply."""


class InputError(GraphoptError, TypeError):
    """The model or its example inputs are not what graphopt can work with."""


class CaptureError(GraphoptError):
    """`torch.export` could not capture the model; carries torch's reason and a hint."""

    def __init__(self, reason: str, hint: str = "") -> None:
        self.reason = reason
        self.hint = hint
        message = f"could not capture the model with torch.export: {reason}"
        if hint:
            message += f"\nhint: {hint}"
        super().__init__(message)


class VerificationError(GraphoptError):
    """An optimized graph does not compute what the original did."""


class ExportError(GraphoptError):
    """The module could not be exported to ONNX, or the written file fails its check (the ONNX checker
    or ONNX Runtime refuses it); the message names the operator and the runtime's reason."""


class UnsupportedError(GraphoptError, NotImplementedError):
    """A requested capability exists in the API but not (yet) for this model or option."""


def first_line(exc: BaseException, limit: int = 400, lines: int = 1) -> str:
    """The first non-blank line of `exc`'s message (its type's name when it has none), cut to `limit` characters:
    what a report or an error message quotes of a library's exception. With `lines` > 1, that many first
    non-blank lines joined by spaces (for libraries that spread one message over several lines)."""
    found = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (" ".join(found[:lines]) if found else type(exc).__name__)[:limit]
