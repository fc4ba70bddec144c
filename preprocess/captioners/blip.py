"""BLIP captions through transformers' BlipForConditionalGeneration.

The image is resized (bicubic) to the vision model's image size and normalised with the mean/std
of the folder's preprocessor_config.json (OpenAI CLIP's by default) here, without transformers'
image processor (which wants torchvision). As A1111 does with the original BLIP, the decoder is
started with the prompt "a picture of", and the prompt is cut from the caption.

Model: a folder saved with save_pretrained (config.json, weights, tokenizer files) under
models/BLIP, or a hub id such as Salesforce/blip-image-captioning-large when online."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from core.unpickle_errors import refused_message, weights_only_refusal
from preprocess.captioners import CaptionerError, cached, find_model

HUB_DEFAULT = "Salesforce/blip-image-captioning-large"
PROMPT = "a picture of"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _is_model_dir(location: Path) -> bool:
    return location.is_dir() and (location / "config.json").is_file()


def _normalisation(location) -> tuple[tuple, tuple]:
    """Mean and std from preprocessor_config.json when the model is a local folder."""
    if isinstance(location, Path) and (location / "preprocessor_config.json").is_file():
        try:
            data = json.loads((location / "preprocessor_config.json").read_text(encoding="utf-8"))
            return tuple(data.get("image_mean", CLIP_MEAN)), tuple(data.get("image_std", CLIP_STD))
        except (OSError, ValueError):
            pass
    return CLIP_MEAN, CLIP_STD


def _pickled_weights(location) -> str:
    """The name of the folder's one pickled weights file, for a refusal's message."""
    found = sorted(p.name for p in Path(location).glob("*.bin")) if Path(location).is_dir() else []
    return found[0] if len(found) == 1 else "a weights file"


def load_model(location, device: str = "cpu"):
    try:
        from transformers import AutoTokenizer, BlipForConditionalGeneration
        model = BlipForConditionalGeneration.from_pretrained(str(location))
        tokenizer = AutoTokenizer.from_pretrained(str(location))
    except Exception as error:
        if hasattr(location, "not_found"):
            raise location.not_found("blip_model", error) from None
        refusal = weights_only_refusal(error)  # say why, never torch's advice to load unsafely
        reason = refused_message(_pickled_weights(location), str(refusal)) if refusal else error
        raise CaptionerError(f"blip_model: cannot load BLIP from {location}: {reason}") from None
    mean, std = _normalisation(location)
    return model.eval().to(device), tokenizer, mean, std


class BlipCaptioner:
    name = "blip"

    def __init__(self, model, tokenizer, mean=CLIP_MEAN, std=CLIP_STD, device: str = "cpu",
                 num_beams: int = 1, min_length: int = 24, max_length: int = 48,
                 prompt: str = PROMPT):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.size = int(model.config.vision_config.image_size)
        self.num_beams, self.min_length, self.max_length = num_beams, min_length, max_length
        self.prompt = prompt

    def pixels(self, image: Image.Image):
        import torch
        picture = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BICUBIC)
        array = (np.asarray(picture, dtype=np.float32) / 255.0 - self.mean) / self.std
        tensor = torch.from_numpy(array.transpose(2, 0, 1).copy())[None]
        return tensor.to(self.device, dtype=next(self.model.parameters()).dtype)

    def caption(self, image: Image.Image) -> str:
        import torch
        kwargs = {}
        if self.prompt:
            kwargs["input_ids"] = self.tokenizer(self.prompt, return_tensors="pt").input_ids.to(
                self.device)
        with torch.inference_mode():
            out = self.model.generate(pixel_values=self.pixels(image), num_beams=self.num_beams,
                                      min_length=self.min_length, max_length=self.max_length,
                                      do_sample=False, **kwargs)
        text = self.tokenizer.decode(out[0], skip_special_tokens=True).strip()
        return strip_prompt(text, self.prompt)


def strip_prompt(text: str, prompt: str) -> str:
    text = " ".join(text.split())
    if prompt:
        head = " ".join(prompt.lower().split())
        if text.lower().startswith(head):
            text = text[len(head):]
    return text.strip(" ,.")


def create(cfg, paths, device: str) -> BlipCaptioner:
    location = find_model(paths, cfg.blip_model, field="blip_model", subdir="",
                          is_model=_is_model_dir,
                          expects="a folder saved with save_pretrained (config.json, weights, "
                                  "tokenizer)", hub_default=HUB_DEFAULT)
    key = ("blip", str(location.resolve()) if isinstance(location, Path) else location, device)
    model, tokenizer, mean, std = cached(key, lambda: load_model(location, device))
    return BlipCaptioner(model, tokenizer, mean, std, device, num_beams=cfg.blip_num_beams,
                         min_length=cfg.blip_min_length, max_length=cfg.blip_max_length)
