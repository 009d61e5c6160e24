"""What the library code needs to know about the other ranks, and nothing more.

Evaluation, pruning and the teacher-logit cache split their work over the processes of a
torchrun job; they take a `Ranks` (`sharp_core.train.distributed.Context` is one) rather
than importing the training set-up, and `ONE` stands for the single process, where every
collective is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = ["ONE", "Ranks"]


class Ranks(Protocol):
    """This process's place among the ranks, and the collectives the library calls (every
    rank must call each of them, in the same order)."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor: ...

    def broadcast_object(self, obj: Any) -> Any: ...

    def gather_objects(self, obj: Any) -> list[Any]: ...

    def barrier(self) -> None: ...


@dataclass(frozen=True)
class _One:
    rank: int = 0
    world_size: int = 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def gather_objects(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        return None


#: The single process.
ONE: Ranks = _One()
