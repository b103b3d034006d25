"""MODEL on the command line: every form a user has, loaded into a torch module or an ONNX path.

    graphopt optimize ./all-MiniLM-L6-v2/ …        a Hugging Face folder (config.json + weights)
    graphopt optimize model.safetensors …          weights next to their config.json
    graphopt optimize model.pt …                   TorchScript (torch.jit.save)
    graphopt optimize model.pt2 …                  a torch.export program (torch.export.save)
    graphopt optimize model.pth --trust-pickle …   a pickled nn.Module (torch.save(model)): pickle runs code
    graphopt optimize mypkg.models:build …         a factory in an importable module (the current folder included)
    graphopt optimize path/to/models.py:build …    a factory in a file
    graphopt optimize model.onnx …                 ONNX (with its external data file, if any)

A factory returns a model, `(model, example_inputs)` or `(model, args, kwargs)`.
Transformers and the model's own code are imported only here, when needed.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, OptionError, first_line

#: `--task` values and the transformers Auto class each loads.
TASKS = {"feature-extraction": "AutoModel", "text-classification": "AutoModelForSequenceClassification",
         "token-classification": "AutoModelForTokenClassification", "question-answering": "AutoModelForQuestionAnswering",
         "fill-mask": "AutoModelForMaskedLM", "text-generation": "AutoModelForCausalLM",
         "image-classification": "AutoModelForImageClassification"}

MODEL_FORMS = ("a Hugging Face folder, a .safetensors file beside its config.json, TorchScript (.pt), "
               "a torch.export program (.pt2), a pickled nn.Module (--trust-pickle), module:factory, "
               "path/to/file.py:factory, or an .onnx file")


@dataclass
class LoadedModel:
    """What MODEL named: a torch module (with what is known about its inputs) or an ONNX file."""
    source: str
    kind: str                                   # hf-folder | safetensors | torchscript | pt2 | pickle | factory | onnx
    name: str
    module: Any = None                          # torch.nn.Module, None for ONNX
    onnx_path: Path | None = None
    args: tuple | None = None                   # example inputs the model came with (factory, .pt2)
    kwargs: dict = field(default_factory=dict)
    hf_config: Any = None                       # transformers config, for example inputs
    folder: Path | None = None                  # where a tokenizer / image processor may live

    @property
    def is_onnx(self) -> bool:
        return self.onnx_path is not None

    def torch_module(self, args: tuple, kwargs: dict) -> tuple[Any, tuple, dict]:
        """(module, args, kwargs) to optimize. TorchScript is converted to a torch.export program on these
        inputs, passed positionally (torch.export cannot trace a script's methods: they have a schema, not
        a Python signature)."""
        if self.kind != "torchscript":
            return self.module, args, kwargs
        from torch._export.converter import TS2EPConverter
        names = [a.name for a in self.module.forward.schema.arguments if a.name != "self"]
        positional = tuple(args) + tuple(kwargs[n] for n in names[len(args):] if n in kwargs)
        try:
            return TS2EPConverter(self.module, positional).convert().module(), positional, {}
        except Exception as exc:  # noqa: BLE001  (the converter raises many kinds)
            raise InputError(f"{self.source}: cannot convert this TorchScript model to a torch.export program: "
                             f"{first_line(exc, 300)}") from exc

    def describe(self) -> str:
        return f"{self.name} ({KIND_NAMES[self.kind]}, {self.source})"


KIND_NAMES = {"hf-folder": "Hugging Face folder", "safetensors": "safetensors + config", "torchscript": "TorchScript",
              "pt2": "torch.export program", "pickle": "pickled nn.Module", "factory": "Python factory",
              "onnx": "ONNX"}


def load(spec: str, task: str | None = None, trust_pickle: bool = False) -> LoadedModel:
    """Load MODEL; raises `InputError` saying which forms exist when `spec` is none of them."""
    path = Path(spec)
    if path.is_dir():
        return _hf_folder(spec, path, task)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        if not path.is_file():
            raise InputError(f"{spec}: no such ONNX file")
        return LoadedModel(spec, "onnx", path.stem, onnx_path=path, folder=path.parent)
    if path.is_file():
        if suffix == ".safetensors":
            return _safetensors(spec, path, task)
        if suffix == ".pt2":
            return _pt2(spec, path)
        if suffix in (".pt", ".pth", ".bin", ".ts", ".jit"):
            return _torch_file(spec, path, trust_pickle)
        raise InputError(f"MODEL {spec}: unknown file type {suffix or '(none)'}; MODEL is {MODEL_FORMS}")
    if ":" in spec:
        return _factory(spec)
    raise InputError(f"MODEL {spec}: no such file or folder, and not module:factory; MODEL is {MODEL_FORMS}")


# --- Hugging Face ------------------------------------------------------------------------------------

def _transformers() -> Any:
    import logging
    for noisy in ("torchao", "torch.utils._pytree"):   # transformers imports torchao: its optional kernels'
        logging.getLogger(noisy).setLevel(logging.ERROR)   # load failures and Enum-registration deprecations
    try:
        import transformers
    except ImportError as exc:
        raise InputError("loading a Hugging Face model needs transformers: pip install transformers") from exc
    transformers.logging.set_verbosity_error()
    return transformers


def _hf_class(transformers: Any, config: Any, task: str | None) -> Any:
    if task is not None:
        if task not in TASKS:
            raise OptionError(f"--task {task}: choose one of {', '.join(TASKS)}")
        return getattr(transformers, TASKS[task])
    for name in getattr(config, "architectures", None) or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModel


def _hf_config(folder: Path, spec: str) -> Any:
    if not (folder / "config.json").is_file():
        raise InputError(f"MODEL {spec}: no config.json in {folder}; a Hugging Face folder holds config.json "
                         f"and its weights (MODEL is {MODEL_FORMS})")
    try:
        return _transformers().AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{folder / 'config.json'}: not a Hugging Face config: {exc}") from exc


def _hf_folder(spec: str, folder: Path, task: str | None) -> LoadedModel:
    config = _hf_config(folder, spec)
    cls = _hf_class(_transformers(), config, task)
    try:
        model = cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"MODEL {spec}: transformers could not load the folder: {first_line(exc, 300)}") from exc
    return LoadedModel(spec, "hf-folder", _folder_name(folder), module=model.eval(), hf_config=config,
                       folder=folder)


def _folder_name(folder: Path) -> str:
    """The folder's name as the user wrote it: `./all-MiniLM-L6-v2/` is `all-MiniLM-L6-v2`, a symlink keeps its
    own name (not its target's, e.g. a package's `model/`), `.` is the current folder's name."""
    return Path(os.path.abspath(folder)).name


