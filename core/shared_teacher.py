"""The teacher of a sweep: loaded once, and run once per batch for all of its students.

The students of a sweep train in lockstep on the same batches, so the teacher's output for a
batch is the same for each of them. The first student to ask computes it; the others get the
same tensor, as long as they ask about the same input (compared by content, so a student that
is somehow on another batch gets its own forward, never another batch's numbers). Only the
latest batch is kept: one step's teacher output, never a history of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class SharedTeacher:
    def __init__(self) -> None:
        self.model: PreTrainedModel | None = None  # set by the first student that loads it
        self._inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._output: torch.Tensor | None = None

    def output(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        compute: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        """`compute()` for this batch, run only if the previous call was about another one."""
        if self._output is not None and self._inputs is not None:
            ids, mask = self._inputs
            if (
                ids.shape == input_ids.shape
                and torch.equal(ids, input_ids)
                and torch.equal(mask, attention_mask)
            ):
                return self._output
        self._output = compute()
        self._inputs = (input_ids, attention_mask)
        return self._output

    def release(self) -> None:
        """Drop the model and the kept output (the run is over)."""
        self.model, self._inputs, self._output = None, None, None
