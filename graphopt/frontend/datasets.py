"""Example inputs and calibration batches for the command line, from what the user has.

    --input-shape 2,128            the shape of the model's first input (name=2,128 for a named one);
                                   token ids for a Hugging Face text model, normal floats otherwise
    --calibration sentences.txt    one sentence per line, tokenized with the model's tokenizer
    --calibration images/          a folder of images (the model's image processor, or --input-shape C,H,W)
    --calibration data.npz         one batch ({input name: array}); a folder of .npz files: one batch each
    --calibration data.pt          torch.save of a tensor or {name: tensor} (one batch), or a list of batches

Without either, a Hugging Face model's inputs follow its config (token ids of
length ≤ 128, or images of the config's size). A batch is a tuple of positional
inputs or a dict of keyword inputs (torch), or a {graph input name: array} feed (ONNX).
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError, OptionError
from ..frontend.loaders import LoadedModel

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
#: Longest token sequence a text calibration file is padded to unless --input-shape says otherwise.
MAX_TEXT_TOKENS = 128
DEFAULT_BATCH = 8

Batch = Any   # tuple of positional inputs | dict of keyword inputs


def parse_shapes(specs: Sequence[str] | None) -> dict[str | None, tuple[int, ...]]:
    """`["2,128"]` → {None: (2, 128)} (the first input); `["pixel_values=1,3,32,32"]` → by name."""
    shapes: dict[str | None, tuple[int, ...]] = {}
    for spec in specs or ():
        name, _, dims = spec.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(","))
        except ValueError:
            raise OptionError(f"--input-shape {spec}: give sizes like 1,3,224,224 (or name=1,3,224,224)") from None
        if not shape or any(d <= 0 for d in shape):
            raise OptionError(f"--input-shape {spec}: sizes must be positive")
        shapes[name or None] = shape
    return shapes


def forward_names(module: Any) -> list[str]:
    """Names of forward()'s parameters (without *args / **kwargs); a TorchScript module's from its schema."""
    schema = getattr(getattr(module, "forward", None), "schema", None)
    if schema is not None:
        return [a.name for a in schema.arguments if a.name != "self"]
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


# --- torch -------------------------------------------------------------------------------------------

def torch_inputs(loaded: LoadedModel, shapes: dict, calibration: str | None,
                 batch_size: int | None = None) -> tuple[tuple, dict, list[Batch] | None]:
    """(args, kwargs, calibration batches or None) for a torch model."""
    names = forward_names(loaded.module)
    if calibration is not None:
        batches = read_batches(calibration, loaded, names, shapes, batch_size)
        first = batches[0]
        args, kwargs = (tuple(first), {}) if isinstance(first, tuple) else ((), dict(first))
        return args, kwargs, batches
    if loaded.args is not None:
        return loaded.args, loaded.kwargs, None
    return (), random_inputs(loaded, names, shapes, batch_size), None


def random_inputs(loaded: LoadedModel, names: list[str], shapes: dict, batch_size: int | None) -> dict:
    """Random keyword inputs from --input-shape or, for a Hugging Face model, from its config."""
    import torch
    config = loaded.hf_config
    generator = torch.Generator().manual_seed(0)
    vocab = getattr(config, "vocab_size", None) if config is not None else None
    if not shapes and config is not None:
        shapes = _config_shapes(config, names, batch_size)
    if not shapes:
        raise InputError(f"{loaded.describe()} does not say what inputs it takes: give --input-shape "
                         f"(e.g. 1,3,224,224) or --calibration data")
    if None in shapes:
        if not names:
            raise InputError(f"{loaded.describe()}: its forward() has no named inputs; name the input in "
                             f"--input-shape NAME=…")
        shapes = {names[0] if k is None else k: v for k, v in shapes.items()}
    unknown = [n for n in shapes if names and n not in names]
    if unknown:
        raise OptionError(f"--input-shape names {', '.join(unknown)}, which forward() does not take "
                          f"(it takes {', '.join(names)})")
    inputs = {}
    for name, shape in shapes.items():
        if vocab and name in ("input_ids", "decoder_input_ids"):
            inputs[name] = torch.randint(0, vocab, shape, generator=generator)
            mask_shape = shape
        else:
            inputs[name] = torch.randn(shape, generator=generator)
    if vocab and "input_ids" in inputs:   # a text model: real masks and segment ids alongside the token ids
        if "attention_mask" in names and "attention_mask" not in inputs:
            inputs["attention_mask"] = torch.ones(mask_shape, dtype=torch.long)
        if "token_type_ids" in names and "token_type_ids" not in inputs and getattr(config, "type_vocab_size", 0):
            inputs["token_type_ids"] = torch.zeros(mask_shape, dtype=torch.long)
    return inputs


def _config_shapes(config: Any, names: list[str], batch_size: int | None) -> dict:
    batch = batch_size or 2
    if getattr(config, "vocab_size", None) and "input_ids" in names:
        longest = getattr(config, "max_position_embeddings", None) or MAX_TEXT_TOKENS
        return {"input_ids": (batch, min(MAX_TEXT_TOKENS, longest))}
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if size and channels and "pixel_values" in names:
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return {"pixel_values": (batch, channels, *size)}
    return {}


# --- files -------------------------------------------------------------------------------------------

def read_batches(source: str, loaded: LoadedModel, names: list[str], shapes: dict,
                 batch_size: int | None) -> list[Batch]:
    """Calibration batches from a text file, an image folder, .npz file(s) or a .pt file."""
    path = Path(source)
    if not path.exists():
        raise OptionError(f"--calibration {source}: no such file or folder")
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        npz = sorted(path.glob("*.npz"))
        if images:
            return _image_batches(images, loaded, names, shapes, batch_size)
        if npz:
            return [_named(b, names, f) for f in npz for b in _npz(f)]
        raise OptionError(f"--calibration {source}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)}) "
                          f"and no .npz files")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return [_named(b, names, path) for b in _npz(path)]
    if suffix in (".pt", ".pth"):
        return _pt_batches(path, names)
    if suffix in (".txt", ".text", ".tsv", ".csv") or _is_text(path):
        return _text_batches(path, loaded, names, shapes, batch_size)
    raise OptionError(f"--calibration {source}: give a text file (one sentence per line), a folder of images, "
                      f".npz file(s) or a .pt file")


def _is_text(path: Path) -> bool:
    try:
        path.read_text(encoding="utf-8")[:4096]
    except (UnicodeDecodeError, OSError):
        return False
    return True


def _npz(path: Path) -> list[dict]:
    import numpy as np
    try:
        with np.load(path) as archive:
            return [{k: archive[k] for k in archive.files}]
    except Exception as exc:  # noqa: BLE001  (numpy raises several kinds for a bad file)
        raise OptionError(f"--calibration {path}: cannot read it as .npz: {exc}") from exc


def _named(feed: dict, names: list[str], where: Path) -> dict:
    """An .npz batch as keyword inputs: its arrays by input name (one unnamed array: the first input)."""
    import torch
    tensors = {k: torch.from_numpy(v) for k, v in feed.items()}
    if names and not set(tensors) <= set(names):
        if len(tensors) == 1 and list(tensors)[0].startswith("arr_"):
            return {names[0]: next(iter(tensors.values()))}
        raise OptionError(f"--calibration {where}: arrays {', '.join(tensors)} are not inputs of forward() "
                          f"({', '.join(names)}); name them after the inputs (np.savez(f, {names[0]}=…))")
    return tensors


def _pt_batches(path: Path, names: list[str]) -> list[Batch]:
    import torch
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise OptionError(f"--calibration {path}: not tensors saved with torch.save: {exc}") from exc
    items = data if isinstance(data, list) else [data]
    batches = []
    for item in items:
        if isinstance(item, torch.Tensor):
            batches.append((item,))
        elif isinstance(item, tuple) and all(isinstance(t, torch.Tensor) for t in item):
            batches.append(item)
        elif isinstance(item, dict):
            batches.append(dict(item))
        else:
            raise OptionError(f"--calibration {path}: a batch is a tensor, a tuple of tensors or a dict of "
                              f"them, got {type(item).__name__}")
    if not batches:
        raise OptionError(f"--calibration {path}: holds no batch")
    return batches


def _text_batches(path: Path, loaded: LoadedModel, names: list[str], shapes: dict,
                  batch_size: int | None) -> list[Batch]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise OptionError(f"--calibration {path}: no sentences (one per line)")
    tokenizer = _tokenizer(loaded, path)
    shape = shapes.get("input_ids") or shapes.get(None)
    batch = (shape[0] if shape else None) or batch_size or DEFAULT_BATCH
    if shape and len(shape) > 1:
        length = shape[1]
    else:   # the longest sentence, rounded up to a multiple of 8, within the tokenizer's limit
        longest = max(len(ids) for ids in tokenizer(lines)["input_ids"])
        limit = min(getattr(tokenizer, "model_max_length", MAX_TEXT_TOKENS) or MAX_TEXT_TOKENS, 512)
        length = min(-(-longest // 8) * 8, limit, MAX_TEXT_TOKENS)
    encoded = tokenizer(lines, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    keep = [k for k in encoded if not names or k in names]
    full = max(1, len(lines) // batch) * batch if len(lines) >= batch else len(lines)
    return [{k: encoded[k][i:i + batch] for k in keep} for i in range(0, full, batch)]


def _tokenizer(loaded: LoadedModel, source: Path) -> Any:
    folder = loaded.folder
    if folder is None or not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json",
                                                                   "spiece.model", "vocab.json")):
        raise OptionError(f"--calibration {source} is text: it is tokenized with the model's tokenizer, and "
                          f"{loaded.source} has none beside it (tokenizer.json / vocab.txt)")
    from ..frontend.loaders import _transformers
    try:
        return _transformers().AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise OptionError(f"cannot load the tokenizer in {folder}: {exc}") from exc


def _image_batches(files: list[Path], loaded: LoadedModel, names: list[str], shapes: dict,
                   batch_size: int | None) -> list[Batch]:
    import numpy as np
    import torch
    from PIL import Image
    name = "pixel_values" if "pixel_values" in names or not names else names[0]
    shape = shapes.get(name) or shapes.get(None)
    batch = (shape[0] if shape and len(shape) == 4 else None) or batch_size or DEFAULT_BATCH
    processor = _image_processor(loaded)
    if processor is None and (shape is None or len(shape) < 3):
        raise OptionError("--calibration images: give --input-shape C,H,W (or N,C,H,W) so they can be resized, "
                          "or use a Hugging Face folder with its image processor")
    pixels = []
    for f in files:
        try:
            image = Image.open(f)
        except OSError as exc:
            raise OptionError(f"--calibration {f}: not a readable image: {exc}") from exc
        if processor is not None:
            pixels.append(processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0])
            continue
        channels, height, width = shape[-3:]
        image = image.convert("L" if channels == 1 else "RGB").resize((width, height))
        array = np.asarray(image, dtype=np.float32) / 255.0
        pixels.append(torch.from_numpy(array.reshape(height, width, -1).transpose(2, 0, 1).copy()))
    stacked = torch.stack(pixels)
    full = max(1, len(pixels) // batch) * batch if len(pixels) >= batch else len(pixels)
    return [{name: stacked[i:i + batch]} for i in range(0, full, batch)]


def _image_processor(loaded: LoadedModel) -> Any:
    if loaded.folder is None or not (loaded.folder / "preprocessor_config.json").is_file():
        return None
    from ..frontend.loaders import _transformers
    return _transformers().AutoImageProcessor.from_pretrained(str(loaded.folder), local_files_only=True)


# --- ONNX --------------------------------------------------------------------------------------------

def onnx_feeds(loaded: LoadedModel, calibration: str | None, shapes: dict,
               batch_size: int | None) -> list[dict] | None:
    """Calibration feeds ({graph input name: array}) for an ONNX model, or None without --calibration."""
    if calibration is None:
        return None
    import onnx
    graph = onnx.load(str(loaded.onnx_path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    names = [i.name for i in graph.input if i.name not in initializers]
    feeds = []
    for batch in read_batches(calibration, loaded, names, shapes, batch_size):
        items = dict(zip(names, batch)) if isinstance(batch, tuple) else batch
        feeds.append({k: v.numpy() if hasattr(v, "numpy") else v for k, v in items.items()})
    return feeds


__all__ = ["parse_shapes", "torch_inputs", "onnx_feeds", "read_batches", "forward_names"]
