"""One typed config per job, torch-free so the page and the CLI can import it.

Labels, help and limits live here; webui/ builds its controls from them and the CLI prints
them as a commented TOML."""
from __future__ import annotations

import re
from dataclasses import dataclass

from core.config import ConfigError, check_limits, option

SAMPLERS = ["Euler a", "Euler", "DDIM", "DPM++ 2M", "DPM++ 2M Karras", "UniPC", "Heun", "LMS",
            "PNDM", "DDPM"]
LATENT_SAMPLING = ["once", "deterministic", "random"]
CLIP_GRAD_MODES = ["disabled", "value", "norm"]
NAME_PATTERN = re.compile(r"^[^\\/:*?\"<>|\x00-\x1f]+$")


def check_name(field: str, name: str) -> list[str]:
    """A file name the user picks: no path characters, not '.' or '..'."""
    name = name.strip()
    if not name:
        return [f"{field}: a name is required"]
    if not NAME_PATTERN.match(name) or name in (".", "..") or name.startswith("."):
        return [f"{field}: {name!r} may not contain path characters (/ \\ : * ? \" < > |) "
                "or start with a dot"]
    if len(name) > 120:
        return [f"{field}: name is longer than 120 characters"]
    return []


@dataclass
class CreateEmbeddingConfig:
    name: str = option("", "File name of the new embedding; also the word you type in prompts.",
                       label="Name")
    init_text: str = option("*", "Words whose token vectors start the embedding. Empty starts "
                            "from zeros.", label="Initialization text")
    vectors_per_token: int = option(1, "How many token vectors the embedding has.",
                                    label="Number of vectors per token", min=1, max=75)
    overwrite: bool = option(False, "Replace an existing embedding of the same name.",
                             label="Overwrite old embedding")
    file_format: str = option("pt", "A1111 .pt, or kohya .safetensors.", label="File format",
                              choices=["pt", "safetensors"])
    model: str = option("", "Base model whose vocabulary encodes the initialization text.",
                        label="Base model")

    def validate(self) -> "CreateEmbeddingConfig":
        problems = check_limits(self) + check_name("name", self.name)
        if not self.model.strip():
            problems.append("model: choose a base model")
        if problems:
            raise ConfigError(problems)
        return self


