"""What the exact-resume tests report when an interrupted and resumed run does not repeat the
uninterrupted one: the first loss that differs, the first step whose starting state (trained
tensors, optimizer state) or computed gradients differ and in which tensor, the final weights
that differ, and the threads and BLAS mode the runs had."""
from __future__ import annotations

import hashlib

import torch


def _fingerprint(tensor: torch.Tensor) -> tuple:
    """(digest of the exact bytes, sum, largest magnitude): equal digests mean equal bits."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.blake2b(flat.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()
    values = flat.double()
    return digest, values.sum().item(), values.abs().max().item() if flat.numel() else 0.0


class StepRecorder:
    """Records, at every optimizer step in this process (torch's global step hook), what the
    step starts from and what it computed."""

    def __init__(self):
        self.steps: list[dict] = []
        self.threads = torch.get_num_threads()

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_pre_hook
        self._handle = register_optimizer_step_pre_hook(self._record)
        return self

    def __exit__(self, *_):
        self._handle.remove()

    def _record(self, optimizer, args, kwargs) -> None:
        state, gradients = [], []
        for g, group in enumerate(optimizer.param_groups):
            for i, parameter in enumerate(group["params"]):
                label = f"parameter {g}.{i} {list(parameter.shape)}"
                state.append((label, _fingerprint(parameter)))
                for key, value in optimizer.state.get(parameter, {}).items():
                    if torch.is_tensor(value):
                        state.append((f"optimizer {key!r} of {label}", _fingerprint(value)))
                if parameter.grad is not None:
                    gradients.append((f"gradient of {label}", _fingerprint(parameter.grad)))
        self.steps.append({"state": state, "gradients": gradients})


def _first_different(a: list, b: list) -> str | None:
    if [label for label, _ in a] != [label for label, _ in b]:
        return f"different tensors: {len(a)} uninterrupted vs {len(b)} resumed"
    for (label, (digest_a, sum_a, max_a)), (_, (digest_b, sum_b, max_b)) in zip(a, b):
        if digest_a != digest_b:
            count = sum(x[1][0] != y[1][0] for x, y in zip(a, b))
            return (f"{label} first ({count} of {len(a)} differ): sum {sum_a!r} vs {sum_b!r}, "
                    f"largest |value| {max_a!r} vs {max_b!r}")
    return None


def first_divergent_step(whole: StepRecorder, parts: list[StepRecorder], resumed_at: int) -> str:
    """Where the runs part: the first step that starts from a different state, or that starts
    from the same state and computes different gradients."""
    resumed = [step for part in parts for step in part.steps]
    if len(resumed) != len(whole.steps):
        return (f"optimizer steps: {len(whole.steps)} uninterrupted vs {len(resumed)} interrupted "
                "+ resumed")
    for index, (a, b) in enumerate(zip(whole.steps, resumed)):
        step = index + 1
        state = _first_different(a["state"], b["state"])
        if state is not None:
            where = (" (what the resume restored)" if step == resumed_at + 1 else "")
            return f"step {step} started from a different state{where}: {state}"
        gradients = _first_different(a["gradients"], b["gradients"])
        if gradients is not None:
            return (f"step {step} started from the same trained tensors and optimizer state but "
                    f"computed different gradients, {gradients}: the computation (or what the "
                    "frozen parts fed it) does not repeat in this process (memory alignment, "
                    "threads, BLAS mode: trainers/reproducible_blas.py; memos kept between runs)")
    return "every step started from the same state and computed the same gradients"


def first_different_loss(whole: list[float], resumed: list[float], resumed_at: int) -> str | None:
    for index, (a, b) in enumerate(zip(whole, resumed)):
        if a != b:
            after = index + 1 - resumed_at
            when = (f"the {_ordinal(after)} after resuming" if after > 0
                    else "before the interruption")
            return (f"loss of step {index + 1} ({when} at step {resumed_at}): {a!r} uninterrupted "
                    f"vs {b!r} resumed")
    if len(whole) != len(resumed):
        return f"{len(whole)} losses uninterrupted vs {len(resumed)} interrupted + resumed"
    return None


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _tensors(value, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    if torch.is_tensor(value):
        return [(prefix or "tensor", value)]
    items = value.items() if isinstance(value, dict) else enumerate(value)
    return [pair for key, item in items
            for pair in _tensors(item, f"{prefix}[{key!r}]" if prefix else str(key))]


def weight_differences(expected, actual) -> str | None:
    """None when both hold the same tensors with the same bits; else which differ first."""
    a, b = dict(_tensors(expected)), dict(_tensors(actual))
    if a.keys() != b.keys():
        return f"the final files hold different tensors: {sorted(a.keys() ^ b.keys())[:5]}"
    differing = [key for key in a if a[key].shape != b[key].shape or a[key].dtype != b[key].dtype
                 or not torch.equal(a[key], b[key])]
    if not differing:
        return None
    key = differing[0]
    if a[key].shape != b[key].shape or a[key].dtype != b[key].dtype:
        detail = f"{a[key].dtype}{list(a[key].shape)} vs {b[key].dtype}{list(b[key].shape)}"
    else:
        gap = (a[key].double() - b[key].double()).abs()
        detail = f"largest difference {gap.max().item():.3g} in {int((gap > 0).sum())} values"
    return (f"final weights: {len(differing)} of {len(a)} tensors differ, first {key} "
            f"({detail})")


def environment(recorders: list[StepRecorder]) -> str:
    from trainers.reproducible_blas import blas_mode
    threads = ", ".join(str(r.threads) for r in recorders)
    return f"torch threads per run (uninterrupted, interrupted, resumed): {threads}; {blas_mode()}"
