"""Block swap (musubi-tuner's and kohya's `blocks_to_swap`): the frozen weights of the last N
blocks of the denoiser (the U-Net's down / up blocks, a transformer's blocks) wait in CPU
memory and are copied to the device just before a block runs, forward and backward. Only the
frozen weights move: what trains (LoRA factors) stays where the optimizer has it.

A block comes in from a forward pre-hook (the forward pass, and the recomputation of gradient
checkpointing) and from a hook on its outputs' gradients (its backward); bringing one in
evicts the others. That is safe because autograd runs a backward in the reverse order of the
forward's operations: when the last-run output of block k gets its gradient, every operation of
the blocks after it is done and none of the blocks before it has begun. Frozen weights never
change, so evicting is free: the parameter points at its CPU copy again (pinned on CUDA, and the
next block is prefetched on a side stream)."""
from __future__ import annotations

import contextlib

import torch

BLOCK_LISTS = (("down_blocks", "up_blocks"),  # SD U-Nets
               ("transformer_blocks", "single_transformer_blocks"),  # Flux.1, Chroma, Flux.2
               ("layers",))  # Z-Image


class BlockSwapError(ValueError):
    pass


def swappable_blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The denoiser's blocks in the order a forward pass runs them."""
    for names in BLOCK_LISTS:
        lists = [getattr(denoiser, n, None) for n in names]
        if all(isinstance(x, torch.nn.ModuleList) for x in lists):
            return [block for blocks in lists for block in blocks]
    raise BlockSwapError(f"blocks_to_swap: {type(denoiser).__name__} has no blocks Danlu knows "
                         "how to swap")


def check_count(count: int, denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    blocks = swappable_blocks(denoiser)
    if count < 0 or count >= len(blocks):
        raise BlockSwapError(f"blocks_to_swap: {type(denoiser).__name__} has {len(blocks)} "
                             f"blocks; swap 1 to {len(blocks) - 1} of them (at least one block "
                             f"stays on the device), got {count}")
    return blocks


class _Slot:
    """One block's frozen tensors: where they live on the CPU, and their device copies."""

    def __init__(self, index: int, block: torch.nn.Module, device: torch.device):
        self.index, self.block, self.device = index, block, device
        self.tensors = []  # (owner module, name, is a parameter)
        self.homes = []  # the CPU copies
        for module in block.modules():
            for name, param in module._parameters.items():
                if param is not None and not param.requires_grad:
                    self.tensors.append((module, name, True))
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    self.tensors.append((module, name, False))
        for module, name, _ in self.tensors:
            tensor = getattr(module, name).detach()
            home = tensor.to("cpu", copy=device.type != "cpu")
            if device.type == "cuda":
                home = home.pin_memory()
            self.homes.append(home)
        self.ready = None  # device copies made (prefetched) but not yet in place
        self.event = None
        self.present = True  # the module's tensors are the device copies

    def _set(self, tensors) -> None:
        for (module, name, is_param), tensor in zip(self.tensors, tensors):
            if is_param:
                module._parameters[name].data = tensor
            else:
                module._buffers[name] = tensor

    def fetch(self, stream) -> None:
        """Start copying to the device (on `stream` when given)."""
        if self.present or self.ready is not None:
            return
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            self.ready = [home.to(self.device, non_blocking=True) for home in self.homes]
            if stream is not None:
                self.event = torch.cuda.Event()
                self.event.record(stream)

    def enter(self, stream) -> None:
        if self.present:
            return
        self.fetch(stream)
        if self.event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.event)
            for tensor in self.ready:
                tensor.record_stream(current)
        self._set(self.ready)
        self.ready, self.event, self.present = None, None, True

    def leave(self) -> None:
        if self.present:
            self._set(self.parked())
            self.present = False
        self.ready, self.event = None, None

    def parked(self) -> list[torch.Tensor]:
        return self.homes


class BlockSwap:
    """Swaps the last `count` of `blocks` while installed (`with swap:`)."""

    def __init__(self, denoiser: torch.nn.Module, count: int, slot=_Slot):
        blocks = check_count(count, denoiser)
        self.device = next(denoiser.parameters()).device
        first = len(blocks) - count
        self.slots = [slot(first + i, block, self.device) for i, block in enumerate(blocks[first:])]
        self.stream = (torch.cuda.Stream(self.device) if self.device.type == "cuda" else None)
        self.visits: list[int] = []  # block numbers as they were brought in (tests, reports)
        self.handles = []

    def bring(self, position: int, step: int) -> None:
        """Slot `position` on the device, the others off it; prefetch the one `step` away."""
        slot = self.slots[position]
        if not slot.present:
            self.visits.append(slot.index)
        for other in self.slots:
            if other is not slot and not (0 <= position + step < len(self.slots)
                                          and other is self.slots[position + step]):
                other.leave()
        slot.enter(self.stream)
        if 0 <= position + step < len(self.slots) and self.stream is not None:
            self.slots[position + step].fetch(self.stream)

    def __enter__(self):
        for position, slot in enumerate(self.slots):
            self.handles.append(slot.block.register_forward_pre_hook(
                lambda *_, p=position: self.bring(p, +1)))
            self.handles.append(slot.block.register_forward_hook(
                lambda _module, args, kwargs, output, p=position:
                self._watch(output, (args, kwargs), p), with_kwargs=True))
            slot.leave()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return self

    def _watch(self, output, inputs, position: int) -> None:
        """Bring the block in when its backward begins (its outputs' gradients arrive). An
        input handed back unchanged is another block's output: its gradient says nothing
        about this block."""
        if not torch.is_grad_enabled():
            return
        passed = {id(t) for t in _tensors(inputs)}
        for tensor in _tensors(output):
            if tensor.requires_grad and id(tensor) not in passed:
                tensor.register_hook(lambda grad, p=position: self._backward(p, grad))

    def _backward(self, position: int, grad):
        self.bring(position, -1)
        return grad

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        for slot in self.slots:
            slot.enter(None)
        return False


def _tensors(output):
    if torch.is_tensor(output):
        yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from _tensors(item)
    elif isinstance(output, dict):
        for item in output.values():
            yield from _tensors(item)
    elif hasattr(output, "to_tuple"):  # diffusers' output dataclasses
        yield from _tensors(output.to_tuple())
