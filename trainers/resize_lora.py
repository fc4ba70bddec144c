"""Resize a kohya LoRA / LoCon file to a lower rank by SVD of each layer's weight change.

Each layer's change is W = up @ down * alpha / rank (a LoCon convolution's down flattened to
[rank, in * k * k]). Its best rank-r approximation, U S Vh truncated, is written back as
up = U * S, down = Vh; a layer whose rank is already r or lower keeps its rank and its change.
`conv_rank` 0 gives convolutions the same rank as linear layers.

Fixed rank (`dynamic_method` "none" or ""): every layer gets r = min(rank, its own rank), written with
alpha = r (scale 1), so the file has one rank and one alpha as Danlu's loaders expect.

Dynamic rank, as kohya sd-scripts' networks/resize_lora.py (index_sv_ratio / index_sv_cumulative
/ index_sv_fro, rank_resize): for each layer, from the singular values S (descending) of
up @ down,
  sv_ratio:      r = #{i : S_i > S_0 / param}                       (param > 1)
  sv_cumulative: r = min{k : sum(S[:k]) / sum(S) >= param}         (0 < param <= 1)
  sv_fro:        r = min{k : sum(S[:k]^2) / sum(S^2) >= param^2}   (0 < param <= 1)
then r = 1 when S_0 <= 1e-6 (an empty layer), and 1 <= r <= min(rank, the layer's own rank)
(`conv_rank` bounds convolutions). The layer keeps its scale: alpha = old_alpha / old_rank * r
(kohya's new_alpha = scale * new_rank), so the ranks and alphas differ per layer and the
metadata says ss_network_dim = ss_network_alpha = "Dynamic" as kohya writes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from core import events as ev
from trainers.formats.dora import has_dora
from trainers.formats.key_check import saved_file_note
from trainers.formats.bundled_embeddings import bundle_state, read_bundled
from trainers.formats.lora import load_lora, save_lora

DOWN, UP = ".lora_down.weight", ".lora_up.weight"
DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
MIN_SV = 1e-6  # kohya: a layer whose largest singular value is at most this gets rank 1


@dataclass
class LayerResize:
    """What resizing did to one layer: its ranks, new alpha and the share of its change kept
    (Frobenius norm, not squared, as kohya's `fro retained`)."""
    name: str
    old_rank: int
    new_rank: int
    alpha: float
    fro_retained: float


def layer_delta(state: dict, name: str) -> torch.Tensor:
    """The layer's weight change as a matrix [out, in * kernel]."""
    return _product(state, name) * _scale(state, name)


def _product(state: dict, name: str) -> torch.Tensor:
    return state[name + UP].float().flatten(1) @ state[name + DOWN].float().flatten(1)


def _scale(state: dict, name: str) -> float:
    rank = state[name + DOWN].shape[0]
    alpha = float(state[name + ".alpha"]) if name + ".alpha" in state else float(rank)
    return alpha / rank


def dynamic_rank(s: torch.Tensor, method: str, param: float) -> int:
    """kohya's rank for singular values `s` (descending) by `method` at `param`, between 1 and
    len(s) (the caller applies the upper bound)."""
    s = s.double()
    if method == "sv_ratio":
        rank = int((s > s[0] / param).sum())
    elif method == "sv_cumulative":
        rank = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), float(param))) + 1
    elif method == "sv_fro":
        squares = s.pow(2)
        rank = int(torch.searchsorted(torch.cumsum(squares, 0) / squares.sum(),
                                      float(param) ** 2)) + 1
    else:
        raise ValueError(f"dynamic_method: {method!r} is not one of {', '.join(DYNAMIC_METHODS)}")
    return max(1, min(rank, int(s.shape[0])))


def resize_layer(state: dict, name: str, rank: int, method: str = "",
                 param: float = 0.0) -> tuple[dict[str, torch.Tensor], LayerResize]:
    down = state[name + DOWN]
    old_rank, scale = int(down.shape[0]), _scale(state, name)
    product = _product(state, name)
    u, s, vh = torch.linalg.svd(product, full_matrices=False)
    bound = max(1, min(rank, old_rank, int(s.shape[0])))
    if not method:
        keep = bound
    elif float(s[0]) <= MIN_SV:
        keep = 1
    else:
        keep = min(dynamic_rank(s, method, param), bound)
    # fixed: alpha = rank (scale 1, one alpha per file); dynamic: kohya's scale-keeping alpha
    alpha, factor = (scale * keep, 1.0) if method else (float(keep), scale)
    new_down = vh[:keep].reshape(keep, *down.shape[1:])
    new_up = (u[:, :keep] * (s[:keep] * factor)).reshape(
        product.shape[0], keep, *([1] * (down.dim() - 2)))
    squares = s.double().pow(2)
    total = float(squares.sum())
    fro = (float(squares[:keep].sum()) / total) ** 0.5 if total > 0 else 1.0
    return ({name + DOWN: new_down.contiguous(), name + UP: new_up.contiguous(),
             name + ".alpha": torch.tensor(float(alpha))},
            LayerResize(name, old_rank, keep, float(alpha), fro))


