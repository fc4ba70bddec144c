"""Frozen parts leave the training device once the steps no longer read them (kohya does this
by itself): the VAE once the latents are cached, the text encoders once their outputs are
cached and nothing trains in them. They wait in CPU memory and come back for what still needs
them (previews, a caption the cache has not seen), and go home at the end of the run, since the
base model is cached between jobs. On a CPU-only machine home and the parking place are the
same, so nothing moves."""
from __future__ import annotations

import contextlib

import torch

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def leaving_device(*, latents_cached: bool, text_outputs_cached: bool,
                   trains_text_encoder: bool) -> list[str]:
    """The model's components the training steps never read under these settings."""
    names = ["vae"] if latents_cached else []
    if text_outputs_cached and not trains_text_encoder:
        names += list(TEXT_ENCODERS)
    return names


class Offloader:
    """Moves the named components of a model between their device and `park` (the CPU)."""

    def __init__(self, model, names: list[str], park: torch.device | str = "cpu"):
        self.model = model
        self.names = [n for n in names if isinstance(getattr(model, n, None), torch.nn.Module)]
        self.park = torch.device(park)
        self.home = {n: _device_of(getattr(model, n)) for n in self.names}
        self.away = False  # whether the components are parked now

    @property
    def text_cached(self) -> bool:
        return any(n in TEXT_ENCODERS for n in self.names)

    def where(self) -> dict[str, torch.device]:
        return {n: _device_of(getattr(self.model, n)) for n in self.names}

    def _move(self, away: bool) -> None:
        moved = False
        for name in self.names:
            target = self.park if away else self.home[name]
            module = getattr(self.model, name)
            if _device_of(module) != target:
                module.to(target)
                moved = True
        self.away = away
        if moved and away and torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the freed blocks back for activations

    @contextlib.contextmanager
    def parked(self):
        """The components off the device for the duration (the training steps)."""
        self._move(True)
        try:
            yield self
        finally:
            self._move(False)

    @contextlib.contextmanager
    def visiting(self):
        """The components back on their device for the duration (a preview, a cache miss)."""
        if not self.away:
            yield self
            return
        self._move(False)
        try:
            yield self
        finally:
            self._move(True)


def _device_of(module: torch.nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")
