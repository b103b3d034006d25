"""The search space of `graphopt.tune`: which options a trial draws, and the config they make.

A space is a dict from an option path to its values:

    ["O1", "O2", "O3"]      a list: one of these (categorical)
    (0.1, 0.7)              a pair of floats: a number in that range; a pair of ints: an integer
    None                    not searched (graphopt.optimize's default is used)

Paths name what the value sets in the config (the kwargs of `graphopt.optimize`):
`level`, `quantize`, `prune`, `quantize_options.KNOB`, `prune_options.KNOB`, `finetune.epochs`,
`float.PATTERN` (True: the linear layers matching PATTERN stay float, added to
quantize_options["exclude"]) and `prune_group.PATTERN` (with `prune_mode="per_group"`: that
fraction of the channels of the layers matching PATTERN; `prune={PATTERN: ratio, …}`). Any other
path is an optimize keyword of its own. `search_space=` of tune overrides the default entry by entry
(narrow a list, fix a value with a one-element list, add a path, drop one with None).

A path is drawn only where it applies (conditional search space): quantize options only when a scheme
is drawn, SmoothQuant's α only for W8A8 with calibration data, the static observer only for
int8-static, pruning options only at O3, fine-tune epochs only at O3 with training data.

The search starts from the fixed levels (`level_seeds`): a new study's first trials are O1 and O2 with
graphopt.optimize's defaults, where the space can draw them. With one switch per layer kind the random
start almost never draws "every layer int8" (1 in 2⁶ for a 6-kind encoder), so without them the search
could end slower than the level a user gets by default.

The default space is built from the model: one `float.*` switch per kind of linear layer (module paths
with their block numbers replaced by `*`, so 36 linears of a 6-layer encoder make 6 switches) and one
`prune_group.*` ratio per kind of layer container, counting only layers the captured graph uses.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from ..errors import OptionError

LEVELS = ["O1", "O2", "O3"]
SCHEMES = ["int8-dynamic", "int8-static", "int8-weight-only"]
DEFAULT_SCHEME = "int8-dynamic"   # graphopt.optimize's quantize="auto" at O2 and O3
ALPHA_SEARCH = "search"           # SmoothQuant's α chosen per layer group by the int8 pass (optimize's default)
CRITERIA = ["l2", "l1", "bn_scale", "activation"]   # "taylor" needs a loss or labels: add it with them
MIN_IN_FEATURES = 16    # the int8 pass's default: smaller linears stay float, no switch needed


def _kind(path: str) -> str:
    """`encoder.layer.3.attention.self.query` → `encoder.layer.*.attention.self.query`."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", path)


def float_patterns(model: torch.nn.Module, live: set[str] | None = None) -> list[str]:
    """One fnmatch pattern per kind of int8-eligible linear layer (of those in `live`, when given)."""
    return sorted({_kind(name) for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m.in_features > MIN_IN_FEATURES
                   and (live is None or name in live)})


def prune_patterns(model: torch.nn.Module, live: set[str] | None = None) -> list[str]:
    """One fnmatch pattern per kind of container of convolutions and linears (`stage1.*`,
    `encoder.layer.*.intermediate.*`), of the layers in `live` when given."""
    kinds = set()
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)) and "." in name \
                and (live is None or name in live):
            kinds.add(_kind(name.rpartition(".")[0]) + ".*")
    return sorted(kinds)


def live_modules(model: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any] | None) -> set[str]:
    """Paths of the modules whose parameters the model's graph reads on the example, once dead code is gone.
    A layer that runs but whose result nothing uses (BERT's pooler under a mean-pooling head) is dropped
    before any pass sees it, so a switch or prune ratio drawn for it would name no layer."""
    from ..frontend.capture import capture
    graph = capture(model, args, dict(kwargs or {})).module.graph
    graph.eliminate_dead_code()
    return {str(node.target).rpartition(".")[0] for node in graph.nodes if node.op == "get_attr" and node.users}


