"""Edit the captions of a dataset folder: `<stem>.txt` beside each image, comma-separated tags.

Pure tag-list operations (add, remove, replace, move to the front, dedupe) work on lists of
strings; folder operations read every caption, apply one of them and write back only the files
that changed, each atomically (a temporary file in the same folder, then os.replace), so an
interrupted edit never leaves a half-written caption.

Tags match loosely: case, underscores vs spaces and repeated spaces are ignored, so "Long Hair"
removes "long_hair". The tags' own spelling is kept otherwise."""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from core.images import IMAGE_EXTENSIONS

CAPTION_EXT = ".txt"
SEPARATOR = ", "
ACTIONS = ["add", "add_front", "remove", "replace", "move_front", "dedupe"]


# --- tag lists ----------------------------------------------------------------------------------

def tag_key(tag: str) -> str:
    return " ".join(tag.replace("_", " ").lower().split())


def split_tags(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def join_tags(tags: Iterable[str], separator: str = SEPARATOR) -> str:
    return separator.join(tags)


def _as_list(tags: str | Iterable[str]) -> list[str]:
    return split_tags(tags) if isinstance(tags, str) else [t.strip() for t in tags if t.strip()]


def dedupe(tags: list[str]) -> list[str]:
    """Keep the first of tags that match."""
    seen, out = set(), []
    for tag in tags:
        key = tag_key(tag)
        if key not in seen:
            seen.add(key)
            out.append(tag)
    return out


def add_tags(tags: list[str], new: str | Iterable[str], front: bool = False) -> list[str]:
    """Add the tags not already present, at the end (or the front, in the given order)."""
    present = {tag_key(t) for t in tags}
    extra = [t for t in dedupe(_as_list(new)) if tag_key(t) not in present]
    return extra + list(tags) if front else list(tags) + extra


def remove_tags(tags: list[str], remove: str | Iterable[str]) -> list[str]:
    gone = {tag_key(t) for t in _as_list(remove)}
    return [t for t in tags if tag_key(t) not in gone]


def replace_tag(tags: list[str], old: str, new: str) -> list[str]:
    """Replace a tag where it stands (an empty `new` removes it); when `new` is already there,
    the old tag is just dropped. Other tags are left as they are."""
    key, new = tag_key(old), new.strip()
    new_key = tag_key(new)
    have_new = any(tag_key(t) == new_key for t in tags if tag_key(t) != key)
    out = []
    for tag in tags:
        if tag_key(tag) != key:
            out.append(tag)
        elif new and not have_new:
            out.append(new)
            have_new = True
    return out


def move_to_front(tags: list[str], front: str | Iterable[str]) -> list[str]:
    """Move the given tags that are present to the front, in the given order."""
    wanted = [tag_key(t) for t in _as_list(front)]
    by_key: dict[str, list[str]] = {}
    for tag in tags:
        by_key.setdefault(tag_key(tag), []).append(tag)
    head = [t for key in dict.fromkeys(wanted) for t in by_key.get(key, [])]
    moved = set(wanted)
    return head + [t for t in tags if tag_key(t) not in moved]


def edit_tags(tags: list[str], action: str, values: str | Iterable[str] = "",
              replacement: str = "") -> list[str]:
    """One of ACTIONS on a tag list (for a dropdown in the page)."""
    if action == "add":
        return add_tags(tags, values)
    if action == "add_front":
        return add_tags(tags, values, front=True)
    if action == "remove":
        return remove_tags(tags, values)
    if action == "replace":
        out = list(tags)
        for old in _as_list(values):
            out = replace_tag(out, old, replacement)
        return out
    if action == "move_front":
        return move_to_front(tags, values)
    if action == "dedupe":
        return dedupe(tags)
    raise ValueError(f"action: unknown caption edit {action!r} (known: {', '.join(ACTIONS)})")


# --- files --------------------------------------------------------------------------------------

def caption_path(image: Path) -> Path:
    return Path(image).with_suffix(CAPTION_EXT)


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))


def read_caption(image: Path) -> str:
    path = caption_path(image)
    if not path.is_file():
        return ""
    return path.read_text(encoding="utf-8-sig", errors="replace").strip()


def read_captions(folder: str | Path, recursive: bool = False) -> dict[Path, str]:
    """Every image of the folder -> its caption ("" when it has none)."""
    return {image: read_caption(image) for image in list_images(folder, recursive)}


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        if path.exists():
            os.chmod(temp, path.stat().st_mode & 0o777)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def write_caption(image: Path, text: str, remove_empty: bool = False) -> Path:
    """Write the caption of one image atomically; with remove_empty, "" deletes the file."""
    path = caption_path(image)
    if remove_empty and not text.strip():
        if path.exists():
            path.unlink()
        return path
    atomic_write_text(path, text)
    return path


@dataclass
class EditReport:
    changed: list[Path] = field(default_factory=list)   # caption files rewritten
    unchanged: int = 0
    before: dict[Path, str] = field(default_factory=dict)  # old text of each changed caption


def edit_captions(folder: str | Path, edit: Callable[[list[str]], list[str]],
                  recursive: bool = False, dry_run: bool = False,
                  only: Iterable[Path] | None = None) -> EditReport:
    """Apply `edit` to the tag list of every caption (images without one start from []); write
    back only the ones whose tags changed. `only` limits it to some images."""
    report = EditReport()
    chosen = None if only is None else {Path(p) for p in only}
    for image, text in read_captions(folder, recursive).items():
        if chosen is not None and image not in chosen:
            continue
        tags = split_tags(text)
        new_tags = edit(list(tags))
        if new_tags == tags:  # untouched files keep their exact text
            report.unchanged += 1
            continue
        new_text = join_tags(new_tags)
        report.changed.append(caption_path(image))
        report.before[caption_path(image)] = text
        if not dry_run:
            write_caption(image, new_text)
    return report


def apply_edit(folder: str | Path, action: str, values: str | Iterable[str] = "",
               replacement: str = "", recursive: bool = False,
               dry_run: bool = False) -> EditReport:
    """Folder-wide `edit_tags(action, values, replacement)`."""
    if action not in ACTIONS:
        raise ValueError(f"action: unknown caption edit {action!r} (known: {', '.join(ACTIONS)})")
    return edit_captions(folder, lambda tags: edit_tags(tags, action, values, replacement),
                         recursive=recursive, dry_run=dry_run)


def tag_frequency(source: str | Path | Iterable[str], recursive: bool = False
                  ) -> list[tuple[str, int]]:
    """(tag, number of captions containing it), most frequent first, ties alphabetical. Accepts
    a folder or caption texts; matching tags count once per caption, under their first spelling."""
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        texts = read_captions(source, recursive).values()
    else:
        texts = [source] if isinstance(source, str) else source
    counts: Counter = Counter()
    spelling: dict[str, str] = {}
    for text in texts:
        for tag in dedupe(split_tags(text)):
            key = tag_key(tag)
            spelling.setdefault(key, tag)
            counts[key] += 1
    return sorted(((spelling[k], n) for k, n in counts.items()), key=lambda item: (-item[1],
                                                                                    item[0]))
