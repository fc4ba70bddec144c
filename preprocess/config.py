"""PreprocessConfig: every setting of the Preprocess images job, with defaults and help text.

Defaults and meanings follow AUTOMATIC1111's Preprocess images tab (v1.6) where it had the
option; the extra options (captioner models, WD14, alpha handling, size guard) say so in their
help."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.config import ConfigError, check_limits, option, path_problems
from core.images import WARNING_PIXELS

CAPTION_ACTIONS = ["ignore", "copy", "prepend", "append"]
OBJECTIVES = ["Maximize area", "Minimize error"]
ALPHA_MODES = ["white", "keep"]
FACE_DETECTORS = ["auto", "opencv", "none"]
DEVICES = ["auto", "cpu", "cuda"]
CAPTION_LAYOUTS = ["in order", "tags, caption", "caption, tags", "separate files"]
PIL_MAX_PIXELS = WARNING_PIXELS  # Pillow's own decompression-bomb warning limit


@dataclass
class PreprocessConfig:
    source: str = option("", "Folder with the source images. It is only read, never changed.",
                         label="Source directory", path="data")
    destination: str = option("", "Folder for the processed images and captions; must differ "
                              "from the source and not lie inside it.",
                              label="Destination directory", path="data")
    width: int = option(512, "Width of the output images, in pixels.", min=64, max=2048,
                        multiple_of=8)
    height: int = option(512, "Height of the output images, in pixels.", min=64, max=2048,
                         multiple_of=8)
    existing_caption: str = option(
        "ignore", "What to do with a caption file <name>.txt found beside a source image: "
        "ignore it, copy it, or put it before (prepend) or after (append) the generated caption.",
        label="Existing caption txt action", choices=CAPTION_ACTIONS)
    keep_original_size: bool = option(False, "Also save each image at its original size, "
                                      "without resizing or cropping.")
    flip: bool = option(False, "Also save a mirrored copy of every output image (with its own "
                        "caption).", label="Create flipped copies")
    flip_swap_left_right: bool = option(
        False, "In the copied part of a flipped copy's caption, swap the words left and right "
        "(not in A1111).", label="Swap left/right in flipped captions")
    split: bool = option(False, "Cut images much longer than the output shape into several "
                         "overlapping pieces.", label="Split oversized images")
    split_threshold: float = option(
        0.5, "Split when the image's aspect ratio, relative to the output's, is at most this "
        "(0..1; 0.5 = twice as long as the output shape).", label="Split image threshold",
        min=0.0, max=1.0)
    overlap_ratio: float = option(0.2, "Minimum overlap between neighbouring split pieces, as a "
                                  "fraction of a piece.", label="Split image overlap ratio",
                                  min=0.0, max=0.9)
    focal_crop: bool = option(False, "Crop non-square images around a focal point found from "
                              "faces, entropy and edges instead of the centre.",
                              label="Auto focal point crop")
    focal_face_weight: float = option(0.9, "Weight of detected faces in the focal point.",
                                      label="Focal point face weight", min=0.0, max=1.0)
    focal_entropy_weight: float = option(0.15, "Weight of the most detailed (highest-entropy) "
                                         "region in the focal point.",
                                         label="Focal point entropy weight", min=0.0, max=1.0)
    focal_edges_weight: float = option(0.5, "Weight of corners/edges in the focal point.",
                                       label="Focal point edges weight", min=0.0, max=1.0)
    focal_debug: bool = option(False, "Also write an annotated image showing the points and "
                               "the crop, into <destination>/debug (kept out of the dataset).",
                               label="Create debug image")
    face_detector: str = option(
        "auto", "Face detector for the focal crop: auto (OpenCV if installed, else none), "
        "opencv (required), or none.", choices=FACE_DETECTORS)
    multicrop: bool = option(False, "Center-crop each image to an automatically chosen width "
                             "and height (steps of 64 from the lower bound).",
                             label="Auto-sized crop")
    multicrop_min_dim: int = option(384, "Smallest width or height to consider.",
                                    label="Dimension lower bound", min=64, max=2048,
                                    multiple_of=8)
    multicrop_max_dim: int = option(768, "Largest width or height to consider.",
                                    label="Dimension upper bound", min=64, max=2048,
                                    multiple_of=8)
    multicrop_min_area: int = option(64 * 64, "Smallest area (width x height) to consider.",
                                     label="Area lower bound", min=64 * 64, max=2048 * 2048)
    multicrop_max_area: int = option(640 * 640, "Largest area (width x height) to consider.",
                                     label="Area upper bound", min=64 * 64, max=2048 * 2048)
    multicrop_objective: str = option(
        "Maximize area", "Pick the largest size within the error threshold, or the size whose "
        "aspect ratio is closest to the image's.", label="Resizing objective", choices=OBJECTIVES)
    multicrop_threshold: float = option(
        0.1, "Largest allowed aspect-ratio error (1 - smaller/larger of the two ratios).",
        label="Error threshold", min=0.0, max=1.0)
    captioners: list[str] = option(
        [], "Captioners to run on every output image, in order, joined with ', ': "
        "blip, deepbooru, wd14 (the WD v2 / v3 taggers), vlm (Florence-2, Qwen-VL, JoyCaption).",
        label="Captioners")
    caption_layout: str = option(
        "in order", "How the captioners' outputs are written: joined in the order listed, tags "
        "(deepbooru, wd14) before or after the natural captions (blip, vlm) in <name>.txt, or "
        "separate files: tags in <name>.txt and natural captions in <name>.caption (kohya's "
        "extensions).", label="Caption files", choices=CAPTION_LAYOUTS)
    skip_existing: bool = option(
        False, "Resume: leave alone every output image that is already in the destination with "
        "its caption file(s) and caption only the missing ones (run with the same settings). "
        "Off: outputs with the same name are replaced and the summary counts them.",
        label="Skip images already captioned")
    blip_model: str = option(
        "BLIP", "BLIP captioning model: a folder under models/, a path, or a hub id when online "
        "(falls back to Salesforce/blip-image-captioning-large when online).", path="models")
    blip_num_beams: int = option(1, "BLIP: number of beams (1 = greedy).", min=1, max=16)
    blip_min_length: int = option(24, "BLIP: minimum caption length in tokens.", min=1, max=128)
    blip_max_length: int = option(48, "BLIP: maximum caption length in tokens.", min=1, max=256)
    deepbooru_model: str = option(
        "deepbooru", "DeepDanbooru weights: a folder under models/ holding "
        "model-resnet_custom_v3.pt, or a path to the .pt file.", path="models")
    deepbooru_threshold: float = option(0.5, "DeepDanbooru: keep tags scoring at least this.",
                                        label="deepbooru: score threshold", min=0.0, max=1.0)
    deepbooru_sort_alpha: bool = option(True, "DeepDanbooru: sort tags alphabetically "
                                        "(otherwise by score).")
    deepbooru_use_spaces: bool = option(True, "DeepDanbooru: spaces instead of underscores.")
    deepbooru_escape: bool = option(True, "DeepDanbooru: escape brackets with \\ so they are "
                                    "literal brackets, not emphasis.")
    deepbooru_filter_tags: str = option("", "DeepDanbooru: comma-separated tags to leave out.")
    wd14_model: str = option(
        "wd-eva02-large-tagger-v3", "WD tagger (SmilingWolf's v2 or v3 ONNX models, e.g. "
        "wd-eva02-large-tagger-v3, wd-vit-large-tagger-v3, wd-swinv2-tagger-v3): a folder name "
        "under models/wd14 holding model.onnx and selected_tags.csv, or a path.",
        label="WD tagger model", path="models")
    wd14_general_threshold: float = option(0.35, "WD tagger: threshold for general tags.",
                                           min=0.0, max=1.0)
    wd14_general_mcut: bool = option(
        False, "WD tagger: choose the general threshold per image by MCut (the middle of the "
        "largest gap between the sorted probabilities) instead of the number above.",
        label="wd14: general MCut")
    wd14_character_threshold: float = option(0.85, "WD tagger: threshold for character tags.",
                                             min=0.0, max=1.0)
    wd14_character_mcut: bool = option(
        False, "WD tagger: choose the character threshold per image by MCut (at least 0.15) "
        "instead of the number above.", label="wd14: character MCut")
    wd14_character_first: bool = option(True, "WD tagger: character tags before general ones.",
                                        label="wd14: character tags first")
    wd14_undesired_tags: str = option("", "WD tagger: comma-separated tags to leave out "
                                      "(spaces or underscores).")
    wd14_sort_alpha: bool = option(False, "WD tagger: sort tags alphabetically (otherwise by "
                                   "score).")
    wd14_use_spaces: bool = option(True, "WD tagger: spaces instead of underscores (emoticons "
                                   "such as ^_^ keep theirs).")
    wd14_escape: bool = option(True, "WD tagger: escape brackets with \\.")
    wd14_rating: bool = option(False, "WD tagger: start with the most likely rating tag.")
    vlm_model: str = option(
        "Florence-2-large-ft", "Vision-language captioner: a model folder under models/vlm (or "
        "models/, or a path) holding the repository's files: Florence-2 in transformers' layout "
        "(florence-community/Florence-2-*), Qwen2.5-VL, Qwen3-VL or a LLaVA model such as "
        "JoyCaption. Never downloaded.", label="VLM model", path="models")
    vlm_prompt: str = option(
        "", "VLM: the instruction. Empty: the model's default (Florence-2 <DETAILED_CAPTION>; "
        "Qwen-VL 'Describe this image in detail.'; LLaVA / JoyCaption 'Write a descriptive "
        "caption for this image in a formal tone.'). Florence-2 takes <CAPTION>, "
        "<DETAILED_CAPTION> or <MORE_DETAILED_CAPTION>.", label="VLM prompt")
    vlm_max_new_tokens: int = option(256, "VLM: longest caption, in tokens.",
                                     label="VLM max new tokens", min=1, max=4096)
    vlm_num_beams: int = option(1, "VLM: beams of the beam search (1 = greedy; Florence-2's "
                                "model card uses 3). Either way the caption is deterministic.",
                                label="VLM beams", min=1, max=8)
    vlm_batch_size: int = option(1, "VLM: images captioned together (more is faster on a GPU "
                                 "and uses more memory).", label="VLM batch size", min=1, max=64)
    alpha: str = option("white", "Transparent images: composite on white, or keep the alpha "
                        "channel in the output PNG (e.g. as a loss-weight mask).",
                        label="Alpha handling", choices=ALPHA_MODES)
    max_pixels: int = option(PIL_MAX_PIXELS, "Refuse images with more pixels than this "
                             "(decompression-bomb guard).", min=1)
    device: str = option("auto", "Device for the captioners.", choices=DEVICES)

    def validate(self, paths=None) -> tuple[Path, Path]:
        """Check every field; return the resolved (source, destination) folders.

        Raises ConfigError naming each bad field. `paths` (core.paths.Paths) resolves typed
        paths relative to the data folder and confines them when the app is shared."""
        from preprocess.captioners import is_tagger, names as captioner_names

        problems = check_limits(self)
        src = dst = None
        if not self.source.strip():
            problems.append("source: no source folder given")
        else:
            src = _resolve(self.source, "source", paths, problems)
            if src is not None and not src.is_dir():
                what = "is not a folder" if src.exists() else "does not exist"
                problems.append(f"source: {self.source!r} {what}")
        if not self.destination.strip():
            problems.append("destination: no destination folder given")
        else:
            dst = _resolve(self.destination, "destination", paths, problems)
            if dst is not None and dst.exists() and not dst.is_dir():
                problems.append(f"destination: {self.destination!r} exists and is not a folder")
        if src is not None and dst is not None:
            real_src, real_dst = src.resolve(), dst.resolve()
            if real_src == real_dst:
                problems.append("destination: must differ from the source folder")
            elif real_src in real_dst.parents:
                problems.append("destination: must not be inside the source folder")
        # width/height range and multiple of 8 come from the field metadata (check_limits)
        if self.multicrop_min_dim > self.multicrop_max_dim:
            problems.append("multicrop_max_dim: must be at least multicrop_min_dim "
                            f"({self.multicrop_min_dim}), got {self.multicrop_max_dim}")
        if self.multicrop_min_area > self.multicrop_max_area:
            problems.append("multicrop_max_area: must be at least multicrop_min_area "
                            f"({self.multicrop_min_area}), got {self.multicrop_max_area}")
        if self.blip_min_length > self.blip_max_length:
            problems.append("blip_max_length: must be at least blip_min_length "
                            f"({self.blip_min_length}), got {self.blip_max_length}")
        if self.focal_crop and self.face_detector == "opencv":
            import importlib.util
            if importlib.util.find_spec("cv2") is None:
                problems.append("face_detector: opencv is not installed "
                                "(pip install opencv-python-headless); choose auto or none")
        known = captioner_names()
        for name in self.captioners:
            if name not in known:
                problems.append(f"captioners: unknown captioner {name!r} "
                                f"(known: {', '.join(known)})")
        if len(set(self.captioners)) != len(self.captioners):
            problems.append("captioners: a captioner is listed twice")
        if self.caption_layout == "separate files" and self.captioners and all(
                is_tagger(name) for name in self.captioners):
            problems.append("caption_layout: separate files puts natural captions (blip or vlm) "
                            "in <name>.caption; choose one, or another layout")
        if paths is not None:  # captioner model paths (source and destination are above)
            problems += path_problems(self, paths)
        if problems:
            raise ConfigError(list(dict.fromkeys(problems)))
        return src, dst


def _resolve(typed: str, field: str, paths, problems: list[str]) -> Path | None:
    if paths is not None:
        from core.paths import PathError
        try:
            return paths.resolve(typed, field)
        except PathError as error:
            problems.append(str(error))
            return None
    if "\x00" in typed:
        problems.append(f"{field}: the path contains a NUL character")
        return None
    return Path(typed.strip()).expanduser().absolute()