def default_space(model: torch.nn.Module, live: set[str] | None = None, target: str = "torch") -> dict[str, Any]:
    """The space over every option; the per-layer entries only for the modules in `live` when given
    (`live_modules`: those the captured graph still reads).

    Trials build with the speed check off (the trial is timed whole), but on torch and inductor they keep
    the int8 pass's per-layer timing (`quantize_options.layer_speed`), as a fixed level does: a layer whose
    int8 form is slower stays float without a switch having to be drawn for it. ONNX Runtime runs other
    kernels than those timed, so there the `float.*` switches alone decide."""
    space: dict[str, Any] = {
        "level": list(LEVELS),
        "quantize": [*SCHEMES, None],            # None at O2/O3: float (O3 then prunes only)
        "quantize_options.smoothquant": [True, False],
        "quantize_options.alpha": [ALPHA_SEARCH, 0.3, 0.45, 0.6, 0.75, 0.85],
        "quantize_options.observer": ["minmax", "percentile", "mse", "moving_average"],
        "prune_mode": ["flops", "per_group"],
        "prune": (0.1, 0.7),
        "prune_options.criterion": list(CRITERIA),
        "prune_options.sensitivity": [True, False],
        "finetune.epochs": (0, 10),
    }
    if target != "onnxruntime":
        space["quantize_options.layer_speed"] = [True]
    space.update({f"float.{p}": [False, True] for p in float_patterns(model, live)})
    space.update({f"prune_group.{p}": (0.0, 0.6) for p in prune_patterns(model, live)})
    return space


