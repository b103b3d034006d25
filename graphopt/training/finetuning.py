"""Recovery fine-tuning after pruning: knowledge distillation from the original model.

    opt = graphopt.finetune(opt, train_data, teacher=model, epochs=3)

Loss per batch, with student logits s, teacher logits t, temperature T:

    L = α · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 - α) · CE(s, labels)   (labels given)
    L = T² · KL(softmax(t/T) ‖ softmax(s/T))                                 (logits, no labels)
    L = Σ_outputs MSE(student, teacher) / ‖teacher‖²_mean                    (no logits: features)

"Logits" are a 2-D first output, or a language model's `.logits` [B, S, V]
(each position one sample); `distill="kl"|"mse"` forces one or the other.
`train_data` yields `(inputs, labels)` pairs — labels an integer tensor — or
inputs alone (pure distillation); inputs are a tensor, a tuple of positional
args or a dict of keyword args. A pair `(input_ids, attention_mask)` (an
integer tensor of the ids' shape, only 0 and 1) is two inputs, not labels.

A generation module (`optimize(lm, generation=True, …)`) is fine-tuned
through the model it was captured from (the pruned copy after LLM pruning),
on token batches, and captured again: graphopt.llm.module.

What is trained: the optimized `fx.GraphModule` itself (`opt.graph_module`),
not a re-capture. It was exported in eval mode, so dropout is gone and
BatchNorm normalizes with its running statistics — an affine map per channel
whose scale and shift still train; for short recovery runs that is what one
wants (batch statistics of small batches would only add noise). Every
floating parameter trains; integer tensors (int8 weights of quantized layers)
stay as they are. The caller's `opt` and the teacher are never modified:
the student is a deep copy, the teacher runs under no_grad and is checked.
Deterministic for a given `seed` and data order.

Convolutions train with their BatchNorm back (`renorm`, default "auto": on
for a captured graph, with or without `qat` (which fake-quantizes linear
layers only); off for plain modules, which keep their own BatchNorm): at O1+
each BatchNorm is folded into its convolution, so without this the student
trains with frozen normalization statistics that pruning made wrong. The graph
surgery (a normalization after every convolution, initialized to the identity,
folded back at the end by the fusion passes' BatchNorm fold) is in
`passes/renorm.py`; the returned graph has the same nodes as before.

Digits ResNet pruned to a quarter of its FLOPs, 3 epochs: 97.7% without,
the unpruned model's accuracy or better with it (bench/results/pruning.md).

`qat=True` trains the same loop with fake int8 on the layers the int8 pass
quantizes (graphopt/training/qat.py: per-token activations, per-channel weights,
straight-through gradients), then returns the int8-dynamic model
(`optimize(tuned, level="O2", quantize="int8-dynamic")` on the tuned graph).
"""
from __future__ import annotations

import copy
import math
import sys
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

from ..errors import InputError, OptionError, UnsupportedError
from ..passes.renorm import RENORM_BATCHES, fold_norms, insert_norms
from . import qat as graphopt_qat

DISTILL = ("auto", "kl", "mse")


def _split(item: Any) -> tuple[tuple, dict, torch.Tensor | None]:
    labels = None
    if (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], torch.Tensor)
            and not item[1].is_floating_point() and not _is_attention_mask(item[0], item[1])):
        item, labels = item
    if isinstance(item, torch.Tensor):
        return (item,), {}, labels
    if isinstance(item, dict):
        return (), dict(item), labels
    if isinstance(item, (tuple, list)):
        return tuple(item), {}, labels
    raise InputError(f"train_data items must be tensors, tuples, dicts or (inputs, labels) pairs, "
                     f"got {type(item).__name__}")


def _is_attention_mask(inputs: Any, second: torch.Tensor) -> bool:
    """(input_ids, attention_mask) is two inputs, not (inputs, labels): an integer tensor of the ids' shape
    holding only 0 and 1."""
    return (isinstance(inputs, torch.Tensor) and not inputs.is_floating_point() and second.shape == inputs.shape
            and bool(((second == 0) | (second == 1)).all()))


