"""Natural-language captions from vision-language models through transformers, from a local
model folder (never downloaded). The folder's config.json `model_type` picks the family:

    florence2    Florence-2 in transformers' own layout (florence-community/Florence-2-*): a task
                 token (<CAPTION>, <DETAILED_CAPTION>, <MORE_DETAILED_CAPTION>) as the prompt
    qwen2_5_vl   Qwen2.5-VL-*-Instruct   chat template: one user turn with the image and the prompt
    qwen3_vl     Qwen3-VL-*-Instruct / -Thinking (the thinking block is dropped from the caption)
    llava        LLaVA-family models such as JoyCaption (llama-joycaption-*-hf-llava): its chat
                 template with a system turn when the template takes plain-text turns

Florence-2 and LLaVA go through the folder's own processor. For Qwen-VL the processor class also
wants a video processor, which needs torchvision; so the prompt is built here as Qwen's processor
does: the chat template's image placeholder is repeated once per merged patch of the image
(grid t*h*w / merge_size^2) and those positions are marked as image tokens (mm_token_type_ids) for
the model's 3-D rotary positions.

Decoding is greedy (do_sample=False; vlm_num_beams > 1: beam search) and the prompt is cut from
the output; on CUDA the model runs in bf16 (fp16 where bf16 is missing), on the CPU in fp32.
Images are captioned `batch_size` at a time (left padding) and a stop request ends the current
generation. The model is loaded for each run and let go at its end (close), not kept in the
captioner cache."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from preprocess.captioners import CaptionerError, Stopped, find_model

FIELD = "vlm_model"
FLORENCE_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
SYSTEM_PROMPT = "You are a helpful image captioner."


@dataclass(frozen=True)
class Family:
    model_type: str
    label: str
    model_class: str          # a transformers class name
    default_prompt: str
    chat: bool                # a chat template turn (else a Florence-2 task token)
    own_processor: bool       # the folder's processor builds the inputs (else built here)


FAMILIES = {f.model_type: f for f in (
    Family("florence2", "Florence-2", "Florence2ForConditionalGeneration", "<DETAILED_CAPTION>",
           chat=False, own_processor=True),
    Family("qwen2_5_vl", "Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration",
           "Describe this image in detail.", chat=True, own_processor=False),
    Family("qwen3_vl", "Qwen3-VL", "Qwen3VLForConditionalGeneration",
           "Describe this image in detail.", chat=True, own_processor=False),
    Family("llava", "LLaVA / JoyCaption", "LlavaForConditionalGeneration",
           "Write a descriptive caption for this image in a formal tone.", chat=True,
           own_processor=True),
)}


def supported() -> str:
    return ", ".join(f"{f.model_type} ({f.label})" for f in FAMILIES.values())


def _is_model_dir(location: Path) -> bool:
    return location.is_dir() and (location / "config.json").is_file()


def read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CaptionerError(f"{FIELD}: cannot read {file}: {error}") from None
    if not isinstance(data, dict):
        raise CaptionerError(f"{FIELD}: {file} is not a JSON object")
    return data


def family_of(folder: Path) -> Family:
    config = read_json(folder / "config.json")
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        found = f"model_type {model_type!r}" if model_type else "no model_type"
        architectures = config.get("architectures")
        if architectures:
            found += f" ({', '.join(map(str, architectures))})"
        raise CaptionerError(f"{FIELD}: {folder} is not a supported vision-language model: its "
                             f"config.json has {found}; supported: {supported()}")
    if family.model_type == "florence2" and "auto_map" in config:
        raise CaptionerError(f"{FIELD}: {folder} is Florence-2 in Microsoft's remote-code layout "
                             "(config.json has auto_map), which is never run; use the "
                             "transformers conversion of the same model, e.g. "
                             "florence-community/Florence-2-large-ft")
    return family


def _has_any(folder: Path, *patterns: str) -> bool:
    return any(next(folder.glob(p), None) is not None for p in patterns)


def processor_config(folder: Path) -> dict:
    """The folder's processor_config.json, or {} when there is none."""
    file = folder / "processor_config.json"
    return read_json(file) if file.is_file() else {}