def resize_layers(state: dict, rank: int, conv_rank: int = 0, method: str = "",
                  param: float = 0.0) -> tuple[dict[str, torch.Tensor], list[LayerResize]]:
    """The resized state and, per layer, what was done (see the module's docstring)."""
    method = "" if method in ("", "none") else method
    out: dict[str, torch.Tensor] = {}
    report = []
    for name in sorted(_names(state)):
        is_conv = state[name + DOWN].dim() == 4 and state[name + DOWN].shape[-1] > 1
        tensors, info = resize_layer(state, name, (conv_rank or rank) if is_conv else rank,
                                     method, param)
        out.update(tensors)
        report.append(info)
    return out, report


def resize_state(state: dict, rank: int, conv_rank: int = 0, method: str = "",
                 param: float = 0.0) -> dict[str, torch.Tensor]:
    return resize_layers(state, rank, conv_rank, method, param)[0]


def output_target(paths, output_name: str, overwrite: bool) -> Path:
    """models/Lora/<output_name>.safetensors; an existing file only with overwrite."""
    target = paths.lora / f"{output_name.strip()}.safetensors"
    if target.exists() and not overwrite:
        raise FileExistsError(f"output_name: {target.name} exists in {paths.lora}; tick "
                              "'Overwrite' to replace it")
    return target


def derived_metadata(source: dict, target: Path, rank, comment: str,
                     alpha=None) -> dict[str, str]:
    """A source file's metadata for a file made from it: its new name, rank (and alpha, by
    default the rank) and comment (the hashes are written anew by save_lora)."""
    metadata = {k: v for k, v in source.items() if not k.startswith("sshs_")}
    metadata.update({"ss_network_dim": str(rank),
                     "ss_network_alpha": str(float(rank) if alpha is None else alpha),
                     "ss_output_name": target.stem, "ss_training_comment": comment})
    if "modelspec.title" in metadata:
        metadata["modelspec.title"] = target.stem
    return metadata


def run(cfg, ctx) -> Path:
    cfg.validate()
    paths = ctx.paths
    source = paths.resolve(paths.lora / cfg.lora.strip(), "lora")
    target = output_target(paths, cfg.output_name, cfg.overwrite)
    ctx.emit(ev.Status(f"Reading {source.name}"))
    state, metadata = load_lora(source)
    if has_dora(state):
        raise ValueError(f"lora: {source.name} is a DoRA file (dora_scale): a smaller rank "
                         "would change the norm its magnitudes divide by, so resizing it is "
                         "not offered")
    old = {state[k].shape[0] for k in state if k.endswith(DOWN)}
    method = "" if cfg.dynamic_method.strip() == "none" else cfg.dynamic_method.strip()
    resized, report = resize_layers(state, cfg.rank, cfg.conv_rank, method, cfg.dynamic_param)
    if not report:
        raise ValueError(f"lora: {source.name} has no kohya LoRA / LoCon layers to resize")
    kept = sum(float(layer_delta(resized, n).norm() ** 2) for n in _names(resized))
    total = sum(float(layer_delta(state, n).norm() ** 2) for n in _names(state))
    old_text = "/".join(map(str, sorted(old)))
    if method:
        # kohya: "Dynamic resize with {method}: {param} from {old_dim}; {comment}", dim and
        # alpha "Dynamic"
        bound = f"at most rank {cfg.rank}" + (f", conv {cfg.conv_rank}" if cfg.conv_rank else "")
        comment = (f"Dynamic resize with {method}: {cfg.dynamic_param:g} from {max(old)} "
                   f"({bound}); resized from {source.name} (rank {old_text})")
        metadata = derived_metadata(metadata, target, "Dynamic", comment, alpha="Dynamic")
        ranks = [r.new_rank for r in report]
        to = (f"ranks {min(ranks)}-{max(ranks)} (mean {sum(ranks) / len(ranks):.1f}) by "
              f"{method} {cfg.dynamic_param:g}")
    else:
        metadata = derived_metadata(metadata, target, cfg.rank, (
            f"resized from {source.name} (rank {old_text}) to rank {cfg.rank}"))
        to = f"rank {cfg.rank}"
    # a pivotal-tuning token rides along unchanged, as its metadata does
    save_lora(target, {**resized, **bundle_state(read_bundled(source))}, metadata,
              precision=cfg.save_precision)
    share = 100.0 * kept / total if total else 100.0
    fros = [r.fro_retained for r in report]
    worst = min(report, key=lambda r: r.fro_retained)
    ctx.emit(ev.Saved(step=0, path=str(target), kind="final"))
    ctx.emit(ev.Finished(step=0, path=str(target), message=(
        f"Resized {source.name} to {to}: {len(report)} layers, "
        f"{share:.1f}% of its weight change kept (Frobenius); per layer "
        f"{100 * sum(fros) / len(fros):.1f}% on average, least {100 * worst.fro_retained:.1f}% "
        f"({worst.name}); saved to {target}. {saved_file_note(target)}")))
    return target


def _names(state: dict) -> list[str]:
    return [k[:-len(DOWN)] for k in state if k.endswith(DOWN)]
