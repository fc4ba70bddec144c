"""DeepDanbooru tags from the PyTorch port of the ResNet tagger (A1111's
`model-resnet_custom_v3.pt`, a state dict with a 'tags' list). The image is fitted into
512 x 512 with stretched edges, given as channels-last floats in [0, 1]; tags scoring at least
the threshold are kept, `rating:*` tags dropped, then sorted, spaced and escaped as configured.

The weights were published with A1111 (github.com/AUTOMATIC1111/TorchDeepDanbooru, release v1);
put the .pt file in models/deepbooru/ (A1111's models/torch_deepdanbooru/ works too)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from core.unpickle_errors import refused_message, weights_only_refusal
from preprocess.captioners import (CaptionerError, cached, find_model, format_tags,
                                   parse_tag_list)

FILE_NAME = "model-resnet_custom_v3.pt"
INPUT_SIZE = 512


def _weights_in(location: Path) -> Path | None:
    if location.is_file():
        return location if location.suffix == ".pt" else None
    if (location / FILE_NAME).is_file():
        return location / FILE_NAME
    found = sorted(location.glob("*.pt"))
    return found[0] if found else None


def find_weights(paths, typed: str) -> Path:
    try:
        location = find_model(paths, typed, field="deepbooru_model", subdir="",
                              is_model=lambda p: _weights_in(p) is not None,
                              expects=f"a folder holding {FILE_NAME} or a path to a .pt file")
    except CaptionerError:
        if paths is not None and typed.strip() == "deepbooru":
            legacy = paths.models / "torch_deepdanbooru"
            if _weights_in(legacy) is not None:
                return _weights_in(legacy)
        raise
    if isinstance(location, str):  # a hub id: the port is not published on the hub
        raise CaptionerError(f"deepbooru_model: {typed!r} was not found locally; download "
                             f"{FILE_NAME} into {paths.models / 'deepbooru' if paths else 'models/deepbooru'}")
    return _weights_in(location)


def load_model(weights: Path, device: str = "cpu"):
    import torch
    from preprocess.captioners.deepbooru_model import DeepDanbooruModel
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:
        refusal = weights_only_refusal(error)  # say why, never torch's advice to load unsafely
        if refusal is not None:
            raise CaptionerError(f"deepbooru_model: {refused_message(weights.name, str(refusal))}") \
                from None
        raise CaptionerError(f"deepbooru_model: cannot read {weights}: {error}") from None
    tags_file = weights.with_name("tags.txt")
    if "tags" not in state and tags_file.is_file():
        state["tags"] = [t.strip() for t in tags_file.read_text(encoding="utf-8").splitlines()
                         if t.strip()]
    try:
        model = DeepDanbooruModel.from_state_dict(state)
    except (KeyError, RuntimeError) as error:
        raise CaptionerError(f"deepbooru_model: {weights} is not a DeepDanbooru state dict "
                             f"({error})") from None
    if len(model.tags) != model.n_tags:
        raise CaptionerError(f"deepbooru_model: {weights} has {model.n_tags} outputs but "
                             f"{len(model.tags)} tags")
    return model.eval().to(device)


class DeepDanbooruCaptioner:
    name = "deepbooru"

    def __init__(self, model, device: str = "cpu", threshold: float = 0.5,
                 sort_alpha: bool = True, use_spaces: bool = True, escape: bool = True,
                 filter_tags: str = "", input_size: int = INPUT_SIZE):
        self.model, self.device = model, device
        self.threshold, self.sort_alpha = threshold, sort_alpha
        self.use_spaces, self.escape = use_spaces, escape
        self.exclude = parse_tag_list(filter_tags)
        self.input_size = input_size

    def scores(self, image) -> dict[str, float]:
        import torch
        from preprocess.transforms import resize_fill
        picture = resize_fill(image.convert("RGB"), self.input_size, self.input_size)
        batch = np.asarray(picture, dtype=np.float32)[None] / 255.0
        with torch.inference_mode():
            probs = self.model(torch.from_numpy(batch).to(self.device))[0].float().cpu().numpy()
        return dict(zip(self.model.tags, probs.tolist()))

    def tags(self, image) -> list[str]:
        return format_tags(self.scores(image), self.threshold, sort_alpha=self.sort_alpha,
                           use_spaces=self.use_spaces, escape=self.escape, exclude=self.exclude)

    def caption(self, image) -> str:
        return ", ".join(self.tags(image))


def create(cfg, paths, device: str) -> DeepDanbooruCaptioner:
    weights = find_weights(paths, cfg.deepbooru_model)
    model = cached(("deepbooru", str(weights.resolve()), device),
                   lambda: load_model(weights, device))
    return DeepDanbooruCaptioner(model, device, threshold=cfg.deepbooru_threshold,
                                 sort_alpha=cfg.deepbooru_sort_alpha,
                                 use_spaces=cfg.deepbooru_use_spaces,
                                 escape=cfg.deepbooru_escape,
                                 filter_tags=cfg.deepbooru_filter_tags)
