"""WD14 tagger (SmilingWolf's ONNX models with `selected_tags.csv`) through onnxruntime.

Input: the image composited on white, padded to a centred white square, resized to the model's
input size (448 for the v2/v3 models), as one N x H x W x 3 float32 batch in BGR order with
values 0..255. Output: one probability per row of selected_tags.csv (columns tag_id, name,
category, count; category 9 = rating, 4 = character, anything else general). General tags need
the general threshold (0.35), character tags the character threshold (0.85)."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from preprocess.captioners import (CaptionerError, cached, find_model, format_tags,
                                   normalise_tag, parse_tag_list)

MODEL_FILE, TAGS_FILE = "model.onnx", "selected_tags.csv"
DEFAULT_SIZE = 448
RATING, CHARACTER = "9", "4"


@dataclass(frozen=True)
class TagTable:
    names: list[str]
    categories: list[str]

    @classmethod
    def read(cls, path: Path) -> "TagTable":
        with open(path, newline="", encoding="utf-8") as file:
            rows = list(csv.reader(file))
        if not rows or [c.strip() for c in rows[0][:3]] != ["tag_id", "name", "category"]:
            raise CaptionerError(f"wd14_model: {path} does not start with the header "
                                 "tag_id,name,category")
        body = [r for r in rows[1:] if len(r) >= 3]
        return cls(names=[r[1] for r in body], categories=[r[2].strip() for r in body])


def _is_model_dir(location: Path) -> bool:
    return (location / MODEL_FILE).is_file() and (location / TAGS_FILE).is_file()


def find_files(paths, typed: str) -> tuple[Path, Path]:
    text = typed.strip()
    hub_default = text if "/" in text else f"SmilingWolf/{text}"
    location = find_model(paths, text, field="wd14_model", subdir="wd14", is_model=_is_model_dir,
                          expects=f"a folder with {MODEL_FILE} and {TAGS_FILE}",
                          hub_default=hub_default)
    if isinstance(location, Path):
        return location / MODEL_FILE, location / TAGS_FILE
    try:
        from huggingface_hub import hf_hub_download
        return (Path(hf_hub_download(location, MODEL_FILE)),
                Path(hf_hub_download(location, TAGS_FILE)))
    except Exception as error:
        raise location.not_found("wd14_model", error) from None


def load_model(model_file: Path, tags_file: Path, device: str = "cpu"):
    import onnxruntime as ort
    available = ort.get_available_providers()
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in available:
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = ort.InferenceSession(str(model_file), providers=providers)
    except Exception as error:
        raise CaptionerError(f"wd14_model: cannot load {model_file}: {error}") from None
    table = TagTable.read(tags_file)
    outputs = session.get_outputs()[0].shape
    if isinstance(outputs[-1], int) and outputs[-1] != len(table.names):
        raise CaptionerError(f"wd14_model: {model_file} has {outputs[-1]} outputs but "
                             f"{tags_file} lists {len(table.names)} tags")
    return session, table


def prepare(image: Image.Image, size: int) -> np.ndarray:
    """1 x size x size x 3 float32, BGR, 0..255, padded to a white square."""
    if image.mode in ("RGBA", "LA", "P"):
        from core.images import flatten
        image = flatten(image.convert("RGBA"))
    image = image.convert("RGB")
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    if side != size:
        # area averaging when shrinking (as cv2.INTER_AREA), bicubic when enlarging
        square = square.resize((size, size), Image.Resampling.BOX if side > size
                               else Image.Resampling.BICUBIC)
    array = np.asarray(square, dtype=np.float32)[:, :, ::-1]
    return np.ascontiguousarray(array)[None]


class WD14Captioner:
    name = "wd14"

    def __init__(self, session, table: TagTable, general_threshold: float = 0.35,
                 character_threshold: float = 0.85, undesired_tags: str = "",
                 sort_alpha: bool = False, use_spaces: bool = True, escape: bool = True,
                 rating: bool = False):
        self.session, self.table = session, table
        self.general_threshold, self.character_threshold = general_threshold, character_threshold
        self.exclude = parse_tag_list(undesired_tags)
        self.sort_alpha, self.use_spaces, self.escape = sort_alpha, use_spaces, escape
        self.rating = rating
        model_input = session.get_inputs()[0]
        self.input_name, self.output_name = model_input.name, session.get_outputs()[0].name
        shape = list(model_input.shape)
        self.channels_first = len(shape) == 4 and shape[1] == 3 and shape[3] != 3
        dim = shape[2] if self.channels_first else (shape[1] if len(shape) == 4 else None)
        self.size = dim if isinstance(dim, int) and dim > 0 else DEFAULT_SIZE

    def probabilities(self, image: Image.Image) -> np.ndarray:
        batch = prepare(image, self.size)
        if self.channels_first:
            batch = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
        return np.asarray(self.session.run([self.output_name], {self.input_name: batch})[0][0],
                          dtype=np.float64)

    def tags(self, image: Image.Image) -> list[str]:
        probs = self.probabilities(image)
        names, cats = self.table.names, self.table.categories
        scores = {name: float(p) for name, cat, p in zip(names, cats, probs) if cat != RATING}
        character = {name for name, cat in zip(names, cats) if cat == CHARACTER}
        out = format_tags(
            scores, lambda tag: self.character_threshold if tag in character
            else self.general_threshold, sort_alpha=self.sort_alpha, use_spaces=self.use_spaces,
            escape=self.escape, exclude=self.exclude, drop_rating=False,
            keep_short_underscores=True)
        if self.rating:
            ratings = [(float(p), name) for name, cat, p in zip(names, cats, probs) if cat == RATING]
            if ratings:
                best = max(ratings)[1]
                if normalise_tag(best) not in self.exclude:
                    out.insert(0, best)
        return out

    def caption(self, image: Image.Image) -> str:
        return ", ".join(self.tags(image))


def create(cfg, paths, device: str) -> WD14Captioner:
    model_file, tags_file = find_files(paths, cfg.wd14_model)
    session, table = cached(("wd14", str(model_file.resolve()), device),
                            lambda: load_model(model_file, tags_file, device))
    return WD14Captioner(session, table, general_threshold=cfg.wd14_general_threshold,
                         character_threshold=cfg.wd14_character_threshold,
                         undesired_tags=cfg.wd14_undesired_tags, sort_alpha=cfg.wd14_sort_alpha,
                         use_spaces=cfg.wd14_use_spaces, escape=cfg.wd14_escape,
                         rating=cfg.wd14_rating)