def _floats(outputs: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def distillation_loss(student: Any, teacher: Any, labels: torch.Tensor | None, temperature: float,
                      alpha: float, distill: str) -> torch.Tensor:
    token_logits = hasattr(student, "logits") and student.logits.dim() == 3   # a language model's [B, S, V]
    if token_logits:   # each position's next-token distribution is one sample
        student, teacher = student.logits.flatten(0, 1), teacher.logits.flatten(0, 1) if teacher is not None else None
    s_out, t_out = _floats(student), _floats(teacher) if teacher is not None else []
    logits = s_out[0]
    use_kl = distill == "kl" or (distill == "auto" and logits.dim() == 2)
    if not t_out:
        if labels is None:
            raise InputError("finetune without a teacher needs (inputs, labels) pairs in train_data")
        return F.cross_entropy(logits, labels)
    if use_kl:
        kl = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(t_out[0] / temperature, -1),
                      reduction="batchmean", log_target=True) * temperature ** 2
        return kl if labels is None else alpha * kl + (1 - alpha) * F.cross_entropy(logits, labels)
    loss = sum(F.mse_loss(s, t) / (t.pow(2).mean() + 1e-12) for s, t in zip(s_out, t_out))
    return loss if labels is None or logits.dim() != 2 else loss + F.cross_entropy(logits, labels)


