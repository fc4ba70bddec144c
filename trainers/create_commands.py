"""The CLI's create verbs (`python -m trainers create_embedding ...`): the page's Create tabs'
configs, checks and engine functions, with the result reported as events. Torch-free until a
verb runs."""
from __future__ import annotations

import importlib
from pathlib import Path

from core import events as ev
from trainers.configs import (AestheticEmbeddingConfig, CheckLoraConfig,
                              CreateEmbeddingConfig, CreateHypernetworkConfig)

CREATE_COMMANDS = {"create_embedding": CreateEmbeddingConfig,
                   "create_hypernetwork": CreateHypernetworkConfig,
                   "aesthetic_embedding": AestheticEmbeddingConfig,
                   "check_lora": CheckLoraConfig}
ENGINE = {"create_embedding": ("trainers.embeddings:create_embedding", "embedding"),
          "create_hypernetwork": ("trainers.hypernetworks:create_hypernetwork", "hypernetwork"),
          "aesthetic_embedding": ("trainers.aesthetic:create_aesthetic_embedding",
                                  "aesthetic embedding")}


def run_create(verb: str, cfg, ctx) -> Path:
    """Check the files `cfg` names, write the new file with the page's engine function, and
    emit Finished naming it. An existing name is refused unless cfg.overwrite is set."""
    from trainers.preflight import check_before_queueing
    cfg.validate()
    check_before_queueing(cfg, ctx.paths)
    if verb == "check_lora":
        return run_check(cfg, ctx)
    target, kind = ENGINE[verb]
    module, function = target.split(":")
    create = getattr(importlib.import_module(module), function)
    if verb == "aesthetic_embedding":
        path = create(cfg, ctx.paths, report=lambda text: ctx.emit(ev.Status(text)))
    else:
        path = create(cfg, ctx.paths)
    ctx.emit(ev.Finished(step=0, path=str(path), message=f"Created {kind} {cfg.name.strip()!r}"
                                                         f"{_details(verb, cfg)}: {path}"))
    return path


def _details(verb: str, cfg) -> str:
    if verb == "create_embedding":
        return (f" ({cfg.vectors_per_token} vector{'s' if cfg.vectors_per_token != 1 else ''} "
                f"from {cfg.init_text!r}, {cfg.model})")
    if verb == "create_hypernetwork":
        return f" (modules {', '.join(map(str, cfg.sizes))}, layers {cfg.layer_structure})"
    return f" (from the images in {cfg.data_root})"


def run_check(cfg, ctx) -> Path:
    """`check_lora`: the key-map Check's whole report as Status lines, its summary in
    Finished, or in Failed when the file is broken (trainers/formats/key_check.py). A file
    that cannot be read fails by name."""
    from trainers.formats.key_check import check_file
    path = cfg.lora_path(ctx.paths)
    report = check_file(path, None if cfg.family == "auto" else cfg.family)
    for line in report.text().splitlines()[1:]:
        ctx.emit(ev.Status(line))
    summary = ev.Failed(report.summary()) if report.broken else \
        ev.Finished(step=0, path=str(path), message=report.summary())
    ctx.emit(summary)  # a broken file makes the CLI exit 1
    return path
