"""Per-method form sections of the Train tab, built from each method's config class."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import gradio as gr

from core.paths import Paths
from trainers.captions import list_templates
from trainers.embeddings import list_embeddings
from trainers.tiny_model import DEMO_NAME, demo_size
from webui import choices as ch
from webui.forms import control


@dataclass
class MethodForm:
    key: str  # registry name, e.g. "textual_inversion"
    title: str  # radio label
    config: type
    target_field: str  # the field naming what is trained (shown in the job name)
    groups: list[tuple[str, list[str], bool]]  # (accordion title, fields, open)
    top: list[str] = field(default_factory=list)  # fields above the accordions
    overrides: dict = field(default_factory=dict)  # field -> extra control arguments
    controls: dict = field(default_factory=dict)
    hidden: list[str] = field(default_factory=list)  # fields that do not apply (kept at default)
    extras: Callable | None = None  # builds method-specific buttons under the form (form, paths)

    @property
    def names(self) -> list[str]:
        return list(self.controls)


def dropdown_sources(paths: Paths) -> dict[str, Callable[[], list[str]]]:
    """Fields whose choices come from disk, by field name."""
    from trainers.hypernetworks import list_hypernetworks
    return {
        "model": lambda: ch.model_choices(paths),
        "embedding": lambda: list_embeddings(paths),
        "hypernetwork": lambda: list_hypernetworks(paths),
        "template": lambda: list_templates(paths.templates),
        "checkpoint": lambda: ch.checkpoint_choices(paths),
    }


TEMPLATE_DATA = ["data_root", "template", "width", "height", "varsize", "filename_word_regex",
                 "filename_join_string", "shuffle_tags", "tag_drop_out", "latent_sampling",
                 "use_weight", "max_token_length"]
TEMPLATE_OPTIM = ["learn_rate", "batch_size", "gradient_accumulation", "steps", "clip_grad_mode",
                  "clip_grad_value", "seed", "on_nan"]
TEMPLATE_OUTPUT = ["log_directory", "save_every", "preview_every", "preview_prompt",
                   "preview_negative", "preview_seed", "preview_steps", "preview_cfg",
                   "preview_sampler"]


SLIDER = {"widget": "slider"}
KOHYA_DATA = ["train_data_dir", "reg_data_dir", "dataset_config", "caption_extension",
              "resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
              "bucket_reso_steps", "bucket_no_upscale", "shuffle_caption", "keep_tokens",
              "caption_dropout_rate", "caption_tag_dropout_rate", "flip_aug", "max_token_length"]
KOHYA_OPTIM = ["learning_rate", "optimizer_type", "lr_scheduler", "lr_warmup_steps",
               "lr_scheduler_num_cycles", "lr_scheduler_power", "train_batch_size",
               "gradient_accumulation_steps", "max_train_steps", "max_train_epochs", "seed",
               "on_nan"]
KOHYA_LOSS = ["min_snr_gamma", "noise_offset", "clip_skip", "max_grad_norm"]
KOHYA_MEMORY = ["mixed_precision", "gradient_checkpointing", "attention", "cache_latents_to_disk",
                "cache_text_encoder_outputs"]
KOHYA_OUTPUT = ["sample_every_n_steps", "sample_every_n_epochs", "sample_prompts",
                "sample_sampler", "sample_at_first", "save_every_n_steps", "save_every_n_epochs",
                "save_last_n", "save_precision", "log_directory", "overwrite"]
LORA_GROUPS = [("Dataset", KOHYA_DATA, True),
               ("Network", ["network_dim", "network_alpha", "conv_dim", "conv_alpha",
                            "network_train_unet_only", "unet_lr", "text_encoder_lr"], True),
               ("Optimization", KOHYA_OPTIM, False),
               ("Loss", KOHYA_LOSS, False),
               ("Speed and memory", KOHYA_MEMORY, False),
               ("Samples and saving", KOHYA_OUTPUT + ["preview_strength", "save_diffusers_format"],
                False)]


DREAMBOOTH_GROUPS = [("Instance and class images",
                      ["train_data_dir", "instance_prompt", "class_data_dir", "class_prompt",
                       "num_class_images", "prior_loss_weight", "reg_data_dir"], True),
                     ("Dataset", [n for n in KOHYA_DATA if n not in ("train_data_dir", "reg_data_dir")], False),
                     ("Text encoder", ["train_text_encoder", "text_encoder_lr",
                                       "stop_text_encoder_training"], False),
                     ("Optimization", KOHYA_OPTIM + ["use_ema", "ema_decay"], False),
                     ("Loss", KOHYA_LOSS, False),
                     ("Speed and memory", KOHYA_MEMORY, False),
                     ("Samples and saving", KOHYA_OUTPUT + ["save_diffusers"], False)]


FINE_TUNE_GROUPS = [("Images and metadata JSON",
                     ["train_data_dir", "in_json", "caption_extension", "tag_extension",
                      "clean_captions", "anime_caption_rules", "dataset_repeats"], True),
                    ("Dataset", ["resolution", "enable_bucket", "min_bucket_reso",
                                 "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale",
                                 "shuffle_caption", "keep_tokens", "caption_dropout_rate",
                                 "caption_tag_dropout_rate", "flip_aug", "max_token_length"], False),
                    ("Text encoder", ["train_text_encoder", "text_encoder_lr",
                                      "stop_text_encoder_training"], False),
                    ("Optimization", KOHYA_OPTIM + ["use_ema", "ema_decay"], False),
                    ("Loss", KOHYA_LOSS, False),
                    ("Speed and memory", [n for n in KOHYA_MEMORY if n != "cache_latents_to_disk"], False),
                    ("Samples and saving", KOHYA_OUTPUT + ["save_diffusers"], False)]


# the CLI's way to make a missing embedding; the page picks an existing one (Create embedding tab)
CREATE_MISSING = ["create_missing", "init_text", "vectors_per_token"]


def _layouts() -> dict[str, dict]:
    """Each method's form layout: the fields above the accordions, the accordions, and fields it
    hides. A method with none gets `default_layout`."""
    from webui.fine_tune_tools import metadata_button
    template_output = TEMPLATE_OUTPUT + ["save_image_with_embedded"]
    return {
        "textual_inversion": dict(
            groups=[("Dataset and prompts", TEMPLATE_DATA, True),
                    ("Optimization", TEMPLATE_OPTIM, True),
                    ("Saving and previews", template_output, False)],
            top=["embedding", "model"], hidden=CREATE_MISSING),
        "apt": dict(
            groups=[("Positive and negative (DreamArtist)",
                     ["cfg_scale", "negative_lr_weight", "reconstruction_weight", "ema_decay"], True),
                    ("Dataset and prompts", TEMPLATE_DATA, True),
                    ("Optimization", TEMPLATE_OPTIM, True),
                    ("Saving and previews", template_output, False)],
            top=["embedding", "model"], hidden=CREATE_MISSING),
        "xti": dict(
            groups=[("Per-layer embedding", ["init_text", "num_vectors_per_token", "file_format",
                                             "overwrite"], True),
                    ("Dataset and prompts", TEMPLATE_DATA, True),
                    ("Optimization", TEMPLATE_OPTIM, True),
                    ("Saving and previews", TEMPLATE_OUTPUT, False)],
            top=["output_name", "model"]),
        "hypernetwork": dict(
            groups=[("Dataset and prompts", TEMPLATE_DATA, True),
                    ("Optimization", TEMPLATE_OPTIM, True),
                    ("Saving and previews", TEMPLATE_OUTPUT + ["preview_strength"], False)],
            top=["hypernetwork", "model"], overrides={"preview_strength": SLIDER}),
        "lora": dict(groups=LORA_GROUPS, top=["output_name", "model"],
                     overrides={"sample_prompts": {"lines": 3}, "preview_strength": SLIDER}),
        "dreambooth": dict(groups=DREAMBOOTH_GROUPS, top=["output_name", "model"],
                           overrides={"sample_prompts": {"lines": 3}}),
        "fine_tune": dict(groups=FINE_TUNE_GROUPS, top=["output_name", "model"],
                          overrides={"sample_prompts": {"lines": 3}}, extras=metadata_button,
                          # fine-tuning reads its images from the JSON and always caches to .npz
                          hidden=["reg_data_dir", "dataset_config", "cache_latents_to_disk"]),
        "extract_lora": dict(
            groups=[("Extraction", ["rank", "conv_rank", "save_precision", "overwrite"], True)],
            top=["checkpoint", "model", "output_name"]),
    }


def default_layout(config: type, target_field: str) -> dict:
    """The naming field and the model on top, every other field in one open section."""
    names = [f.name for f in dataclasses.fields(config)]
    top = [n for n in (target_field, "model") if n in names]
    return dict(groups=[("Settings", [n for n in names if n not in top], True)], top=top)


def method_forms() -> list[MethodForm]:
    """One form per catalog method, in the catalog's order, titled as the catalog says."""
    from trainers import catalog
    layouts = _layouts()
    return [MethodForm(method.name, method.title, method.config, method.target_field,
                       **(layouts.get(method.name)
                          or default_layout(method.config, method.target_field)))
            for method in catalog.methods()]