def chat_template(folder: Path, tokenizer=None) -> str | None:
    """The processor's chat template (chat_template.jinja or chat_template.json, as the Qwen-VL
    and LLaVA repos ship it), else the tokenizer's."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        template = read_json(folder / "chat_template.json").get("chat_template")
        if isinstance(template, str):
            return template
    template = processor_config(folder).get("chat_template")
    if isinstance(template, str):
        return template
    if tokenizer is not None and isinstance(getattr(tokenizer, "chat_template", None), str):
        return tokenizer.chat_template
    if (folder / "tokenizer_config.json").is_file():
        template = read_json(folder / "tokenizer_config.json").get("chat_template")
        if isinstance(template, str):
            return template
    return None


def check_folder(folder: Path, family: Family) -> None:
    """Every file the family needs, named when missing, before anything is loaded."""
    missing = []
    if not _has_any(folder, "*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin"):
        missing.append("the weights (*.safetensors)")
    if not _has_any(folder, "tokenizer.json", "vocab.json", "tokenizer.model"):
        missing.append("the tokenizer (tokenizer.json)")
    has_image_processor = (folder / "preprocessor_config.json").is_file() or \
        "image_processor" in processor_config(folder)
    if not has_image_processor:
        missing.append("the image processor (preprocessor_config.json)")
    if family.chat and has_image_processor and not missing and chat_template(folder) is None:
        missing.append("a chat template (chat_template.json, chat_template.jinja or "
                       "tokenizer_config.json's chat_template)")
    if missing:
        raise CaptionerError(f"{FIELD}: {folder} ({family.label}) lacks {'; '.join(missing)}. "
                             "Download every file of the model's repository into it")


def check_prompt(family: Family, prompt: str) -> str:
    """The prompt to use: the typed one, or the family's default when empty."""
    text = prompt.strip() or family.default_prompt
    if not family.chat and text not in FLORENCE_TASKS:
        raise CaptionerError(f"vlm_prompt: Florence-2 takes one of the caption tasks "
                             f"{', '.join(FLORENCE_TASKS)} as its prompt, not {text!r}")
    return text


def find_folder(paths, typed: str) -> Path:
    location = find_model(paths, typed, field=FIELD, subdir="vlm", is_model=_is_model_dir,
                          expects="a model folder with config.json (Florence-2, Qwen2.5-VL, "
                                  "Qwen3-VL or LLaVA / JoyCaption), e.g. under models/vlm/")
    if not isinstance(location, Path):  # a hub id typed while online: still local folders only
        where = paths.models / "vlm" if paths is not None else Path("models/vlm")
        raise CaptionerError(f"{FIELD}: {typed.strip()!r} is not a local folder; download the "
                             f"model into {where / typed.strip().split('/')[-1]}")
    return location


def torch_dtype(device: str):
    import torch
    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_model(folder: Path, family: Family, device: str):
    """(model, processor or (tokenizer, image processor))."""
    try:
        import transformers
        model_class = getattr(transformers, family.model_class)
        model = model_class.from_pretrained(str(folder), local_files_only=True,
                                            dtype=torch_dtype(device))
        if family.own_processor:
            processor = transformers.AutoProcessor.from_pretrained(str(folder),
                                                                   local_files_only=True)
        else:
            processor = (transformers.AutoTokenizer.from_pretrained(str(folder),
                                                                    local_files_only=True),
                         transformers.AutoImageProcessor.from_pretrained(str(folder),
                                                                         local_files_only=True))
    except CaptionerError:
        raise
    except Exception as error:
        raise CaptionerError(f"{FIELD}: cannot load {family.label} from {folder}: "
                             f"{type(error).__name__}: {error}") from None
    return model.eval().to(device), processor


_THINKING = re.compile(r"^.*?</think>", re.DOTALL)
_ROLE = re.compile(r"^\s*assistant\s*(:|\n)\s*", re.IGNORECASE)


def clean(text: str) -> str:
    """One line: a thinking block, a leading role name and special-token leftovers removed,
    whitespace collapsed."""
    if "</think>" in text:
        text = _THINKING.sub("", text, count=1)
    text = _ROLE.sub("", text, count=1)
    for token in ("<s>", "</s>", "<pad>"):
        text = text.replace(token, " ")
    return " ".join(text.split())


def release(device: str) -> None:
    """Hand the memory of models no longer referenced back (to the GPU for other processes)."""
    import gc

    import torch
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


