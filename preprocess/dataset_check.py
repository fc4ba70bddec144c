"""Dataset check: what in a training folder will hurt a run, with the files to fix.

    report = check_dataset("dataset", resolution=512, max_token_length=75)
    print(report.text())

A folder is either flat (A1111: images with `<stem>.txt` captions) or kohya's repeats layout
(sub-folders `<repeats>_<class tokens>`, the rule of trainers/kohya_data.parse_folder_name;
then images beside the sub-folders are not trained and are named as such). Reported:

- images smaller in area than the training resolution (training would enlarge them);
- near-duplicate images: a 64-bit difference hash (dHash: a 9 x 8 grey thumbnail, one bit per
  pair of neighbouring pixels) within `max_distance` bits;
- images with no caption file, and caption files holding nothing;
- captions longer than the token limit (75, 150 or 225, as the trainers' max_token_length),
  counted without the start/end tokens by the model's CLIP tokenizer (a folder given as
  `tokenizer`) or CLIP's own vocabulary shipped with the openai-clip package;
- unreadable files, and the most frequent tags (comma-separated, counted once per caption).
"""
from __future__ import annotations

import functools
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from core.images import ImageError, list_images, open_image

REPEATS_FOLDER = re.compile(r"^(\d+)_(.*)$", re.DOTALL)
TOKEN_LIMITS = (75, 150, 225)
HASH_SIZE = 8
SHOWN = 20  # file names listed per finding in the text


@dataclass
class DatasetReport:
    folder: str
    resolution: tuple[int, int]
    max_token_length: int
    layout: str = "flat"                 # "flat" or "kohya" (repeats sub-folders)
    images: int = 0
    too_small: list[tuple[str, int, int]] = field(default_factory=list)   # name, width, height
    duplicates: list[list[str]] = field(default_factory=list)             # groups of names
    missing_captions: list[str] = field(default_factory=list)
    empty_captions: list[str] = field(default_factory=list)
    long_captions: list[tuple[str, int]] = field(default_factory=list)    # name, tokens
    unreadable: list[tuple[str, str]] = field(default_factory=list)       # name, reason
    not_trained: list[str] = field(default_factory=list)  # images beside repeats folders
    top_tags: list[tuple[str, int]] = field(default_factory=list)
    token_note: str = ""                 # why tokens were not counted, if they were not

    def findings(self) -> list[str]:
        """One line per kind of problem found, with the file names (at most SHOWN each)."""
        width, height = self.resolution
        lines = []
        if self.unreadable:
            lines.append(f"{_count(self.unreadable, 'file')} cannot be read: "
                         + _names([f"{n} ({why})" for n, why in self.unreadable]))
        if self.too_small:
            lines.append(f"{_count(self.too_small, 'image')} smaller than {width}x{height} "
                         "(training enlarges them; blurry results): "
                         + _names([f"{n} ({w}x{h})" for n, w, h in self.too_small]))
        if self.duplicates:
            lines.append(f"{_count(self.duplicates, 'group')} of near-duplicate images (keep "
                         "one of each): " + _names([" = ".join(g) for g in self.duplicates]))
        if self.missing_captions:
            lines.append(f"{_count(self.missing_captions, 'image')} without a caption file "
                         "(the file name or the folder's class tokens are used): "
                         + _names(self.missing_captions))
        if self.empty_captions:
            lines.append(f"{_count(self.empty_captions, 'caption file')} empty: "
                         + _names(self.empty_captions))
        if self.long_captions:
            lines.append(f"{_count(self.long_captions, 'caption')} longer than "
                         f"{self.max_token_length} tokens (the rest is cut off): "
                         + _names([f"{n} ({t} tokens)" for n, t in self.long_captions]))
        if self.not_trained:
            lines.append(f"{_count(self.not_trained, 'image')} beside the "
                         "<repeats>_<tokens> folders, not trained: " + _names(self.not_trained))
        return lines

    def text(self) -> str:
        kind = "kohya repeats folders" if self.layout == "kohya" else "flat folder"
        findings = self.findings()
        head = (f"Dataset check of {self.folder} ({kind}): {self.images} images, "
                + (f"{_count(findings, 'kind')} of problem." if findings
                   else "no problems found."))
        lines = [head] + [f"- {line}" for line in findings]
        if self.token_note:
            lines.append(f"Caption lengths not checked: {self.token_note}")
        if self.top_tags:
            lines.append("Most frequent tags: "
                         + ", ".join(f"{tag} ({n})" for tag, n in self.top_tags))
        return "\n".join(lines)

    def summary(self) -> str:
        """One line for a start message: the counts only."""
        parts = [f"{len(self.unreadable)} unreadable", f"{len(self.too_small)} too small",
                 f"{len(self.duplicates)} duplicate groups",
                 f"{len(self.missing_captions)} without caption",
                 f"{len(self.empty_captions)} empty captions",
                 f"{len(self.long_captions)} over {self.max_token_length} tokens"]
        return ", ".join(p for p in parts if not p.startswith("0 "))


def _count(items, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


# --- the parts ---------------------------------------------------------------------------------

def training_images(folder: Path) -> tuple[str, list[Path], list[Path]]:
    """(layout, images trained, images beside repeats folders that are not trained)."""
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                        and REPEATS_FOLDER.match(p.name) and int(p.name.split("_")[0]) > 0)
    if not subfolders:
        return "flat", list_images(folder), []
    images = [image for sub in subfolders for image in list_images(sub)]
    return "kohya", images, list_images(folder)


