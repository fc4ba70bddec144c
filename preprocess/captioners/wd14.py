"""SmilingWolf's WD taggers through onnxruntime: the v2 models (wd-v1-4-*-tagger-v2) and the v3
ones (wd-eva02-large-tagger-v3, wd-vit-large-tagger-v3, wd-vit-tagger-v3, wd-swinv2-tagger-v3,
wd-convnext-tagger-v3), from a local folder in the layout they ship: `model.onnx` +
`selected_tags.csv` (columns tag_id, name, category, count; category 9 = rating, 4 = character,
anything else general).

Input, as the tagger space and kohya's script prepare it: the image composited on white, padded
to a centred white square, resized to the model's input size (read from the ONNX input shape;
448 for every v2 / v3 model), as an N x H x W x 3 float32 batch in BGR order with values
0..255. Output: one probability per row of selected_tags.csv.

General tags need the general threshold (0.35), character tags the character threshold (0.85);
either may instead be MCut's (mcut_threshold, the character one at least 0.15 as in the space).
Character tags come first, then general ones; the most likely rating can lead."""
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
MIN_CHARACTER_MCUT = 0.15


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
    return (location / MODEL_FILE).is_file() or (location / TAGS_FILE).is_file()


def find_files(paths, typed: str) -> tuple[Path, Path]:
    """model.onnx and selected_tags.csv of a local folder (models/wd14/<name>, models/<name> or
    a path); never downloaded."""
    text = typed.strip()
    location = find_model(paths, text, field="wd14_model", subdir="wd14", is_model=_is_model_dir,
                          expects=f"a folder with {MODEL_FILE} and {TAGS_FILE}")
    if isinstance(location, str):  # a hub id typed while online: still only local folders
        where = paths.models / "wd14" if paths is not None else Path("models/wd14")
        raise CaptionerError(f"wd14_model: {text!r} is not a local folder; put {MODEL_FILE} and "
                             f"{TAGS_FILE} in {where / text.split('/')[-1]}")
    for name, what in ((MODEL_FILE, "the ONNX model"),
                       (TAGS_FILE, "the tag list shipped with it (tag_id,name,category,count)")):
        if not (location / name).is_file():
            raise CaptionerError(f"wd14_model: {location} has no {name} ({what})")
    return location / MODEL_FILE, location / TAGS_FILE


def load_model(model_file: Path, tags_file: Path, device: str = "cpu"):
    try:
        import onnxruntime as ort
    except ImportError:
        raise CaptionerError("wd14_model: the WD taggers run through onnxruntime, which is not "
                             "installed (pip install onnxruntime, or onnxruntime-gpu for CUDA)"
                             ) from None
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


def mcut_threshold(probs) -> float:
    """Maximum Cut: sort the probabilities high to low and cut at the middle of the largest gap
    between neighbours (one value: that value; none: above 1, so nothing passes)."""
    ordered = np.sort(np.asarray(probs, dtype=np.float64))[::-1]
    if ordered.size < 2:
        return float(ordered[0]) if ordered.size else 1.1
    gaps = ordered[:-1] - ordered[1:]
    cut = int(gaps.argmax())
    return float((ordered[cut] + ordered[cut + 1]) / 2)


class WD14Captioner:
    name = "wd14"

    def __init__(self, session, table: TagTable, general_threshold: float = 0.35,
                 character_threshold: float = 0.85, undesired_tags: str = "",
                 sort_alpha: bool = False, use_spaces: bool = True, escape: bool = True,
                 rating: bool = False, general_mcut: bool = False, character_mcut: bool = False,
                 character_first: bool = True):
        self.session, self.table = session, table
        self.general_threshold, self.character_threshold = general_threshold, character_threshold
        self.general_mcut, self.character_mcut = general_mcut, character_mcut
        self.character_first = character_first
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
        probs = np.asarray(self.session.run([self.output_name], {self.input_name: batch})[0][0],
                           dtype=np.float64)
        if probs.shape != (len(self.table.names),):  # a model whose tag count is not fixed
            raise CaptionerError(f"wd14_model: the model gave {probs.size} probabilities but "
                                 f"selected_tags.csv lists {len(self.table.names)} tags")
        return probs

    def thresholds(self, probs: np.ndarray) -> tuple[float, float]:
        """(general, character) thresholds for one image: the fixed ones or MCut's."""
        cats = np.asarray(self.table.categories)
        general, character = self.general_threshold, self.character_threshold
        if self.general_mcut:
            general = mcut_threshold(probs[(cats != RATING) & (cats != CHARACTER)])
        if self.character_mcut:
            character = max(MIN_CHARACTER_MCUT, mcut_threshold(probs[cats == CHARACTER]))
        return general, character

    def tags(self, image: Image.Image) -> list[str]:
        probs = self.probabilities(image)
        names, cats = self.table.names, self.table.categories
        general_t, character_t = self.thresholds(probs)
        character = {n: float(p) for n, c, p in zip(names, cats, probs) if c == CHARACTER}
        general = {n: float(p) for n, c, p in zip(names, cats, probs)
                   if c not in (RATING, CHARACTER)}

        def chosen(scores, threshold):
            return format_tags(scores, threshold, sort_alpha=self.sort_alpha,
                               use_spaces=self.use_spaces, escape=self.escape,
                               exclude=self.exclude, drop_rating=False, keep_kaomoji=True)

        if self.character_first:
            out = chosen(character, character_t) + chosen(general, general_t)
        else:
            out = chosen({**general, **character},
                         lambda tag: character_t if tag in character else general_t)
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
                         rating=cfg.wd14_rating, general_mcut=cfg.wd14_general_mcut,
                         character_mcut=cfg.wd14_character_mcut,
                         character_first=cfg.wd14_character_first)