def level_seeds(space: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Optuna params of the fixed levels' defaults that `space` can draw, in order: O1, then O2 as
    `graphopt.optimize(level="O2")` builds it: the default scheme, every layer int8 (each `float.*` switch
    off), SmoothQuant on with α searched per layer group (drawn only where there is calibration data, as
    optimize turns it on only then). Empty where the level is not searched."""
    levels = space.get("level")
    if not isinstance(levels, list) or len(levels) < 2:
        return []
    seeds: list[dict[str, Any]] = [{"level": "O1"}] if "O1" in levels else []
    schemes = space.get("quantize")
    if "O2" in levels and isinstance(schemes, list) and DEFAULT_SCHEME in schemes:
        defaults = {path: False for path in space if path.startswith("float.")}
        defaults |= {"quantize_options.smoothquant": True, "quantize_options.alpha": ALPHA_SEARCH}
        drawable = {path: value for path, value in defaults.items()
                    if isinstance(space.get(path), list) and value in space[path]}
        seeds.append({"level": "O2", "quantize": DEFAULT_SCHEME, **drawable})
    return seeds


def merge(default: dict[str, Any], user: Mapping[str, Any] | None) -> dict[str, Any]:
    """The default space with the user's entries laid over it (None drops an entry); checks each entry."""
    if user is not None and not isinstance(user, Mapping):
        raise OptionError(f"search_space must be a dict of option path → values, got {type(user).__name__}")
    space = {**default, **(user or {})}
    space = {k: v for k, v in space.items() if v is not None}
    for path, values in space.items():
        if isinstance(values, list):
            if not values:
                raise OptionError(f"search_space[{path!r}] is an empty list: give at least one value")
        elif not (isinstance(values, tuple) and len(values) == 2 and all(isinstance(v, (int, float))
                  and not isinstance(v, bool) for v in values) and values[0] <= values[1]):
            raise OptionError(f"search_space[{path!r}]={values!r}: give a list of choices, a (low, high) pair "
                              "of numbers, or None")
    levels = space.get("level", LEVELS)
    bad = [v for v in levels if v not in LEVELS + ["O0"]] if isinstance(levels, list) else levels
    if bad:
        raise OptionError(f"search_space['level']: {bad!r} are not levels; choose among O0 O1 O2 O3")
    return space


class Sampler:
    """Draws one config from `space` with an Optuna trial (any object with suggest_categorical/float/int)."""

    def __init__(self, space: dict[str, Any], has_calibration: bool, has_train: bool, backend: str | None) -> None:
        self.space, self.has_calibration, self.has_train, self.backend = space, has_calibration, has_train, backend

    def _draw(self, trial: Any, path: str) -> Any:
        values = self.space[path]
        if isinstance(values, list):
            return values[0] if len(values) == 1 else trial.suggest_categorical(path, values)
        low, high = values
        if isinstance(low, int) and isinstance(high, int):
            return trial.suggest_int(path, low, high)
        return trial.suggest_float(path, float(low), float(high))

    def _applies(self, path: str, config: dict[str, Any], prune_mode: str | None,
                 quantize_options: dict[str, Any]) -> bool:
        level = config["level"]
        scheme = config.get("quantize")
        w8a8 = scheme in ("int8-dynamic", "int8-static")
        head, _, knob = path.partition(".")
        if path == "quantize":
            return level in ("O2", "O3")
        if path in ("prune_mode", "prune") or head in ("prune_options", "prune_group"):
            if level != "O3":
                return False
            if path == "prune":
                return prune_mode != "per_group"
            return head != "prune_group" or prune_mode == "per_group"
        if head in ("quantize_options", "float"):
            if scheme is None:
                return False
            if knob in ("smoothquant", "alpha"):
                return w8a8 and self.has_calibration and (knob == "smoothquant"
                                                          or quantize_options.get("smoothquant", True))
            if knob in ("observer", "percentile", "averaging_constant"):
                return scheme == "int8-static"
            return True
        if head == "finetune":
            return level == "O3" and self.has_train
        return True

    def sample(self, trial: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(optimize kwargs, finetune kwargs or None) for one trial."""
        config: dict[str, Any] = {"level": self._draw(trial, "level") if "level" in self.space else "O1"}
        prune_mode = None
        quantize_options: dict[str, Any] = {}
        prune_options: dict[str, Any] = {}
        groups: dict[str, float] = {}
        exclude: list[str] = []
        finetune: dict[str, Any] = {}
        for path in self.space:
            if path == "level" or not self._applies(path, config, prune_mode, quantize_options):
                continue
            value = self._draw(trial, path)
            head, _, rest = path.partition(".")
            if path == "prune_mode":
                prune_mode = value
            elif head == "quantize_options":
                quantize_options[rest] = value
            elif head == "prune_options":
                prune_options[rest] = value
            elif head == "prune_group":
                groups[rest] = value
            elif head == "float":
                if value:
                    exclude.append(rest)
            elif head == "finetune":
                finetune[rest] = value
            else:
                config[path] = value
        if config["level"] in ("O2", "O3") and "quantize" not in config:
            config["quantize"] = DEFAULT_SCHEME
        if config["level"] in ("O0", "O1"):
            config["quantize"] = None
        if config.get("quantize") is None:
            quantize_options = {}
        if exclude:
            quantize_options["exclude"] = exclude
        if config["level"] == "O3":
            if prune_mode == "per_group":
                config["prune"] = {pattern: ratio for pattern, ratio in groups.items() if ratio > 0} or None
            elif "prune" not in config:
                config["prune"] = None
            if config["prune"] is None:   # nothing to prune: O3 is O2
                config["level"], prune_options = "O2" if config.get("quantize") else "O1", {}
        if quantize_options:
            config["quantize_options"] = quantize_options
        if prune_options and config.get("prune") is not None:
            config["prune_options"] = prune_options
        if self.backend is not None:
            config["backend"] = self.backend
        config["speed_check"] = False   # the trial is timed whole, on the target; passes are not rolled back at random
        epochs = finetune.pop("epochs", 0)
        return config, ({"epochs": epochs, **finetune} if epochs and config.get("prune") is not None else None)