@dataclass
class TemplateTrainingConfig:
    """The A1111 Train-tab controls shared by textual inversion and hypernetworks."""
    model: str = option("", "Base model: a name under models/Stable-diffusion, 'tiny-demo', a "
                        "path, or a hub id when online.", label="Base model")
    learn_rate: str = option("0.005", "Learning rate or schedule 'rate:step, rate:step, rate'; "
                             "training stops when the schedule ends.", label="Learning rate")
    batch_size: int = option(1, "Images per step.", label="Batch size", min=1, max=64)
    gradient_accumulation: int = option(1, "Batches whose gradients add up before each "
                                        "optimizer step.", label="Gradient accumulation steps",
                                        min=1, max=1024)
    data_root: str = option("", "Folder of training images (captions in <image>.txt).",
                            label="Dataset directory")
    log_directory: str = option("outputs/textual_inversion", "Where checkpoints, previews, the "
                                "loss CSV and settings go: <dir>/<date>/<name>/.",
                                label="Log directory")
    template: str = option("style_filewords.txt", "Prompt template file from "
                           "textual_inversion_templates/.", label="Prompt template")
    width: int = option(512, "Training width in pixels.", label="Width", min=8, max=4096,
                        multiple_of=8)
    height: int = option(512, "Training height in pixels.", label="Height", min=8, max=4096,
                         multiple_of=8)
    varsize: bool = option(False, "Train at each image's own size (batch size must be 1).",
                           label="Do not resize images")
    steps: int = option(100000, "Stop at this step count (counted over the file's whole life, "
                        "so a resumed file continues to it).", label="Max steps", min=1,
                        max=10_000_000)
    save_every: int = option(500, "Save a copy every N steps; 0 disables.",
                             label="Save a copy every N steps", min=0)
    preview_every: int = option(500, "Render a preview every N steps; 0 disables.",
                                label="Save a preview every N steps", min=0)
    preview_prompt: str = option("", "Prompt for previews; empty uses a training prompt.",
                                 label="Preview prompt")
    preview_negative: str = option("", "Negative prompt for previews.",
                                   label="Preview negative prompt")
    preview_seed: int = option(42, "Seed for previews; fixed so previews compare across "
                               "steps. -1 draws a new seed each time.", label="Preview seed",
                               min=-1)
    preview_steps: int = option(20, "Sampling steps for previews.", label="Preview steps",
                                min=1, max=150)
    preview_cfg: float = option(7.0, "Classifier-free guidance scale for previews.",
                                label="Preview CFG scale", min=1.0, max=30.0)
    preview_sampler: str = option("Euler a", "Sampler for previews.", label="Preview sampler",
                                  choices=SAMPLERS)
    shuffle_tags: bool = option(False, "Shuffle the comma-separated tags of [filewords].",
                                label="Shuffle tags")
    tag_drop_out: float = option(0.0, "Chance of dropping each tag of [filewords].",
                                 label="Drop out tags", min=0.0, max=1.0)
    latent_sampling: str = option("once", "once: sample each image's latent once; "
                                  "deterministic: use the mean; random: sample every step.",
                                  label="Latent sampling method", choices=LATENT_SAMPLING)
    clip_grad_mode: str = option("disabled", "Gradient clipping.", label="Gradient clipping",
                                 choices=CLIP_GRAD_MODES)
    clip_grad_value: str = option("0.1", "Clip value or norm; a schedule string works too.",
                                  label="Clip value")
    use_weight: bool = option(False, "Use the PNG alpha channel as a per-pixel loss weight.",
                              label="Use PNG alpha channel as loss weight")
    seed: int = option(0, "Seed for data order, noise and timesteps; same seed, same run.",
                       label="Training seed", min=0, max=2**63 - 1)
    filename_word_regex: str = option("", "When a caption comes from the file name, keep only "
                                      "the words this regex finds.", label="Filename word regex")
    filename_join_string: str = option(" ", "Joins the words found by the regex.",
                                       label="Filename join string")

    def common_problems(self) -> list[str]:
        from trainers.schedule import ScheduleError, parse_schedule
        problems = check_limits(self)
        if not self.model.strip():
            problems.append("model: choose a base model")
        if not self.data_root.strip():
            problems.append("data_root: choose a dataset directory")
        if not self.template.strip():
            problems.append("template: choose a prompt template")
        if self.varsize and self.batch_size != 1:
            problems.append("batch_size: must be 1 when 'do not resize images' is on")
        for field, text, zero in (("learn_rate", self.learn_rate, False),
                                  ("clip_grad_value", self.clip_grad_value, True)):
            if field == "clip_grad_value" and self.clip_grad_mode == "disabled":
                continue
            try:
                parse_schedule(text, self.steps, field=field, allow_zero=zero)
            except ScheduleError as error:
                problems.append(str(error))
        if self.filename_word_regex:
            try:
                re.compile(self.filename_word_regex)
            except re.error as error:
                problems.append(f"filename_word_regex: not a valid regex ({error})")
        return problems


@dataclass
class TextualInversionConfig(TemplateTrainingConfig):
    embedding: str = option("", "Embedding to train (from embeddings/). Training continues "
                            "from the file's step.", label="Embedding")
    save_image_with_embedded: bool = option(True, "Also save each preview as a PNG that "
                                            "carries the embedding.",
                                            label="Save images with embedding in PNG chunks")

    def validate(self) -> "TextualInversionConfig":
        problems = self.common_problems()
        if not self.embedding.strip():
            problems.append("embedding: choose an embedding (create one first)")
        if problems:
            raise ConfigError(problems)
        return self


METHOD_CONFIGS = {"textual_inversion": TextualInversionConfig}
