"""VLM captioners (Florence-2, Qwen2.5-VL, Qwen3-VL, LLaVA / JoyCaption) on tiny random models in
the real folder layouts, through the preprocess pipeline: each caption equals what the model's
own generate() decodes from inputs built independently here, combined tags + caption, resume,
interrupt, and refusals by name before any image is written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from core import events as ev
from core.config import ConfigError
from core.paths import Paths
from preprocess import PreprocessConfig, captioners, run
from preprocess.captioners import CaptionerError
from preprocess.testing import build_tiny_wd14
from preprocess.testing_vlm import MODEL_TYPES, QWEN_TEMPLATE, build_tiny_vlm
from tests.conftest import photo

TOKENS = 6
JOY_SYSTEM = "You are a helpful image captioner."


class Ctx:
    def __init__(self, data_dir: Path, stop_after_checks: int | None = None):
        self.paths = Paths(data_dir)
        self.events: list = []
        self.checks = 0
        self.stop_after_checks = stop_after_checks

    def emit(self, event):
        self.events.append(event)

    def should_stop(self):
        self.checks += 1
        return self.stop_after_checks is not None and self.checks > self.stop_after_checks

    def of(self, kind):
        return [e for e in self.events if isinstance(e, kind)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-data")
    for model_type in MODEL_TYPES:
        build_tiny_vlm(root / "models" / "vlm" / model_type, model_type)
    build_tiny_wd14(root / "models" / "wd14" / "tiny", [("general", "9", (0, 0, 0), 2.0),
                                                       ("solo", "0", (0, 0, 0), 1.0)])
    raw = root / "raw"
    raw.mkdir()
    for i, size in enumerate((96, 120, 80)):
        photo(i, size).save(raw / f"img{i}.png")
    return root


@pytest.fixture(autouse=True)
def fresh_models():
    captioners.unload_all()
    yield
    captioners.unload_all()


def config(destination: str, model_type: str, **changes) -> PreprocessConfig:
    settings = dict(source="raw", destination=destination, width=64, height=64,
                    captioners=["vlm"], vlm_model=model_type, vlm_max_new_tokens=TOKENS,
                    device="cpu")
    return PreprocessConfig(**{**settings, **changes})


# --- the reference: the model's own generate() on inputs built here ------------------------------

def reference_caption(folder: Path, model_type: str, image: Image.Image, beams: int = 1) -> str:
    import transformers
    from preprocess.captioners.vlm import FAMILIES

    family = FAMILIES[model_type]
    model = getattr(transformers, family.model_class).from_pretrained(folder).eval()
    if model_type in ("florence2", "llava"):
        processor = transformers.AutoProcessor.from_pretrained(folder)
        tokenizer = processor.tokenizer
        if model_type == "florence2":
            inputs = processor(text="<DETAILED_CAPTION>", images=image, return_tensors="pt")
        else:
            convo = [{"role": "system", "content": JOY_SYSTEM},
                     {"role": "user", "content": family.default_prompt}]
            text = processor.apply_chat_template(convo, tokenize=False,
                                                 add_generation_prompt=True)
            inputs = processor(text=[text], images=[image], return_tensors="pt")
    else:  # Qwen's processor needs torchvision: the same inputs from its parts
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        vision = transformers.AutoImageProcessor.from_pretrained(folder)(images=[image],
                                                                         return_tensors="pt")
        count = int(vision["image_grid_thw"][0].prod()) // 4
        text = (f"<|im_start|>user\n<|vision_start|>{'<|image_pad|>' * count}<|vision_end|>"
                f"{family.default_prompt}<|im_end|>\n<|im_start|>assistant\n")
        ids = tokenizer(text, return_tensors="pt")
        pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        inputs = {**ids, **vision, "mm_token_type_ids": (ids["input_ids"] == pad).int()}
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False, num_beams=beams)
    if model_type != "florence2":
        out = out[:, inputs["input_ids"].shape[1]:]
    return " ".join(tokenizer.decode(out[0], skip_special_tokens=True).split())


def written(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_each_family_captions_as_its_generate_decodes(data_dir, model_type):
    dest = f"out-{model_type}"
    summary = run(config(dest, model_type, vlm_batch_size=2), Ctx(data_dir))
    assert summary.processed == 3 and not summary.stopped and summary.captions == 3
    images = written(data_dir / dest)
    assert len(images) == 3
    folder = data_dir / "models" / "vlm" / model_type
    for image in images:
        caption = image.with_suffix(".txt").read_text(encoding="utf-8")
        assert caption and caption == caption.strip() and "\n" not in caption
        expected = reference_caption(folder, model_type, Image.open(image).convert("RGB"))
        assert caption == expected, image.name


def test_beam_search_captions_as_generate_with_beams(data_dir):
    run(config("out-beams", "qwen3_vl", vlm_num_beams=3), Ctx(data_dir))
    folder = data_dir / "models" / "vlm" / "qwen3_vl"
    greedy = 0
    for image in written(data_dir / "out-beams"):
        picture = Image.open(image).convert("RGB")
        caption = image.with_suffix(".txt").read_text()
        assert caption == reference_caption(folder, "qwen3_vl", picture, beams=3)
        greedy += caption == reference_caption(folder, "qwen3_vl", picture)
    assert greedy < 3  # the beams made a difference


def test_qwen_template_and_files_are_the_real_layout(data_dir):
    folder = data_dir / "models" / "vlm" / "qwen2_5_vl"
    assert json.loads((folder / "chat_template.json").read_text())["chat_template"] == \
        QWEN_TEMPLATE
    for name in ("config.json", "model.safetensors", "preprocessor_config.json",
                 "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen2_5_vl"


def test_combined_tags_and_caption_one_file_or_two(data_dir):
    run(config("out-caption", "llava"), Ctx(data_dir))
    captions = {p.name: p.with_suffix(".txt").read_text() for p in written(data_dir /
                                                                           "out-caption")}
    captioners.unload_all()
    run(config("out-tags-first", "llava", captioners=["vlm", "wd14"], wd14_model="tiny",
               caption_layout="tags, caption"), Ctx(data_dir))
    for name, caption in captions.items():
        path = data_dir / "out-tags-first" / name
        assert path.with_suffix(".txt").read_text() == f"solo, {caption}"
    run(config("out-separate", "llava", captioners=["wd14", "vlm"], wd14_model="tiny",
               caption_layout="separate files"), Ctx(data_dir))
    for name, caption in captions.items():
        path = data_dir / "out-separate" / name
        assert path.with_suffix(".txt").read_text() == "solo"
        assert path.with_suffix(".caption").read_text() == caption
    # that folder as a source: its caption files are not sources (nor reported as skipped)
    again = run(PreprocessConfig(source="out-separate", destination="out-again", width=64,
                                 height=64), Ctx(data_dir))
    assert again.total == 3 and not again.skipped


def test_interrupt_then_resume_keeps_what_is_on_disk(data_dir):
    dest = data_dir / "out-resume"
    # the loop checks once per file and the generation once per token: stop in the 2nd file
    ctx = Ctx(data_dir, stop_after_checks=1 + (TOKENS + 1) + 2)
    first = run(config("out-resume", "qwen3_vl"), ctx)
    assert first.stopped and first.processed == 1
    assert [p.name for p in written(dest)] == ["00000-0-img0.png"]
    kept = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in dest.iterdir()}
    assert len(kept) == 2  # the image and its caption; nothing of the interrupted batch

    ctx = Ctx(data_dir)
    second = run(config("out-resume", "qwen3_vl", skip_existing=True), ctx)
    assert second.kept == 1 and second.processed == 3 and second.replaced == 0
    for path, (data, mtime) in kept.items():
        assert (path.read_bytes(), path.stat().st_mtime_ns) == (data, mtime), path.name
    assert len(written(dest)) == 3 and all(p.with_suffix(".txt").is_file()
                                           for p in written(dest))
    assert [e.path for e in ctx.of(ev.Preview)] == [str(p) for p in written(dest)[1:]]
    assert [e.text for e in ctx.of(ev.Status) if e.text.startswith("Captioning")] == [
        "Captioning 1 image(s): 00001-0-img1.png", "Captioning 1 image(s): 00002-0-img2.png"]
    assert "Kept 1 images already captioned" in second.text()

    third = run(config("out-resume", "qwen3_vl"), Ctx(data_dir))
    assert third.replaced == 3 and "Replaced 3 images" in third.text()


def broken_copy(data_dir: Path, model_type: str, name: str) -> str:
    target = data_dir / "models" / "vlm" / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(data_dir / "models" / "vlm" / model_type, target)
    return name


def test_bad_models_and_settings_are_refused_by_name_before_any_image(data_dir):
    def refused(cfg, match, error=CaptionerError):
        with pytest.raises(error, match=match):
            run(cfg, Ctx(data_dir))
        assert not (data_dir / cfg.destination).exists()

    bert = data_dir / "models" / "vlm" / "bert"
    bert.mkdir(parents=True, exist_ok=True)
    (bert / "config.json").write_text(json.dumps({"model_type": "bert",
                                                  "architectures": ["BertModel"]}))
    refused(config("bad1", "bert"),
            r"vlm_model: .*model_type 'bert' \(BertModel\); supported: florence2 .*qwen2_5_vl"
            r".*qwen3_vl.*llava")
    refused(config("bad2", "missing-model"), r"vlm_model: no model found for 'missing-model'")

    name = broken_copy(data_dir, "qwen2_5_vl", "no-processor")
    (data_dir / "models" / "vlm" / name / "preprocessor_config.json").unlink()
    refused(config("bad3", name), r"vlm_model: .*lacks the image processor "
                                  r"\(preprocessor_config.json\)")

    name = broken_copy(data_dir, "qwen3_vl", "no-template")
    (data_dir / "models" / "vlm" / name / "chat_template.json").unlink()
    refused(config("bad4", name), r"vlm_model: .*lacks a chat template")

    name = broken_copy(data_dir, "qwen2_5_vl", "template-without-image")
    (data_dir / "models" / "vlm" / name / "chat_template.json").write_text(json.dumps(
        {"chat_template": "{% for m in messages %}{{ m['role'] }}{% endfor %}"}))
    refused(config("bad4b", name), r"vlm_model: the chat template .* does not place one "
                                   r"<\|image_pad\|>")

    name = broken_copy(data_dir, "florence2", "remote-code")
    cfg_file = data_dir / "models" / "vlm" / name / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()),
                                    "auto_map": {"AutoConfig": "configuration_florence2.X"}}))
    refused(config("bad5", name), r"vlm_model: .*remote-code layout")

    refused(config("bad6", "florence2", vlm_prompt="Describe the image."),
            r"vlm_prompt: Florence-2 takes one of the caption tasks <CAPTION>")
    refused(config("bad7", "qwen2_5_vl", vlm_max_new_tokens=0), "vlm_max_new_tokens",
            ConfigError)
    refused(config("bad8", "qwen2_5_vl", vlm_batch_size=0), "vlm_batch_size", ConfigError)
    refused(config("bad9", "qwen2_5_vl", caption_layout="separate files",
                   captioners=["wd14"]), "caption_layout", ConfigError)


def test_cli_resume_captions_only_what_is_missing(data_dir):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    run(config("out-cli", "florence2"), Ctx(data_dir))
    dest = data_dir / "out-cli"
    first = {p.name: p.read_bytes() for p in dest.iterdir()}
    (dest / "00001-0-img1.txt").unlink()
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "preprocess", "--data-dir", str(data_dir), "--quiet", "--resume",
         "--set", "source='raw'", "--set", "destination='out-cli'", "--set", "width=64",
         "--set", "height=64", "--set", "captioners=['vlm']", "--set", "vlm_model='florence2'",
         "--set", f"vlm_max_new_tokens={TOKENS}", "--set", "device='cpu'"],
        cwd=data_dir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Kept 2 images already captioned" in result.stdout
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == first  # the same caption again


def test_the_model_is_let_go_when_the_run_ends_or_fails(data_dir, monkeypatch):
    from preprocess.captioners import vlm
    closed = []
    real_close = vlm.VlmCaptioner.close
    monkeypatch.setattr(vlm.VlmCaptioner, "close",
                        lambda self: (closed.append(self.family.model_type), real_close(self)))
    run(config("out-close", "qwen2_5_vl", vlm_max_new_tokens=1), Ctx(data_dir))
    assert closed == ["qwen2_5_vl"] and not captioners.loaded()
    with pytest.raises(CaptionerError, match="wd14_model"):  # the second captioner is missing
        run(config("out-close-2", "qwen2_5_vl", captioners=["vlm", "wd14"],
                   wd14_model="missing"), Ctx(data_dir))
    assert closed == ["qwen2_5_vl"] * 2


def test_output_cleaning():
    from preprocess.captioners.vlm import clean
    assert clean("<think>\nthe image has a cat\n</think>\n\nA cat on a mat.\n") == \
        "A cat on a mat."
    assert clean("assistant:\n  A red car,\n parked.  ") == "A red car, parked."
    assert clean("Assistant coach on a field") == "Assistant coach on a field"
