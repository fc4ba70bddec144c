"""kohya's fine-tuning metadata JSON: read, check, build from caption/tag files, clean.

Layout (kohya sd-scripts' `finetune/` tools): `{image key: {"caption": str, "tags": str,
"train_resolution": [w, h]}}`; the key is the image's file stem, or its full path (then images
may live in several folders). Captions come from `<stem>.caption` files, tags (WD14 /
DeepDanbooru output) from `<stem>.txt`; merging updates an existing JSON's entries and keeps
the rest. The trained caption is `caption, tags` (the tags alone when there is no caption).

Cleaning (the rules of kohya's clean_captions_and_tags, written here): tags get underscores
turned into spaces (emoticons such as `^_^` kept), DeepDanbooru's `rating:*` tags dropped,
duplicates dropped, and a tag dropped when a more specific tag ends with it (`shirt` beside
`white shirt`); with several people in the image (`2girls`, `multiple boys`, ...) every kind of
tag that cannot say who it belongs to — eye colours, hair colours, hair lengths, hair cuts,
sleeves, hairstyles — is dropped when more than one of that kind is present. Captions get
whitespace collapsed and immediately repeated words merged (`a girl girl` -> `a girl`); with
`anime_rules`, also kohya's replacements for BLIP captions of anime pictures (`anime girl`,
`woman`, `person` ... -> `girl`, `young` dropped), on whole words only. Torch-free."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from core.atomic import atomic_write
from core.images import IMAGE_EXTENSIONS, list_images
KEYS = {"caption": "a string", "tags": "a string", "train_resolution": "[width, height]"}
EMOTICON = re.compile(r"^[\W_]+$")  # tags like ^_^ or >_< keep their underscores


class MetadataError(ValueError):
    def __init__(self, message: str):
        super().__init__(message)
        self.user_message = message


def _is_resolution(value) -> bool:
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))


def check_metadata(data, source: str = "metadata JSON") -> dict[str, dict]:
    """Problems name the image key and the field; every one is reported at once."""
    if not isinstance(data, dict):
        raise MetadataError(f"{source}: must be an object of image key -> entry, got "
                            f"{type(data).__name__}")
    if not data:
        raise MetadataError(f"{source}: has no images")
    problems = []
    for key, entry in data.items():
        if not key.strip():
            problems.append(f"{source}: an empty image key")
        if not isinstance(entry, dict):
            problems.append(f"{source}: {key!r} must be an object like "
                            "{\"caption\": \"...\", \"tags\": \"...\"}, got "
                            f"{type(entry).__name__}")
            continue
        for field, value in entry.items():
            if field not in KEYS:
                problems.append(f"{source}: {key!r} has an unknown key {field!r} (known: "
                                f"{', '.join(KEYS)})")
            elif field == "train_resolution":
                if not _is_resolution(value):
                    problems.append(f"{source}: {key!r} train_resolution must be [width, height] "
                                    f"in pixels, got {value!r}")
            elif not isinstance(value, str):
                problems.append(f"{source}: {key!r} {field} must be a string, got "
                                f"{type(value).__name__}")
    if problems:
        raise MetadataError("; ".join(problems[:20]) + (f" (and {len(problems) - 20} more)"
                                                        if len(problems) > 20 else ""))
    return data


def load_metadata(path: Path | str) -> dict[str, dict]:
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"in_json: {path} does not exist (make it with 'Make metadata JSON')")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MetadataError(f"in_json: {path.name} is not readable JSON ({error})") from None
    return check_metadata(data, f"in_json {path.name}")


def save_metadata(path: Path | str, metadata: dict[str, dict]) -> None:
    text = json.dumps(metadata, indent=2, ensure_ascii=False)
    atomic_write(Path(path), lambda temp: Path(temp).write_text(text, encoding="utf-8"))


def caption_of(entry: dict) -> str:
    """What trains: `caption, tags`, the tags alone, or an empty caption."""
    caption, tags = entry.get("caption"), entry.get("tags")
    if caption is None:
        return tags or ""
    return f"{caption}, {tags}" if tags else caption


# ---------------------------------------------------------------------------- images

def find_image(key: str, image_dir: Path) -> Path | None:
    """The image a key names: a full path that exists, else `<image_dir>/<key><ext>`."""
    candidate = Path(key)
    if candidate.is_absolute() and candidate.is_file():
        return candidate
    for ext in IMAGE_EXTENSIONS:
        for variant in (ext, ext.upper()):
            path = image_dir / f"{key}{variant}"
            if path.is_file():
                return path
    return None


def image_key(path: Path, full_path: bool) -> str:
    return str(path.resolve()) if full_path else path.stem


# ---------------------------------------------------------------------------- building

@dataclass
class MergeReport:
    images: int = 0
    captions: int = 0
    tags: int = 0
    added: int = 0
    without_text: int = 0
    cleaned: int = 0

    def text(self, path: Path) -> str:
        return (f"Wrote {path}: {self.images} images, {self.captions} captions and {self.tags} "
                f"tag lists merged ({self.added} new entries), {self.cleaned} cleaned"
                + (f"; {self.without_text} image(s) have neither file and train with an "
                   "empty caption" if self.without_text else ""))


def _read_text(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise MetadataError(f"{path} is not UTF-8 text") from None


def merge_sidecars(image_dir: Path, metadata: dict[str, dict], caption_extension: str = ".caption",
                   tag_extension: str = ".txt", full_path: bool = False,
                   recursive: bool = False) -> MergeReport:
    """Put `<stem><caption_extension>` into "caption" and `<stem><tag_extension>` into "tags"
    for every image of the folder (existing entries are updated, others kept)."""
    if recursive and not full_path:
        raise MetadataError("recursive: needs full-path keys (images of several folders may "
                            "share a file name)")
    if caption_extension == tag_extension:
        raise MetadataError(f"tag_extension: must differ from the caption extension "
                            f"({caption_extension})")
    report = MergeReport()
    images = list_images(image_dir, recursive)
    if not images:
        raise MetadataError(f"train_data_dir: {image_dir} has no images "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
    for image in images:
        key = image_key(image, full_path)
        entry = metadata.get(key)
        if entry is None:
            entry = metadata[key] = {}
            report.added += 1
        report.images += 1
        caption = _read_text(image.with_name(image.stem + caption_extension))
        tags = _read_text(image.with_name(image.stem + tag_extension))
        if caption is not None:
            entry["caption"] = caption
            report.captions += 1
        if tags is not None:
            entry["tags"] = tags
            report.tags += 1
        if "caption" not in entry and "tags" not in entry:
            report.without_text += 1
    return report


# Several people in one image: tags of one kind (eye colours, hair colours, ...) cannot say who
# has which, so when more than one of a kind is present, that kind is dropped (kohya's rule).
CROWD = re.compile(r"(?<![a-z])\d*\+?(girls|boys)\b|multiple (girls|boys)")
HAIR_LENGTH = re.compile(r"^(long|short|medium) hair$")
HAIR_COLOUR = re.compile(r"^[\w-]+ hair$")
AMBIGUOUS_IN_CROWD = {
    "hair length": HAIR_LENGTH,
    "hair cut": re.compile(r"^(bob|hime) cut$"),
    "eye colour": re.compile(r"^[\w-]+ eyes$"),
    "sleeves": re.compile(r"^([\w-]+ sleeves|sleeveless)$"),
    "hairstyle": re.compile(r"^(ponytail|braid|ahoge|twintails|[\w-]+ bun|single hair bun|"
                            r"single side bun|two side up|two tails|[\w-]+ braid|sidelocks)$"),
}


def clean_tags(tags: str) -> str:
    found = []
    for tag in (t.strip() for t in tags.split(",")):
        if not tag or tag.lower().startswith("rating:") or tag.lower().startswith("rating "):
            continue
        if not EMOTICON.match(tag):
            tag = " ".join(tag.replace("_", " ").split())
        if tag not in found:
            found.append(tag)
    if any(CROWD.search(t) for t in found):
        found = _drop_ambiguous(found)
    return ", ".join(t for t in found
                     if not any(o != t and o.endswith(" " + t) for o in found))


def _drop_ambiguous(tags: list[str]) -> list[str]:
    """With several people: each kind of AMBIGUOUS_IN_CROWD, and hair colours (`X hair`, a
    remaining hair length not counted), kept only when a single tag of that kind is present."""
    for pattern in AMBIGUOUS_IN_CROWD.values():
        if sum(bool(pattern.match(t)) for t in tags) > 1:
            tags = [t for t in tags if not pattern.match(t)]
    colours = [t for t in tags if HAIR_COLOUR.match(t) and not HAIR_LENGTH.match(t)]
    if len(colours) > 1:
        tags = [t for t in tags if t not in colours]
    return tags


# kohya's caption replacements for BLIP captions of anime pictures, in order, each repeated
# until nothing changes; whole words only here (kohya's also hit 'ladybug', 'personal').
ANIME_CAPTION_REPLACEMENTS = [
    ("anime anime", "anime"), ("young", ""), ("anime girl", "girl"),
    ("cartoon female", "girl"), ("cartoon lady", "girl"), ("cartoon character", "girl"),
    ("cartoon woman", "girl"), ("cartoon women", "girls"), ("cartoon girl", "girl"),
    ("anime female", "girl"), ("anime lady", "girl"), ("anime character", "girl"),
    ("anime woman", "girl"), ("anime women", "girls"), ("lady", "girl"), ("female", "girl"),
    ("woman", "girl"), ("women", "girls"), ("people", "girls"), ("person", "girl"),
    ("a cartoon figure", "a figure"), ("a cartoon image", "an image"),
    ("a cartoon picture", "a picture"), ("an anime cartoon image", "an image"),
    ("a cartoon anime drawing", "a drawing"), ("a cartoon drawing", "a drawing"),
    ("girl girl", "girl"),
]
_REPLACEMENTS = [(re.compile(rf"\b{re.escape(old)}\b\s*" if not new else rf"\b{re.escape(old)}\b"),
                  new) for old, new in ANIME_CAPTION_REPLACEMENTS]


def clean_caption(caption: str, anime_rules: bool = False) -> str:
    if anime_rules:
        for pattern, new in _REPLACEMENTS:
            while True:
                changed = pattern.sub(new, caption)
                if changed == caption:
                    break
                caption = changed
    words = caption.split()
    kept = [w for i, w in enumerate(words) if i == 0 or w.lower() != words[i - 1].lower()]
    return " ".join(kept)


def clean_metadata(metadata: dict[str, dict], anime_rules: bool = False) -> int:
    """Clean every caption and tag list in place; returns how many entries changed."""
    changed = 0
    for entry in metadata.values():
        before = dict(entry)
        if isinstance(entry.get("tags"), str):
            entry["tags"] = clean_tags(entry["tags"])
        if isinstance(entry.get("caption"), str):
            entry["caption"] = clean_caption(entry["caption"], anime_rules)
        changed += entry != before
    return changed


def make_metadata(image_dir: Path, out_json: Path, caption_extension: str = ".caption",
                  tag_extension: str = ".txt", clean: bool = True, full_path: bool = False,
                  recursive: bool = False, anime_rules: bool = False) -> MergeReport:
    """Merge the folder's caption and tag files into `out_json` (updating it when it exists),
    optionally clean, and write it atomically."""
    image_dir, out_json = Path(image_dir), Path(out_json)
    if not image_dir.is_dir():
        raise MetadataError(f"train_data_dir: {image_dir} is not a folder")
    if out_json.suffix.lower() != ".json":
        raise MetadataError(f"in_json: {out_json.name} should end in .json")
    metadata = load_metadata(out_json) if out_json.exists() else {}
    report = merge_sidecars(image_dir, metadata, caption_extension, tag_extension, full_path,
                            recursive)
    if clean:
        report.cleaned = clean_metadata(metadata, anime_rules)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    save_metadata(out_json, metadata)
    return report


def make_for_config(cfg, paths) -> str:
    """The Train tab's 'Make metadata JSON' for a FineTuneConfig (not validated: only the folder,
    the JSON and the extensions matter): merge, clean when asked, write; a summary line."""
    from core.config import ConfigError
    from core.paths import PathError
    problems = [f"{name}: required to make the metadata JSON"
                for name in ("train_data_dir", "in_json") if not str(getattr(cfg, name)).strip()]
    for name in ("caption_extension", "tag_extension"):
        value = getattr(cfg, name)
        if not value.startswith(".") or len(value) < 2 or "/" in value or "\\" in value:
            problems.append(f"{name}: must be a file extension like '.txt', got {value[:40]!r}")
    if problems:
        raise ConfigError(problems)
    try:
        image_dir = paths.resolve(cfg.train_data_dir, "train_data_dir")
        out_json = paths.resolve(cfg.in_json, "in_json")
        report = make_metadata(image_dir, out_json, cfg.caption_extension, cfg.tag_extension,
                               clean=cfg.clean_captions, anime_rules=cfg.anime_caption_rules)
    except (PathError, MetadataError) as error:
        raise ConfigError(str(error)) from None
    return report.text(out_json)


def main(argv: list[str] | None = None) -> int:
    """python -m trainers.finetune_metadata IMAGE_DIR OUT_JSON [options]"""
    import argparse
    import sys
    parser = argparse.ArgumentParser(prog="python -m trainers.finetune_metadata",
                                     description="Merge caption and tag files into a kohya "
                                                 "fine-tuning metadata JSON (updating it).")
    parser.add_argument("image_dir")
    parser.add_argument("out_json")
    parser.add_argument("--caption-extension", default=".caption")
    parser.add_argument("--tag-extension", default=".txt")
    parser.add_argument("--no-clean", action="store_true", help="keep captions and tags as they are")
    parser.add_argument("--full-path", action="store_true", help="full paths as image keys")
    parser.add_argument("--recursive", action="store_true", help="also sub-folders (needs --full-path)")
    parser.add_argument("--anime-caption-rules", action="store_true",
                        help="kohya's caption replacements for anime pictures ('woman' -> 'girl', ...)")
    args = parser.parse_args(argv)
    try:
        report = make_metadata(Path(args.image_dir), Path(args.out_json), args.caption_extension,
                               args.tag_extension, not args.no_clean, args.full_path, args.recursive,
                               args.anime_caption_rules)
    except MetadataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.text(Path(args.out_json)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
