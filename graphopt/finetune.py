"""Recovery fine-tuning by distillation (see the pruning issue)."""
from __future__ import annotations

from typing import Any

from graphopt.errors import UnsupportedError


def finetune(opt: Any, train_data: Any, teacher: Any = None, epochs: int = 3, qat: bool = False, **kwargs: Any) -> Any:
    raise UnsupportedError("graphopt.finetune is not available yet in this version")