def dhash(image: Image.Image) -> np.ndarray:
    """64 bits: is each pixel of a 9 x 8 grey thumbnail brighter than its right neighbour."""
    grey = image.convert("L").resize((HASH_SIZE + 1, HASH_SIZE), Image.Resampling.BOX)
    pixels = np.asarray(grey, dtype=np.int16)
    return (pixels[:, 1:] > pixels[:, :-1]).ravel()


def duplicate_groups(hashes: dict[str, np.ndarray], max_distance: int = 4) -> list[list[str]]:
    """Names whose hashes differ in at most max_distance bits, joined transitively."""
    names = list(hashes)
    if len(names) < 2:
        return []
    bits = np.stack([hashes[n] for n in names])
    parent = list(range(len(names)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(names) - 1):
        close = np.nonzero((bits[i + 1:] != bits[i]).sum(axis=1) <= max_distance)[0] + i + 1
        for j in close:
            parent[root(int(j))] = root(i)
    groups: dict[int, list[str]] = {}
    for i, name in enumerate(names):
        groups.setdefault(root(i), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def tokenizer_folder(location: str | Path) -> Path:
    """The CLIP tokenizer folder a typed location means: itself, or a model's tokenizer/."""
    folder = Path(location)
    if (folder / "tokenizer").is_dir():
        folder = folder / "tokenizer"
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        raise ValueError(f"tokenizer: {location} holds no CLIP tokenizer (vocab.json, "
                         "merges.txt), nor a tokenizer/ folder with one")
    return folder


@functools.lru_cache(maxsize=4)
def load_tokenizer(folder: str = ""):
    """A CLIP tokenizer from a folder, or, with none, CLIP's vocabulary from the openai-clip
    package (the same for SD 1.x, SD 2.x and both SDXL encoders)."""
    from transformers import CLIPTokenizer
    if folder:
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    else:
        from core.clip_vocab import write_clip_tokenizer
        with tempfile.TemporaryDirectory(prefix="danlu-clip-vocab-") as temp:
            write_clip_tokenizer(Path(temp))
            tokenizer = CLIPTokenizer.from_pretrained(temp)
    tokenizer.model_max_length = 1 << 30  # only counting: no warning about long captions
    return tokenizer


def count_tokens(tokenizer, caption: str) -> int:
    return len(tokenizer(caption, add_special_tokens=False, truncation=False).input_ids)


def read_caption(image: Path, extension: str) -> str | None:
    path = image.with_name(image.stem + extension)
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8-sig", errors="replace").strip()


def top_tags(captions: list[str], top: int) -> list[tuple[str, int]]:
    counts: Counter = Counter()
    for caption in captions:
        counts.update({t.strip().lower() for t in caption.split(",") if t.strip()})
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top]


# --- the check ---------------------------------------------------------------------------------

def check_dataset(folder: str | Path, resolution: int | tuple[int, int] = 512,
                  max_token_length: int = 75, tokenizer: str | Path | None = None,
                  caption_extension: str = ".txt", max_distance: int = 4,
                  top: int = 20) -> DatasetReport:
    """Check a training folder; raises ValueError naming the argument for bad input."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder: {folder} "
                         f"{'is not a folder' if folder.exists() else 'does not exist'}")
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    if min(width, height) < 1:
        raise ValueError(f"resolution: must be positive, got {resolution}")
    if max_token_length not in TOKEN_LIMITS:
        raise ValueError(f"max_token_length: choose 75, 150 or 225, got {max_token_length}")
    if not caption_extension.startswith("."):
        raise ValueError(f"caption_extension: must start with '.', got {caption_extension!r}")
    chosen_tokenizer = str(tokenizer_folder(tokenizer)) if tokenizer else ""
    layout, images, not_trained = training_images(folder)
    report = DatasetReport(folder=str(folder), resolution=(width, height),
                           max_token_length=max_token_length, layout=layout, images=len(images))
    report.not_trained = [_name(p, folder) for p in not_trained]

    hashes: dict[str, np.ndarray] = {}
    captions: dict[str, str] = {}
    for image in images:
        name = _name(image, folder)
        try:
            with Image.open(image) as header:
                size = header.size
            hashes[name] = dhash(open_image(image, draft=(64, 64)))
        except (ImageError, OSError, Image.DecompressionBombError) as error:
            report.unreadable.append((name, str(error)))
            continue
        if size[0] * size[1] < width * height:
            report.too_small.append((name, *size))
        caption = read_caption(image, caption_extension)
        if caption is None:
            report.missing_captions.append(name)
        elif not caption:
            report.empty_captions.append(name)
        else:
            captions[name] = caption
    report.duplicates = duplicate_groups(hashes, max_distance)
    report.top_tags = top_tags(list(captions.values()), top)
    if captions:
        try:
            counter = load_tokenizer(chosen_tokenizer)
        except (ImportError, RuntimeError, OSError) as error:  # no transformers / openai-clip
            report.token_note = str(error)
        else:
            lengths = {name: count_tokens(counter, text) for name, text in captions.items()}
            report.long_captions = [(n, t) for n, t in lengths.items() if t > max_token_length]
    return report


def _name(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()
