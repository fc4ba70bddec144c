"""The fine-tuning dataset: the images a metadata JSON names, with its captions and tags, in
aspect-ratio buckets, their latents cached as kohya's `<stem>.npz` beside each image.

When every entry has `train_resolution` (written by kohya's prepare_buckets_latents), those
sizes are the buckets, as in kohya's fine-tuning; otherwise buckets follow the run's settings.
Batches, caption shuffling and dropout, flips and the latent cache are kohya_data's."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from PIL import Image, UnidentifiedImageError

from core.images import describe_skipped, list_images
from trainers.buckets import assign
from trainers.data import DatasetError
from trainers.finetune_metadata import caption_of, find_image
from trainers.kohya_data import (DatasetConfig, ImageEntry, KohyaBatches, KohyaDataset, _place,
                                 _split_off, attach_masks, cache_latents, config_buckets,
                                 image_size)


def scan_metadata(config: DatasetConfig, metadata: dict[str, dict], seed: int = 0) -> KohyaDataset:
    subset = config.subsets[0]
    image_dir = subset.image_dir
    listed = [tuple(e["train_resolution"]) for e in metadata.values() if "train_resolution" in e]
    notes = list(config.notes)
    if listed and len(listed) == len(metadata):
        if config.bucket_no_upscale:
            raise DatasetError("bucket_no_upscale: the metadata JSON fixes each image's bucket "
                               "(train_resolution), so bucket_no_upscale cannot be used")
        buckets = sorted(set(listed))
        place = lambda size: assign(size, buckets)  # noqa: E731
        notes.append(f"buckets from the metadata's train_resolution: {len(buckets)}")
    else:
        if listed:
            notes.append("only some entries have train_resolution; buckets follow the settings")
        buckets = config_buckets(config)
        place = lambda size: _place(config, buckets, size)  # noqa: E731
    entries, missing = [], []
    for key, entry in metadata.items():
        path = find_image(key, image_dir)
        if path is None:
            missing.append(key)
            continue
        try:
            size = image_size(path)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
            raise DatasetError(f"in_json: the image of {key!r} ({path}) cannot be read: {error}") from None
        entries.append(ImageEntry(path=path, subset=0, caption=caption_of(entry), size=size,
                                  placement=place(size), is_reg=False,
                                  repeats=subset.num_repeats))
    if subset.conditioning_data_dir is not None and entries:
        attach_masks(entries, subset.conditioning_data_dir)
    if missing:
        shown = ", ".join(repr(k) for k in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DatasetError(f"in_json: {len(missing)} listed image(s) not found in {image_dir}: "
                           f"{shown}")
    used = {e.path.resolve() for e in entries}
    held: list[ImageEntry] = []
    if config.validation_split:
        entries = _split_off(entries, config, seed, held, image_dir.name)
    unlisted = [(p.name, "not in the metadata JSON") for p in list_images(image_dir)
                if p.resolve() not in used]
    if unlisted:
        notes.append(f"{image_dir.name}: {describe_skipped(unlisted)}")
    return KohyaDataset(config=config, train_images=entries, reg_images=[],
                        img_counts=[len(entries)], buckets=buckets, notes=notes,
                        validation_images=held)


def prepare(config: DatasetConfig, metadata: dict[str, dict], vae, seed: int,
            report: Callable[[str], None] = lambda text: None) -> tuple[KohyaBatches, int]:
    """Scan, cache latents to `<stem>.npz` (reusing matching files): (batches, images encoded)."""
    dataset = scan_metadata(config, metadata, seed)
    encoded = cache_latents(dataset, vae, seed, cache_to_disk=True, report=report)
    return KohyaBatches([dataset], seed, vae.config.scaling_factor), encoded