def finetune(opt: Any, train_data: Iterable[Any], teacher: torch.nn.Module | None = None, epochs: int = 3,
             qat: bool = False, *, lr: float = 1e-3, weight_decay: float = 0.0, temperature: float = 2.0,
             alpha: float = 0.5, distill: str = "auto", seed: int = 0, progress: bool = True,
             quantize_options: Mapping[str, Any] | None = None, renorm: bool | str = "auto",
             speed_check: Any = True, on_epoch: Callable[[int, Any], None] | None = None) -> Any:
    """Distil `teacher` into a copy of `opt` on `train_data`; returns the tuned copy (see module docstring).

    on_epoch(epoch, module) is called after each epoch (1-based) with the student in eval mode (its
    training-time normalizations evaluate with their running statistics, as the folded graph will);
    an exception it raises (e.g. optuna.TrialPruned from graphopt.tune) stops the fine-tune and propagates.

    qat=True returns the tuned model converted to int8-dynamic (an O2 OptimizedModule, with
    `quantize_options` for the int8 pass and `speed_check` as graphopt.optimize's: int8 that is slower
    here is rolled back) after training with fake int8 (graphopt/training/qat.py).
    """
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise OptionError(f"epochs={epochs!r} must be a positive integer")
    if distill not in DISTILL:
        raise OptionError(f"distill={distill!r}: choose one of {', '.join(DISTILL)}")
    if not lr > 0 or not temperature > 0 or not 0 <= alpha <= 1:
        raise OptionError("finetune needs lr > 0, temperature > 0 and 0 <= alpha <= 1")
    if renorm not in (True, False, "auto"):
        raise OptionError(f"renorm={renorm!r}: choose True, False or 'auto'")
    llm = sys.modules.get("graphopt.llm.module")   # only loaded where a generation module can exist
    if llm is not None and isinstance(opt, llm.GenerationModule):
        return opt.finetuned(train_data, teacher, epochs=epochs, qat=qat, lr=lr, weight_decay=weight_decay,
                             temperature=temperature, alpha=alpha, distill=distill, seed=seed, progress=progress,
                             quantize_options=quantize_options, renorm=renorm, speed_check=speed_check,
                             on_epoch=on_epoch)
    if teacher is not None and not isinstance(teacher, torch.nn.Module):
        raise InputError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    from ..api import OptimizedModule
    tuned = copy.deepcopy(opt)
    if isinstance(tuned, OptimizedModule):
        if tuned.graph_module is None:
            raise InputError("finetune needs a captured OptimizedModule: call it once, or pass example_inputs "
                             "to graphopt.optimize")
        student: torch.nn.Module = tuned.graph_module
    elif isinstance(tuned, torch.nn.Module):
        student = tuned
    else:
        raise InputError(f"finetune takes an OptimizedModule or a torch.nn.Module, got {type(opt).__name__}")
    batches = list(train_data)
    if not batches:
        raise InputError("train_data is empty")
    if qat:
        student = _capture(student, batches[0])
        qat_layers = graphopt_qat.insert(student, **_site_options(quantize_options or {}))
        if not qat_layers:
            raise UnsupportedError("finetune(qat=True): no layer of this model is int8-eligible (linear layers "
                                   "with more than min_in_features inputs); run finetune without qat")
    norm_sites: list[tuple[torch.fx.Node, str]] = []
    if renorm is True and not isinstance(student, torch.fx.GraphModule):
        raise InputError("renorm=True needs a captured graph (an OptimizedModule or fx.GraphModule)")
    if renorm is True or (renorm == "auto" and isinstance(student, torch.fx.GraphModule)):
        norm_sites = insert_norms(student, [_split(item)[:2] for item in batches[:RENORM_BATCHES]])
    params = [p for p in student.parameters() if p.is_floating_point()]
    if not params:
        raise InputError("the module has no floating-point parameters to fine-tune")
    for p in params:
        p.requires_grad_(True)
    teacher_state = None
    if teacher is not None:
        teacher_state = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
        teacher_mode = teacher.training
        teacher.eval()
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = epochs * len(batches)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc="graphopt finetune", unit="batch", disable=None if progress else True)
    student.train()
    try:
        for epoch in range(1, epochs + 1):
            for item in batches:
                args, kwargs, labels = _split(item)
                target = None
                if teacher is not None:
                    with torch.no_grad():
                        target = teacher(*args, **kwargs)
                loss = distillation_loss(student(*args, **kwargs), target, labels, temperature, alpha, distill)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if on_epoch is not None:
                student.eval()
                with torch.no_grad():
                    on_epoch(epoch, tuned)
                student.train()
    finally:
        bar.close()
        student.eval()
        fold_norms(student, norm_sites)
        for p in params:
            p.grad = None
        if teacher is not None:
            teacher.train(teacher_mode)
    if teacher_state is not None:
        changed = [k for k, v in teacher.state_dict().items() if not torch.equal(v, teacher_state[k])]
        if changed:   # a teacher whose forward writes into its own state (e.g. BN in train mode)
            raise InputError(f"the teacher modified its own state during finetune: {changed[:3]}")
    if qat:
        graphopt_qat.strip(student)
        return _to_int8(student, batches, quantize_options or {}, progress, speed_check)
    return tuned


def _capture(module: torch.nn.Module, item: Any) -> torch.fx.GraphModule:
    """The module as a captured ATen graph (QAT rewrites graphs)."""
    if isinstance(module, torch.fx.GraphModule):
        return module
    from ..api import optimize
    args, kwargs, _ = _split(item)
    return optimize(module, args, example_kwargs=kwargs, level="O0", quantize=None, measure_latency=False,
                    progress=False).graph_module


def _site_options(quantize_options: Mapping[str, Any]) -> dict[str, Any]:
    options = {"min_in_features": quantize_options.get("min_in_features", 16),
               "exclude": quantize_options.get("exclude", ())}
    if isinstance(options["exclude"], str):
        options["exclude"] = (options["exclude"],)
    return options


def _to_int8(student: torch.fx.GraphModule, batches: list[Any], quantize_options: Mapping[str, Any],
             progress: bool, speed_check: Any) -> Any:
    """The int8 pass (O2, int8-dynamic) on the tuned float graph."""
    from ..api import optimize
    args, kwargs, _ = _split(batches[0])
    calibration = [kw or a for a, kw, _ in map(_split, batches[:8])]
    return optimize(student, args, example_kwargs=kwargs, level="O2", quantize="int8-dynamic",
                    quantize_options=dict(quantize_options), calibration_data=calibration, progress=progress,
                    speed_check=speed_check)
