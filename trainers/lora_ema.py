"""Post-hoc EMA of a LoRA run: its periodic copies averaged in step order into one LoRA file,
as musubi-tuner's lora_post_hoc_ema.py does.

The average starts as the first copy x_0; each later copy x_k (k = 1 .. n-1) is taken in as
avg = beta_k * avg + (1 - beta_k) * x_k, tensor by tensor (LoRA / LoCon factors, or LoHa / LoKr
ones; alphas must agree and are kept). So copy k ends up with the weight
w_k = (1 - beta_k) * prod_{j > k} beta_j (beta_0 = 0), and the weights sum to 1.

- Exponential (musubi's --beta / --beta2): beta_k = decay, or with a `decay_end` moving
  linearly from decay (k = 1) to decay_end (k = n-1). decay 0 gives the last copy.
- Power function (musubi's --sigma_rel; Karras et al., "Analyzing and Improving the Training
  Dynamics of Diffusion Models", arXiv 2312.02696, Algorithm 2): gamma is the largest root of
  gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0, and
  beta_k = (1 - 1/t)^(gamma + 1) with t = k + 1, the copy's place counted from 1, so that
  sigma_rel = 12^-0.5 (gamma = 0) is the plain average of all copies. musubi-tuner counts
  t = k, which gives the first copy no weight at all; its result is ours over copies 1 .. n-1.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from core import events as ev
from trainers.formats.key_check import saved_file_note
from trainers.formats.bundled_embeddings import bundle_state, read_bundled
from trainers.formats.lora import save_lora
from trainers.formats.lycoris import algo_of, load_adapter, save_lycoris
from trainers.resize_lora import output_target
from trainers.runs import file_step


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """EDM2's exponent gamma of the power-function EMA of relative width sigma_rel; 0 (the
    plain average) for sigma_rel >= 12^-0.5, where the cubic has no positive root."""
    t = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    real = roots[np.abs(roots.imag) < 1e-9].real
    return max(0.0, float(real.max())) if real.size else 0.0


def ema_betas(count: int, decay: float, decay_end: float | None = None,
              sigma_rel: float = 0.0) -> list[float]:
    """beta_k for copies k = 1 .. count-1 (see the module docstring)."""
    if sigma_rel:
        gamma = sigma_rel_to_gamma(sigma_rel)
        return [(1.0 - 1.0 / (k + 1)) ** (gamma + 1.0) for k in range(1, count)]
    end = decay if decay_end is None else decay_end
    steps = count - 1
    return [decay + (end - decay) * (i / (steps - 1)) if steps > 1 else decay
            for i in range(steps)]


def ema_weights(betas: list[float]) -> list[float]:
    """Each copy's share of the average the betas give (copy 0 first)."""
    weights = [1.0]
    for beta in betas:
        weights = [w * beta for w in weights] + [1.0 - beta]
    return weights


