"""The embeddings/ folder: list, find and create textual-inversion embeddings."""
from __future__ import annotations

from pathlib import Path

from core.paths import Paths

EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")


class EmbeddingExists(FileExistsError):
    pass


def list_embeddings(paths: Paths) -> list[str]:
    folder = paths.embeddings
    if not folder.is_dir():
        return []
    names = {p.stem for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EMBEDDING_SUFFIXES}
    return sorted(names, key=str.lower)


def find_embedding(paths: Paths, name: str) -> Path | None:
    if not name or Path(name).name != name or name in (".", "..") or len(name) > 200:
        return None  # a name, not a path: nothing outside embeddings/ is ever found
    folder = paths.embeddings
    for suffix in EMBEDDING_SUFFIXES:
        direct = folder / f"{name}{suffix}"
        if direct.is_file():
            return direct
    for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
        if path.stem == name and path.suffix.lower() in EMBEDDING_SUFFIXES:
            return path
    return None


def initial_vectors(tokenizer, text_encoder, init_text: str, count: int):
    """A1111's rule: spread the init text's token vectors over `count` rows (zeros if none)."""
    return table_vectors(tokenizer, text_encoder.get_input_embeddings().weight, init_text, count)


def table_vectors(tokenizer, table, init_text: str, count: int):
    """initial_vectors from the token-embedding table itself ([vocab, width])."""
    import torch
    table = table.detach().float().cpu()
    ids = tokenizer(init_text, add_special_tokens=False).input_ids if init_text.strip() else []
    vectors = torch.zeros(count, table.shape[1])
    if ids:
        embedded = table[torch.tensor(ids)]
        for i in range(count):
            vectors[i] = embedded[i * len(ids) // count]
    return vectors


def create_embedding(cfg, paths: Paths) -> Path:
    """Write embeddings/<name>.<format> from a validated CreateEmbeddingConfig."""
    from trainers.formats.embedding import EmbeddingFile, save_embedding
    from trainers.text_tables import text_tables

    name = cfg.name.strip()
    target = paths.embeddings / f"{name}.{cfg.file_format}"
    existing = find_embedding(paths, name)
    if existing is not None and not cfg.overwrite:
        raise EmbeddingExists(f"name: an embedding named {name!r} already exists "
                              f"({existing.name}); tick 'Overwrite' (overwrite = true) to "
                              "replace it")
    model = text_tables(paths, cfg.model)  # not the whole pipeline: this runs in the app
    halves = [table_vectors(tokenizer, table, cfg.init_text, cfg.vectors_per_token)
              for tokenizer, table in zip(model.tokenizers, model.tables)]
    # SDXL: one half per text encoder, as A1111 and kohya save SDXL embeddings
    vectors = dict(zip(model.halves, halves)) if model.halves else halves[0]
    save_embedding(target, EmbeddingFile(name=name, vectors=vectors, step=0,
                                         sd_checkpoint=model.short_hash,
                                         sd_checkpoint_name=Path(model.name).stem))
    if existing is not None and existing != target:
        existing.unlink()  # overwrite asked for; a second file under the same name would clash
    for stale in (target.with_name(target.name + ".optim"),):
        stale.unlink(missing_ok=True)
    return target


def create_missing_embedding(cfg, ctx) -> Path | None:
    """For textual inversion / APT with `create_missing`: embeddings/<embedding>.pt from the
    config's init_text and vectors_per_token (as Create embedding makes it) when there is no
    embedding of that name; emits a Status saying so. None when nothing was created."""
    from core import events as ev
    from trainers import distributed
    from trainers.configs import CreateEmbeddingConfig

    name = cfg.embedding.strip()
    if not cfg.create_missing or find_embedding(ctx.paths, name) is not None:
        return None
    created = None
    with distributed.main_first(ctx):  # the other processes then find the main one's file
        if find_embedding(ctx.paths, name) is None:
            created = create_embedding(CreateEmbeddingConfig(
                name=name, init_text=cfg.init_text, vectors_per_token=cfg.vectors_per_token,
                model=cfg.model).validate(), ctx.paths)
    if created is not None:
        ctx.emit(ev.Status(f"Created the missing embedding {name!r} from {cfg.init_text!r} "
                           f"({cfg.vectors_per_token} vectors per token): {created}"))
    return created
