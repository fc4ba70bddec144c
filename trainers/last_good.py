"""The trainable state before the latest optimizer step, so that a run whose loss turns nan/inf
(weights that exploded) can save the last weights that gave a finite loss instead.

Kept only when small (embeddings, hypernetworks, LoRA, the tiny models): copying a whole U-Net
each step would cost as much memory again. Without a copy, a stop keeps the file last saved."""
from __future__ import annotations

import copy

import torch

LIMIT_BYTES = 512 * 2**20  # the weights' size; Adam's state doubles it


class LastGood:
    def __init__(self, tensors: list[torch.Tensor], optimizer):
        self.tensors = tensors
        self.optimizer = optimizer
        size = sum(t.numel() * t.element_size() for t in tensors)
        self.enabled = size <= LIMIT_BYTES
        self.copies: list[torch.Tensor] | None = None
        self.optimizer_state: dict | None = None
        self.step: int | None = None  # the steps done when the copy was made

    def keep(self, step: int) -> None:
        """Copy the state as it is before the optimizer step that follows."""
        if not self.enabled:
            return
        with torch.no_grad():
            if self.copies is None:
                self.copies = [t.detach().clone() for t in self.tensors]
            else:
                for kept, tensor in zip(self.copies, self.tensors):
                    kept.copy_(tensor.detach())
        self.optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        self.step = step

    def restore(self) -> int | None:
        """Put the kept state back in place; its step count, or None when nothing was kept."""
        if self.copies is None:
            return None
        with torch.no_grad():
            for kept, tensor in zip(self.copies, self.tensors):
                tensor.copy_(kept)
        self.optimizer.load_state_dict(self.optimizer_state)
        return self.step
