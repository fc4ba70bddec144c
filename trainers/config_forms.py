"""How a config's fields are laid out in the Train tab: the fields above the accordions, the
accordions (title, fields, open), fields that do not apply in the page, control hints and the
page tools under the form. Plain data, torch- and Gradio-free: each method's config carries its
layout (`form`), so a new method's form is part of its config."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FormLayout:
    groups: list[tuple[str, list[str], bool]]  # (accordion title, fields, open)
    top: list[str] = field(default_factory=list)  # fields above the accordions
    hidden: list[str] = field(default_factory=list)  # fields that do not apply (kept at default)
    overrides: dict = field(default_factory=dict)  # field -> extra control arguments
    tools: tuple[str, ...] = ()  # page tools shown under the form, by name (webui knows them)


TEMPLATE_DATA = ["data_root", "template", "width", "height", "varsize", "filename_word_regex",
                 "filename_join_string", "shuffle_tags", "tag_drop_out", "latent_sampling",
                 "use_weight", "masked_loss", "conditioning_data_dir", "alpha_mask",
                 "max_token_length"]
TEMPLATE_OPTIM = ["learn_rate", "batch_size", "gradient_accumulation", "steps", "clip_grad_mode",
                  "clip_grad_value", "seed", "on_nan", "mixed_precision", "fp8_base"]
VALIDATION = ["validation_split", "validation_data_dir", "validate_every_n_steps",
              "validation_seed", "log_with"]
TEMPLATE_OUTPUT = ["log_directory", "save_every", "preview_every", "preview_prompt",
                   "preview_negative", "preview_seed", "preview_steps", "preview_cfg",
                   "preview_sampler"] + VALIDATION


SLIDER = {"widget": "slider"}
# flow-matching models (Flux.1, Chroma, Z-Image, Flux.2, Qwen-Image): LoRA, DreamBooth, fine-tune
FLOW = ["timestep_sampling", "discrete_flow_shift", "sigmoid_scale", "weighting_scheme",
        "guidance_scale"]
KOHYA_DATA = ["train_data_dir", "reg_data_dir", "dataset_config", "caption_extension",
              "resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
              "bucket_reso_steps", "bucket_no_upscale", "shuffle_caption", "keep_tokens",
              "caption_dropout_rate", "caption_tag_dropout_rate", "flip_aug", "masked_loss",
              "conditioning_data_dir", "alpha_mask", "max_token_length"]
KOHYA_OPTIM = ["learning_rate", "optimizer_type", "lr_scheduler", "lr_warmup_steps",
               "lr_scheduler_num_cycles", "lr_scheduler_power", "train_batch_size",
               "gradient_accumulation_steps", "max_train_steps", "max_train_epochs", "seed",
               "on_nan"]
KOHYA_LOSS = ["min_snr_gamma", "noise_offset", "clip_skip", "max_grad_norm",
              "v_parameterization", "zero_terminal_snr", "scale_v_pred_loss_like_noise_pred",
              "debiased_estimation_loss"]
KOHYA_MEMORY = ["mixed_precision", "gradient_checkpointing", "attention", "cache_latents_to_disk",
                "cache_text_encoder_outputs"]
KOHYA_OUTPUT = ["sample_every_n_steps", "sample_every_n_epochs", "sample_prompts",
                "sample_sampler", "sample_at_first", "save_every_n_steps", "save_every_n_epochs",
                "save_last_n", "save_precision", "log_directory", "overwrite"] + VALIDATION
LORA_GROUPS = [("Dataset", KOHYA_DATA, True),
               ("Network", ["network_type", "network_dim", "network_alpha", "conv_dim", "conv_alpha",
                            "lokr_factor", "dora_wd", "wd_on_output", "network_train_unet_only",
                            "unet_lr", "text_encoder_lr"], True),
               ("Pivotal tuning (new token)", ["pivotal_tuning", "pivotal_token",
                                               "pivotal_vectors", "pivotal_init_text",
                                               "pivotal_lr", "pivotal_stop_step"], False),
               ("Optimization", KOHYA_OPTIM, False),
               ("Loss", KOHYA_LOSS, False),
               ("Speed and memory", KOHYA_MEMORY + ["fp8_base", "blocks_to_swap"], False),
               ("Samples and saving", KOHYA_OUTPUT + ["preview_strength", "save_diffusers_format"],
                False),
               ("Flow matching (Flux)", FLOW + ["train_double_block_indices",
                                                "train_single_block_indices", "type_dims"],
                False)]


FULL_MEMORY = ["fused_backward_pass", "full_bf16", "full_fp16"]  # DreamBooth and fine-tuning
DREAMBOOTH_GROUPS = [("Instance and class images",
                      ["train_data_dir", "instance_prompt", "class_data_dir", "class_prompt",
                       "num_class_images", "prior_loss_weight", "reg_data_dir"], True),
                     ("Dataset", [n for n in KOHYA_DATA if n not in ("train_data_dir", "reg_data_dir")], False),
                     ("Text encoder", ["train_text_encoder", "text_encoder_lr",
                                       "stop_text_encoder_training"], False),
                     ("Optimization", KOHYA_OPTIM + ["use_ema", "ema_decay"], False),
                     ("Loss", KOHYA_LOSS, False),
                     ("Speed and memory", KOHYA_MEMORY + FULL_MEMORY, False),
                     ("Samples and saving", KOHYA_OUTPUT + ["save_diffusers"], False),
                     ("Flow matching (Flux, Z-Image, Qwen-Image)", FLOW, False)]


FINE_TUNE_GROUPS = [("Images and metadata JSON",
                     ["train_data_dir", "in_json", "caption_extension", "tag_extension",
                      "clean_captions", "anime_caption_rules", "dataset_repeats"], True),
                    ("Dataset", ["resolution", "enable_bucket", "min_bucket_reso",
                                 "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale",
                                 "shuffle_caption", "keep_tokens", "caption_dropout_rate",
                                 "caption_tag_dropout_rate", "flip_aug", "masked_loss",
                                 "conditioning_data_dir", "alpha_mask", "max_token_length"],
                     False),
                    ("Text encoder", ["train_text_encoder", "text_encoder_lr",
                                      "stop_text_encoder_training"], False),
                    ("Optimization", KOHYA_OPTIM + ["use_ema", "ema_decay"], False),
                    ("Loss", KOHYA_LOSS, False),
                    ("Speed and memory", [n for n in KOHYA_MEMORY if n != "cache_latents_to_disk"]
                     + FULL_MEMORY, False),
                    ("Samples and saving", KOHYA_OUTPUT + ["save_diffusers"], False),
                    ("Flow matching (Flux, Z-Image, Qwen-Image)", FLOW, False)]


# the CLI's way to make a missing embedding; the page picks an existing one (Create embedding tab)
CREATE_MISSING = ["create_missing", "init_text", "vectors_per_token"]