class VlmCaptioner:
    name = "vlm"

    def __init__(self, model, processor, family: Family, prompt: str, device: str = "cpu",
                 max_new_tokens: int = 256, batch_size: int = 1, template: str | None = None,
                 num_beams: int = 1):
        self.model, self.processor, self.family, self.device = model, processor, family, device
        self.template = template  # Qwen-VL: the folder's chat template
        self.prompt, self.max_new_tokens, self.batch_size = prompt, max_new_tokens, batch_size
        self.num_beams = num_beams
        self.should_stop: Callable[[], bool] = lambda: False
        self.text = self.prompt_text()

    # -- the prompt --
    def prompt_text(self) -> str:
        if not self.family.chat:
            return self.prompt
        if self.family.own_processor:
            return self.llava_text()
        tokenizer, _ = self.processor
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": self.prompt}]}]
        text = tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                             add_generation_prompt=True)
        if text.count(self.image_token()) != 1:
            raise CaptionerError(f"{FIELD}: the chat template of {self.family.label} does not "
                                 f"place one {self.image_token()} for the image")
        return text

    def llava_text(self) -> str:
        """JoyCaption's template takes plain-text turns and inserts the image token itself
        (with a system turn); llava-hf templates take typed content with an image entry."""
        processor = self.processor
        token = processor.image_token
        plain = [{"role": "system", "content": SYSTEM_PROMPT},
                 {"role": "user", "content": self.prompt}]
        typed = [{"role": "user", "content": [{"type": "image"},
                                              {"type": "text", "text": self.prompt}]}]
        for messages in (plain, typed):
            try:
                text = processor.apply_chat_template(messages, tokenize=False,
                                                     add_generation_prompt=True)
            except Exception:  # a template that refuses this message form: try the other
                continue
            if text.count(token) == 1:
                return text
        raise CaptionerError(f"{FIELD}: the chat template of this LLaVA model does not place one "
                             f"{token} for the image")

    def image_token(self) -> str:
        tokenizer, _ = self.processor
        return getattr(tokenizer, "image_token", None) or "<|image_pad|>"

    # -- inputs --
    def inputs(self, images: list) -> dict:
        """The model inputs for a batch of RGB images, on the CPU."""
        if self.family.own_processor:
            self.processor.tokenizer.padding_side = "left"
            return dict(self.processor(text=[self.text] * len(images), images=images,
                                       return_tensors="pt", padding=True))
        tokenizer, image_processor = self.processor
        tokenizer.padding_side = "left"
        vision = image_processor(images=images, return_tensors="pt")
        merge = int(getattr(image_processor, "merge_size", 2)) ** 2
        token = self.image_token()
        texts = [self.text.replace(token, token * int(grid.prod() // merge))
                 for grid in vision["image_grid_thw"]]
        encoded = tokenizer(texts, return_tensors="pt", padding=True)
        token_id = tokenizer.convert_tokens_to_ids(token)
        return {**encoded, **vision, "mm_token_type_ids": (encoded["input_ids"] == token_id).int()}

    def generate_kwargs(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "do_sample": False,
                "num_beams": self.num_beams}

    def tokenizer(self):
        return self.processor.tokenizer if self.family.own_processor else self.processor[0]

    # -- captions --
    def caption_batch(self, images: list) -> list[str]:
        out = []
        for start in range(0, len(images), self.batch_size):
            out += self._generate(images[start:start + self.batch_size])
        return out

    def caption(self, image) -> str:
        return self.caption_batch([image])[0]

    def close(self) -> None:
        """Let the model go (the pipeline calls this at the end of a run)."""
        self.model = None
        release(self.device)

    def _generate(self, images: list) -> list[str]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        should_stop = self.should_stop

        class OnRequest(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                stop = should_stop()
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool,
                                  device=input_ids.device)

        dtype = next(self.model.parameters()).dtype
        batch = {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
                 if hasattr(v, "to") else v for k, v in self.inputs(images).items()}
        with torch.inference_mode():
            out = self.model.generate(**batch, **self.generate_kwargs(),
                                      stopping_criteria=StoppingCriteriaList([OnRequest()]))
        if should_stop():
            raise Stopped()
        if not self.model.config.is_encoder_decoder:
            out = out[:, batch["input_ids"].shape[1]:]
        texts = self.tokenizer().batch_decode(out, skip_special_tokens=True,
                                              clean_up_tokenization_spaces=False)
        return [clean(t) for t in texts]


def create(cfg, paths, device: str) -> VlmCaptioner:
    folder = find_folder(paths, cfg.vlm_model)
    family = family_of(folder)
    prompt = check_prompt(family, cfg.vlm_prompt)
    check_folder(folder, family)
    # not kept in the captioner cache: a multi-GB model leaves the GPU when the run ends
    model, processor = load_model(folder, family, device)
    template = None if family.own_processor else chat_template(folder, processor[0])
    try:
        return VlmCaptioner(model, processor, family, prompt, device,
                            max_new_tokens=cfg.vlm_max_new_tokens,
                            batch_size=cfg.vlm_batch_size, template=template,
                            num_beams=cfg.vlm_num_beams)
    except CaptionerError:  # a chat template without the image: the model goes at once
        del model
        release(device)
        raise