def fallback_choice(form: MethodForm, name: str, values: list[str]):
    """What dropdown `name` shows when it has no (valid) value: the field's default if it is a
    choice, else the first choice; nothing for the field naming what is trained."""
    default = getattr(form.config(), name)
    if default in values:
        return default
    return values[0] if values and name != form.target_field else None


# size fields -> how a demo model's size sets them (kohya's smallest bucket must fit the size)
SIZE_RULES = {"width": lambda size, default: size, "height": lambda size, default: size,
              "resolution": lambda size, default: size,
              "min_bucket_reso": lambda size, default: min(size, default)}


def size_fields(form: MethodForm) -> list[str]:
    names = {f.name for f in dataclasses.fields(form.config)}
    return [name for name in SIZE_RULES if name in names and name not in form.hidden]


def size_values(form: MethodForm, model) -> dict[str, int]:
    """The form's size fields for base model `model`: the demo size for a demo model, else the
    config's defaults."""
    size = demo_size(model) if isinstance(model, str) else None
    defaults = form.config()
    return {name: getattr(defaults, name) if size is None
            else SIZE_RULES[name](size, getattr(defaults, name)) for name in size_fields(form)}


def demo_size_values(form: MethodForm) -> dict[str, int]:
    return size_values(form, DEMO_NAME)


def build_section(form: MethodForm, sources: dict, per_row: int = 2) -> None:
    """Create the form's controls (inside the caller's layout context). With a demo model as
    the first choice, the size fields start at the demo's size."""
    models = [ch.value_of(option) for option in sources["model"]()] if "model" in sources else []
    sizes = size_values(form, fallback_choice(form, "model", models))

    def make(name: str):
        cls_fields = {f.name for f in dataclasses.fields(form.config)}
        assert name in cls_fields, f"{form.config.__name__} has no field {name}"
        if name in sources:
            options = sources[name]()
            values = [ch.value_of(option) for option in options]
            return control(form.config, name, choices=options,
                            value=fallback_choice(form, name, values))
        extra = dict(form.overrides.get(name, {}))
        if name in sizes:
            extra["value"] = sizes[name]
        return control(form.config, name, **extra)

    with gr.Row():
        for name in form.top:
            form.controls[name] = make(name)
    for title, names, is_open in form.groups:
        with gr.Accordion(title, open=is_open):
            for start in range(0, len(names), per_row):
                with gr.Row():
                    for name in names[start:start + per_row]:
                        form.controls[name] = make(name)