def _safetensors(spec: str, path: Path, task: str | None) -> LoadedModel:
    config = _hf_config(path.parent, f"{spec} (a .safetensors file holds only weights: its config.json "
                                      f"must be beside it)")
    from safetensors.torch import load_file
    cls = _hf_class(_transformers(), config, task)
    model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)   # Auto* | a model class
    state = load_file(str(path))
    prefix = getattr(model, "base_model_prefix", "")
    own = set(model.state_dict())
    if prefix and not own & set(state) and {f"{prefix}.{k}" for k in state} & own:
        state = {f"{prefix}.{k}": v for k, v in state.items()}   # a base model's weights for a task model
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or len(missing) == len(own):
        raise InputError(f"{spec}: its tensors do not fit {type(model).__name__} from config.json "
                         f"({len(unexpected)} unexpected, {len(missing)} missing, e.g. "
                         f"{(list(unexpected) + list(missing))[:3]})")
    if missing:
        warnings.warn(f"graphopt: {spec} lacks {len(missing)} tensor(s) of {type(model).__name__} (e.g. {missing[:3]}): "
                      f"they keep their random initialization")
    return LoadedModel(spec, "safetensors", path.stem, module=model.eval(), hf_config=config, folder=path.parent)


# --- torch files -------------------------------------------------------------------------------------

