"""Reading and writing ONNX files safely.

- `load_model` turns a truncated or corrupted file into an `InputError`
  (never a protobuf traceback), and refuses external-data references whose
  location escapes the model's directory (`../../etc/passwd`, absolute paths).
- `save_model` writes atomically: a temporary file in the destination's
  directory, then `os.replace`, so a crash never leaves a half-written
  model. Models over 2 GB (protobuf's limit) get their tensors in an
  external-data file beside the model.
- `check_destination` refuses to overwrite the input without `force`.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Protocol

import onnx
from onnx.external_data_helper import uses_external_data

from graphopt.errors import InputError, OptionError, first_line

#: protobuf cannot serialize a message of 2 GiB or more.
PROTOBUF_LIMIT = 2**31 - 1
#: tensors from this size up go to the external-data file (small shape constants stay inline).
EXTERNAL_MIN_BYTES = 1024


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load `path` with its external data, or raise `InputError` saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise InputError(f"{path}: not a readable ONNX model (truncated or corrupted?): "
                         f"{type(exc).__name__}: {exc}") from exc
    if not model.graph.node and not model.graph.output:
        raise InputError(f"{path}: not a readable ONNX model (empty graph: truncated or not an ONNX file?)")
    _check_external_data(model, path.parent)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise InputError(f"{path}: cannot read its external data: {type(exc).__name__}: {exc}") from exc
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise InputError(f"{path}: invalid ONNX model: {first_line(exc)}") from exc
    return model


def _check_external_data(model: onnx.ModelProto, base: Path) -> None:
    root = base.resolve()
    for tensor in all_tensors(model):
        if not uses_external_data(tensor):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        target = (root / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(root):
            raise InputError(f"tensor {tensor.name!r} refers to external data {location!r} outside the "
                             f"model's directory {root}: refused")
        if not target.is_file():
            raise InputError(f"tensor {tensor.name!r}: external data file {location!r} is missing")


def check_destination(src: str | os.PathLike | None, dst: str | os.PathLike, force: bool = False) -> Path:
    """The resolved output path; refuses to overwrite the input unless `force`."""
    dst = Path(dst)
    if dst.suffix.lower() != ".onnx":
        raise OptionError(f"output {dst} must end in .onnx")
    if src is not None and dst.resolve() == Path(src).resolve() and not force:
        raise OptionError(f"output {dst} is the input file: refused (pass force=True / --force to overwrite it)")
    if not dst.parent.resolve().is_dir():
        raise OptionError(f"output directory {dst.parent} does not exist")
    return dst


class SavesItself(Protocol):
    """A model that writes its own file (`OnnxModel.save`): large weights straight from its arrays."""

    def save(self, path: Path, data_location: str) -> bool: ...


def save_model(model: onnx.ModelProto | SavesItself, path: str | os.PathLike,
               check: Callable[[Path], None] | None = None) -> Path:
    """Write `model` to `path` atomically; external data beside it when over 2 GB.

    `check(tmp_path)` runs on the written temporary file before it is renamed
    into place: if it raises, nothing is left at `path`. Saving a proto with external
    data moves the tensors out of it (onnx's own behaviour).
    """
    path = Path(path)
    directory = path.parent.resolve()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    data_name = path.name + ".data"
    tmp_data = directory / f".{data_name}.tmp"
    try:
        if not isinstance(model, onnx.ModelProto):
            external = model.save(tmp, tmp_data.name)
        elif model.ByteSize() >= PROTOBUF_LIMIT:
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=tmp_data.name, size_threshold=EXTERNAL_MIN_BYTES)
            external = True
        else:
            onnx.save_model(model, str(tmp))
            external = False
        if check is not None:
            check(tmp)
        if external:
            _relocate_external_data(tmp, tmp_data.name, data_name)
            os.replace(tmp_data, directory / data_name)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp_data):
            if leftover.exists():
                leftover.unlink()
    return path


def _relocate_external_data(model_path: Path, old: str, new: str) -> None:
    """Point the saved model's external-data entries at the final data file name."""
    model = onnx.load(str(model_path), load_external_data=False)
    for tensor in all_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save_model(model, str(model_path))


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of `model`: initializers and tensor attributes, in subgraphs too.

    onnx has no public iterator for this; `onnx.external_data_helper._get_all_tensors` is the one its own
    external-data functions use. This is the one place graphopt calls it (pinned by onnx>=1.16's API)."""
    return onnx.external_data_helper._get_all_tensors(model)