def post_hoc_ema(states: list[dict], betas: list[float],
                 labels: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The EMA of `states` (step order) in float32; every state must have the first one's keys,
    shapes and alphas (ValueError naming the odd one, by `labels`)."""
    labels = labels or [f"copy {i}" for i in range(len(states))]
    first = states[0]
    average = {k: v.float() if v.is_floating_point() else v for k, v in first.items()}
    for state, beta, label in zip(states[1:], betas, labels[1:]):
        problem = _mismatch(first, state)
        if problem:
            raise ValueError(f"run_folder: {label} does not match {labels[0]}: {problem}; "
                             "average copies of one run")
        for key, value in state.items():
            if key.endswith(".alpha") or not value.is_floating_point():
                continue
            average[key] = average[key] * beta + value.float() * (1.0 - beta)
    return average


def _mismatch(first: dict, other: dict) -> str | None:
    missing, extra = sorted(set(first) - set(other)), sorted(set(other) - set(first))
    if missing or extra:
        return (f"{len(missing)} keys missing ({', '.join(missing[:2])}), {len(extra)} other "
                f"keys ({', '.join(extra[:2])})")
    for key, value in first.items():
        if tuple(other[key].shape) != tuple(value.shape):
            return f"{key} is {list(other[key].shape)}, not {list(value.shape)}"
        if key.endswith(".alpha") and not torch.allclose(other[key].float(), value.float()):
            return f"{key} is {float(other[key]):g}, not {float(value):g}"
    return None


def find_copies(folder: Path) -> tuple[str, list[tuple[int, Path]]]:
    """(run name, [(step, file)] in step order) for a run folder or its checkpoints folder:
    the numbered copies `<name>-<step>.safetensors` trainers/loop.py writes."""
    from trainers import catalog
    copies_folders = {m.copies_folder for m in catalog.methods()}
    if folder.name in copies_folders and not any(folder.glob("settings-*.json")):
        name, where = folder.parent.name, folder
    else:
        name = folder.name
        where = next((folder / sub for sub in ("checkpoints", *sorted(copies_folders))
                      if (folder / sub).is_dir()), folder)
    pattern = re.compile(re.escape(name) + r"-(\d+)\.safetensors$")
    found = sorted((int(m.group(1)), p) for p in where.iterdir()
                   if p.is_file() and (m := pattern.match(p.name)))
    return name, found


def run(cfg, ctx) -> Path:
    cfg.validate()
    paths = ctx.paths
    folder = paths.resolve(cfg.run_folder, "run_folder")
    target = output_target(paths, cfg.output_name, cfg.overwrite)
    if not folder.is_dir():
        raise ValueError(f"run_folder: no folder {cfg.run_folder.strip()!r}")
    name, copies = find_copies(folder)
    copies = [(step, path) for step, path in copies if step >= cfg.from_step]
    final = paths.lora / f"{name}.safetensors"
    if cfg.include_final and final.is_file() and final != target:
        step = file_step(final)
        if step is not None and (not copies or step > copies[-1][0]):
            copies.append((step, final))
    if len(copies) < 2:
        raise ValueError(f"run_folder: found {len(copies)} LoRA copies of {name!r} (files "
                         f"{name}-<step>.safetensors from step {cfg.from_step} on) in {folder}; "
                         "averaging needs two or more (save every N steps while training)")
    labels = [path.name for _, path in copies]
    states, metadata = [], {}
    for step, path in copies:
        ctx.emit(ev.Status(f"Reading {path.name}"))
        state, metadata = load_adapter(path)
        states.append({**state, **bundle_state(read_bundled(path))})  # a pivotal token too
    power = cfg.sigma_rel > 0
    decay_end = None if cfg.decay_end < 0 else cfg.decay_end
    betas = ema_betas(len(states), cfg.decay, decay_end, cfg.sigma_rel)
    averaged = post_hoc_ema(states, betas, labels)
    weights = ema_weights(betas)
    rule = (f"power-function EMA, sigma_rel {cfg.sigma_rel:g} (gamma "
            f"{sigma_rel_to_gamma(cfg.sigma_rel):.3f})" if power else
            f"EMA decay {cfg.decay:g}" + (f" to {decay_end:g}" if decay_end is not None else ""))
    listed = ", ".join(labels)
    record = {"checkpoints": labels, "steps": [step for step, _ in copies],
              "weights": [round(w, 6) for w in weights]}
    record.update({"sigma_rel": cfg.sigma_rel, "gamma": sigma_rel_to_gamma(cfg.sigma_rel)}
                  if power else {"decay": cfg.decay, "decay_end": decay_end})
    metadata = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    metadata.update({"ss_output_name": target.stem, "danlu.post_hoc_ema": json.dumps(record),
                     "ss_training_comment": f"post-hoc {rule} of {listed}"})
    if "modelspec.title" in metadata:
        metadata["modelspec.title"] = target.stem
    save = save_lycoris if algo_of(averaged) is not None else save_lora
    save(target, averaged, metadata, precision=cfg.save_precision)
    ctx.emit(ev.Saved(step=copies[-1][0], path=str(target), kind="final"))
    ctx.emit(ev.Finished(step=copies[-1][0], path=str(target), message=(
        f"Averaged {len(copies)} copies of {name} (steps {copies[0][0]} to {copies[-1][0]}, "
        f"{rule}; last copy's weight {weights[-1]:.2f}) into {target}. {saved_file_note(target)}")))
    return target