def _torch_file(spec: str, path: Path, trust_pickle: bool) -> LoadedModel:
    import torch
    if _is_torchscript(path):
        return LoadedModel(spec, "torchscript", path.stem, module=torch.jit.load(str(path), map_location="cpu").eval())
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:   # noqa: BLE001  (not plain tensors: a pickled object)
        if not trust_pickle:
            raise InputError(f"{spec} is a pickled Python object: loading it runs code from the file. If you "
                             f"trust it, pass --trust-pickle (its classes must be importable from here)") from None
        warnings.warn(f"graphopt: unpickling {spec} (--trust-pickle): this runs code stored in the file")
        for folder in (str(Path.cwd()), str(path.resolve().parent)):   # where its classes' modules live
            if folder not in sys.path:
                sys.path.insert(0, folder)
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except (AttributeError, ModuleNotFoundError) as exc:
            raise InputError(f"{spec}: cannot unpickle it ({exc}); the module defining its class must be "
                             f"importable (run from its project folder)") from exc
    if isinstance(obj, torch.nn.Module):
        return LoadedModel(spec, "pickle", type(obj).__name__, module=obj.eval())
    if isinstance(obj, dict):
        raise InputError(f"{spec} holds a state_dict (weights only, {len(obj)} tensors): graphopt needs the model "
                         f"too; write a factory that builds it and loads them, and pass file.py:factory")
    raise InputError(f"{spec} holds a {type(obj).__name__}, not a torch.nn.Module")


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold the model's code (`<name>/code/…`); torch.save archives only data.pkl."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _pt2(spec: str, path: Path) -> LoadedModel:
    import torch
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{spec}: not a torch.export program (torch.export.save): {first_line(exc, 300)}") from exc
    example = getattr(program, "example_inputs", None)
    args, kwargs = (tuple(example[0]), dict(example[1])) if example else (None, {})
    return LoadedModel(spec, "pt2", path.stem, module=program.module(), args=args, kwargs=kwargs)


# --- factories ---------------------------------------------------------------------------------------

def _factory(spec: str) -> LoadedModel:
    if not spec.rpartition(":")[0] or not spec.rpartition(":")[2]:
        raise InputError(f"MODEL {spec}: module:factory needs both parts; MODEL is {MODEL_FORMS}")
    return _from_factory(spec, load_callable(spec)())


def load_callable(spec: str) -> Any:
    """The callable named by `package.module:name` or `path/to/file.py:name` (a factory, an evaluate function)."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise InputError(f"{spec!r}: give module:function or file.py:function")
    if target.endswith(".py"):
        module = _import_file(Path(target), spec)
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))   # a module in the current folder, as `python -m` finds it
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise InputError(f"cannot load {spec!r}: {exc}") from exc
    value = getattr(module, attr, None)
    if not callable(value):
        raise InputError(f"cannot load {spec!r}: {target} has no callable {attr!r}")
    return value


def _import_file(path: Path, spec: str) -> Any:
    if not path.is_file():
        raise InputError(f"cannot load {spec!r}: no such file {path}")
    name = f"graphopt_user_{path.stem}"
    sys.path.insert(0, str(path.resolve().parent))   # its sibling modules import as they would from there
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


def _from_factory(spec: str, built: Any) -> LoadedModel:
    import torch
    if isinstance(built, torch.nn.Module):
        return LoadedModel(spec, "factory", type(built).__name__, module=built.eval())
    if not isinstance(built, tuple) or len(built) not in (2, 3) or not isinstance(built[0], torch.nn.Module):
        raise InputError(f"{spec} must return a model, (model, example_inputs) or (model, args, kwargs), "
                         f"got {type(built).__name__}")
    model, example = built[0], built[1]
    kwargs = dict(built[2]) if len(built) == 3 else {}
    if isinstance(example, dict):
        example, kwargs = (), {**example, **kwargs}
    elif not isinstance(example, tuple):
        example = tuple(example) if isinstance(example, list) else (example,)
    return LoadedModel(spec, "factory", type(model).__name__, module=model.eval(), args=example, kwargs=kwargs)


def file_bytes(path: str | Path) -> int:
    """Size of a model file on disk, with an ONNX file's external data files."""
    path = Path(path)
    total = path.stat().st_size
    if path.suffix.lower() == ".onnx":
        import onnx
        from onnx.external_data_helper import uses_external_data

        from ..onnx.files import all_tensors
        proto = onnx.load(str(path), load_external_data=False)
        locations = {entry.value for t in all_tensors(proto)
                     if uses_external_data(t) for entry in t.external_data if entry.key == "location"}
        total += sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file())
    return total


__all__ = ["LoadedModel", "load", "TASKS", "MODEL_FORMS", "file_bytes"]
