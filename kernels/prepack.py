"""A cache of weights repacked for a CPU library's kernel, held as long as the weight tensors live.

Repacking (reordering a weight into a kernel's blocked layout) costs far more
than one call, so each weight is packed once. Entries are keyed by the
identity and version counter of the source tensors (an in-place change
repacks; an inference tensor has no counter, see ``version``) plus any
hashable parameters, and an entry dies with its first source tensor. The
module's state stays its plain int8/uint8 and float32 buffers, so ``state_dict`` and ``torch.export`` see no opaque object.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Hashable

import torch


def version(t: torch.Tensor) -> int:
    """``t``'s version counter, which every in-place write moves (through any view). An inference tensor has
    none: it reads as -1, so a write to one inside ``torch.inference_mode`` is not seen."""
    return -1 if t.is_inference() else t._version


class PackCache:
    """``get(*tensors, *params)`` returns ``pack(*tensors, *params)``, computed once per live source."""

    def __init__(self, pack: Callable[..., Any]) -> None:
        self._pack = pack
        self._entries: dict[tuple, tuple[tuple[weakref.ref, ...], tuple[int, ...], Any]] = {}
        self._lock = threading.Lock()

    def get(self, tensors: tuple[torch.Tensor, ...], *params: Hashable) -> Any:
        key = (*map(id, tensors), *params)
        versions = tuple(map(version, tensors))
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None and all(r() is t for r, t in zip(entry[0], tensors)) and entry[1] == versions:
            return entry[2]
        packed = self._pack(*tensors, *params)
        with self._lock:
            if key not in self._entries:
                weakref.finalize(tensors[0], self._entries.pop, key, None)
            self._entries[key] = (tuple(weakref.ref(t) for t in tensors), versions, packed)
        return packed

    def __len__(self) -> int:
        return len(self._entries)
