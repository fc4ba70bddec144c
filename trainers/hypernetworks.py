"""The models/hypernetworks folder: list and find hypernetwork files."""
from __future__ import annotations

from pathlib import Path

from core.paths import Paths


def list_hypernetworks(paths: Paths) -> list[str]:
    folder = paths.hypernetworks
    if not folder.is_dir():
        return []
    return sorted({p.stem for p in folder.rglob("*.pt")}, key=str.lower)


def find_hypernetwork(paths: Paths, name: str) -> Path | None:
    if not name or Path(name).name != name or name in (".", "..") or len(name) > 200:
        return None  # a name, not a path
    direct = paths.hypernetworks / f"{name}.pt"
    if direct.is_file():
        return direct
    matches = sorted(p for p in paths.hypernetworks.rglob("*.pt") if p.stem == name) \
        if paths.hypernetworks.is_dir() else []
    return matches[0] if matches else None


class HypernetworkExists(FileExistsError):
    pass


def create_hypernetwork(cfg, paths: Paths) -> Path:
    """Write models/hypernetworks/<name>.pt from a validated CreateHypernetworkConfig."""
    from core.config import ConfigError
    from trainers.formats.hypernetwork import save_hypernetwork
    from trainers.hypernetwork_net import Hypernetwork, HypernetworkSpec, parse_floats

    name = cfg.name.strip()
    target = paths.hypernetworks / f"{name}.pt"
    existing = find_hypernetwork(paths, name)
    if existing is not None and not cfg.overwrite:
        raise HypernetworkExists(f"name: a hypernetwork named {name!r} already exists "
                                 f"({existing.name}); tick 'Overwrite' (overwrite = true) to "
                                 "replace it")
    spec = HypernetworkSpec(
        name=name, sizes=list(cfg.sizes),
        layer_structure=parse_floats(cfg.layer_structure, "layer_structure"),
        activation_func=cfg.activation_func, weight_initialization=cfg.weight_initialization,
        add_layer_norm=cfg.add_layer_norm, use_dropout=cfg.use_dropout,
        dropout_structure=parse_floats(cfg.dropout_structure, "dropout_structure")
        if cfg.use_dropout else None).validate()
    if cfg.model.strip():
        widths, short_hash = _model_widths(paths, cfg.model)
        if not widths & set(spec.sizes):
            raise ConfigError(f"sizes: none of {', '.join(map(str, spec.sizes))} is an attention "
                              f"width of {cfg.model} ({', '.join(map(str, sorted(widths)))}), so "
                              "the hypernetwork would change nothing")
        spec.sd_checkpoint, spec.sd_checkpoint_name = short_hash, Path(cfg.model).stem
    save_hypernetwork(target, Hypernetwork(spec))
    target.with_name(target.name + ".optim").unlink(missing_ok=True)
    return target


def _model_widths(paths: Paths, name: str) -> tuple[set[int], str | None]:
    """The base model's attention widths and short hash, read from its files when they tell
    (this runs in the app process, where a loaded pipeline would sit beside the worker's);
    the model is loaded only when they do not (a .ckpt, a hub id)."""
    from trainers.hypernetwork_sizes import model_sizes
    from trainers.models import file_short_hash, resolve_model

    kind, location = resolve_model(paths, name)  # a name that is no model fails here, naming it
    sizes = model_sizes(paths, name) if kind != "hub" else None
    if sizes:
        return set(sizes), file_short_hash(Path(location), paths.cache) if kind == "file" else None
    from trainers.hypernetwork_attention import attention_widths
    from trainers.models import load_model
    model = load_model(paths, name)
    return set(attention_widths(model.unet)), model.short_hash
