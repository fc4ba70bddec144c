"""One typed config per job, torch-free so the page and the CLI can import it.

Labels, help and limits live here; webui/ builds its controls from them and the CLI prints
them as a commented TOML."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from core.config import ConfigError, accept, check_limits, option
from trainers import config_forms as cf
from trainers.flow_options import FLOW_WEIGHTINGS, SIGMA_SAMPLINGS
from trainers.formats.lora_key_maps import FAMILIES as CHECK_FAMILIES

# the memory estimate's reference: an SD 1.x U-Net's parameters (trainers/families/sd1.py)
SD1_UNET_PARAMETERS = 859.5e6

SAMPLERS = ["Euler a", "Euler", "DDIM", "DPM++ 2M", "DPM++ 2M Karras", "UniPC", "Heun", "LMS",
            "PNDM", "DDPM"]
LATENT_SAMPLING = ["once", "deterministic", "random"]
CLIP_GRAD_MODES = ["disabled", "value", "norm"]
NAN_POLICIES = ["stop", "skip"]
MAX_TOKEN_LENGTHS = [75, 150, 225]  # trainers/prompt_chunks.py
NAME_PATTERN = re.compile(r"^[^\\/:*?\"<>|\x00-\x1f]+$")
PIVOTAL_TOKEN = re.compile(r"^[a-z0-9_-]{1,64}$")


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


def mask_problems(cfg, toml: bool = False) -> list[str]:
    """Masked loss (kohya's): a mask folder with masked_loss, or the alpha channel, not both;
    a dataset TOML names its mask folders per subset."""
    problems = []
    folder = cfg.conditioning_data_dir.strip()
    if folder and not cfg.masked_loss:
        problems.append("conditioning_data_dir: the mask folder is read with masked_loss on; "
                        "tick masked loss or clear the folder")
    if cfg.masked_loss and cfg.alpha_mask:
        problems.append("alpha_mask: masks come from the mask folder (masked_loss) or the alpha "
                        "channel, not both; untick one")
    elif cfg.masked_loss and not folder and not toml:
        problems.append("conditioning_data_dir: masked_loss needs a mask folder (or use "
                        "alpha_mask for the images' alpha channel)")
    if toml and folder:
        problems.append("conditioning_data_dir: with a dataset config, name each subset's mask "
                        "folder in the TOML (conditioning_data_dir of [[datasets.subsets]])")
    return problems


def validation_problems(cfg) -> list[str]:
    """Validation loss: a held-out share below 1 or a folder, not both, and how often."""
    problems = []
    if not 0.0 <= cfg.validation_split < 1.0:
        problems.append("validation_split: the held-out share must be at least 0 and below 1, "
                        f"got {cfg.validation_split}")
    folder = cfg.validation_data_dir.strip()
    if folder and cfg.validation_split:
        problems.append("validation_data_dir: validation images come from a folder or a held-out "
                        "share (validation_split), not both")
    if (folder or cfg.validation_split) and not cfg.validate_every_n_steps:
        problems.append("validate_every_n_steps: set how often to compute the validation loss "
                        "(or clear validation_split / validation_data_dir)")
    if cfg.log_with == "tensorboard":
        from importlib.util import find_spec
        if find_spec("tensorboard") is None:
            problems.append("log_with: TensorBoard is not installed; pip install tensorboard "
                            "(or choose none)")
    return problems


class NamesFiles:
    """Every config checks the files and folders it names before its job is queued (page, CLI,
    queue restore): `file_problems` lists what is wrong (a subclass adds its own to its
    parent's), `check_data` looks deeper once those pass (a dataset's layout)."""

    def file_problems(self, paths) -> list[str]:
        from core.config import path_problems
        return path_problems(self, paths)  # every field marked as a path

    def check_data(self, paths) -> None:
        return None

    def check_files(self, paths) -> None:
        problems = list(dict.fromkeys(self.file_problems(paths)))
        if problems:
            raise ConfigError(problems)
        self.check_data(paths)

    def trainable_parameters(self, unet: float, text: float,
                             lora_per_rank: tuple[float, float] = (0.0, 0.0)) -> float:
        """About how many parameters it trains on a model with this many U-Net and text
        encoder parameters (and a LoRA this many per rank: denoiser, text encoders; the
        memory estimate); an embedding's few by default."""
        return 75 * 1024

    def frozen_dtype(self) -> str:
        """What the base model's weights are stored in while it trains: "fp32", or the mixed
        precision ("bf16" / "fp16") where every base weight stays frozen."""
        return "fp32"


@dataclass
class CreateEmbeddingConfig(NamesFiles):
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
                        label="Base model", path="model")

    def validate(self) -> "CreateEmbeddingConfig":
        problems = check_limits(self) + check_name("name", self.name)
        if not self.model.strip():
            problems.append("model: choose a base model")
        return accept(self, problems)


@dataclass
class TemplateTrainingConfig(NamesFiles):
    """The A1111 Train-tab controls shared by textual inversion and hypernetworks."""
    model: str = option("", "Base model: a name under models/Stable-diffusion, 'tiny-demo', a "
                        "path, or a hub id when online.", label="Base model", path="model")
    learn_rate: str = option("0.005", "Learning rate or schedule 'rate:step, rate:step, rate'; "
                             "training stops when the schedule ends.", label="Learning rate")
    batch_size: int = option(1, "Images per step.", label="Batch size", min=1, max=64)
    gradient_accumulation: int = option(1, "Batches whose gradients add up before each "
                                        "optimizer step.", label="Gradient accumulation steps",
                                        min=1, max=1024)
    data_root: str = option("", "Folder of training images (captions in <image>.txt).",
                            label="Dataset directory", path="data")
    log_directory: str = option("outputs/textual_inversion", "Where checkpoints, previews, the "
                                "loss CSV and settings go: <dir>/<date>/<name>/.",
                                label="Log directory", path="data")
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
    masked_loss: bool = option(False, "Train only where each image's mask is white (kohya's "
                               "masked_loss): masks are the images' file names in the mask "
                               "folder, gray = a partial weight.", label="Masked loss")
    conditioning_data_dir: str = option("", "Mask folder for masked loss: one grayscale image "
                                        "per training image, same file name and size (kohya's "
                                        "conditioning_data_dir).", label="Mask folder",
                                        path="data")
    alpha_mask: bool = option(False, "Use each image's alpha channel as its loss mask (kohya's "
                              "alpha_mask; transparent = ignored).", label="Alpha channel as mask")
    validation_split: float = option(0.0, "Share of the training images held out for the "
                                     "validation loss (kohya's validation_split); 0 holds out "
                                     "none.", label="Validation split", min=0.0, max=1.0)
    validation_data_dir: str = option("", "A folder of validation images (with captions) instead "
                                      "of a held-out share.", label="Validation folder",
                                      path="data")
    validate_every_n_steps: int = option(0, "Compute the validation loss every N steps (fixed "
                                         "timesteps and noise, no gradients); 0 never.",
                                         label="Validate every N steps", min=0)
    validation_seed: int = option(-1, "Seed of the held-out choice and the validation noise; -1 "
                                  "uses the training seed.", label="Validation seed", min=-1,
                                  max=2**63 - 1)
    log_with: str = option("none", "Also log the loss, learning rates, validation loss, "
                           "previews and settings for TensorBoard (kohya's log_with), in the "
                           "run folder's tensorboard/; needs pip install tensorboard.",
                           label="Log with", choices=["none", "tensorboard"])
    seed: int = option(0, "Seed for data order, noise and timesteps; same seed, same run.",
                       label="Training seed", min=0, max=2**63 - 1)
    on_nan: str = option("stop", "When the loss or a gradient becomes NaN/inf: stop (the file "
                         "keeps the last good step) or skip that step (training still stops "
                         "after 10 bad steps in a row).", label="On NaN/inf loss",
                         choices=NAN_POLICIES)
    filename_word_regex: str = option("", "When a caption comes from the file name, keep only "
                                      "the words this regex finds.", label="Filename word regex")
    filename_join_string: str = option(" ", "Joins the words found by the regex.",
                                       label="Filename join string")
    max_token_length: int = option(75, "Longest caption in tokens: 150 or 225 encode it as "
                                   "75-token chunks side by side, as A1111 does for long "
                                   "prompts; tokens past the limit are dropped.",
                                   label="Max token length", choices=MAX_TOKEN_LENGTHS)
    mixed_precision: str = option("no", "Compute precision (bf16 also works on CPUs); the base "
                                  "model stays frozen, so its weights are stored in it too, half "
                                  "the memory. What trains stays fp32.", label="Mixed precision",
                                  choices=["no", "fp16", "bf16"])
    fp8_base: bool = option(False, "Store the frozen U-Net's Linear and conv weights in 8 bits "
                            "(kohya's fp8_base): half of bf16's memory for them, slightly less "
                            "precise; needs mixed precision bf16 or fp16.",
                            label="fp8 base weights")

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
        problems += mask_problems(self) + validation_problems(self)
        if self.use_weight and (self.masked_loss or self.alpha_mask):
            problems.append("use_weight: the A1111 alpha loss weight and masked loss are two "
                            "ways to weigh pixels; use one of them")
        if self.fp8_base and self.mixed_precision not in ("bf16", "fp16"):
            problems.append("fp8_base: needs mixed precision bf16 or fp16 (the 8-bit weights "
                            "are up-cast to it for each layer)")
        if self.filename_word_regex:
            try:
                re.compile(self.filename_word_regex)
            except re.error as error:
                problems.append(f"filename_word_regex: not a valid regex ({error})")
        return problems

    def file_problems(self, paths) -> list[str]:
        from trainers import preflight
        return super().file_problems(paths) + preflight.template_problems(self, paths)

    def frozen_dtype(self) -> str:
        # every base weight stays frozen: what trains (vectors, MLPs) is fp32 beside them
        if self.fp8_base:
            return "fp8"
        return self.mixed_precision if self.mixed_precision in ("bf16", "fp16") else "fp32"


@dataclass
class TextualInversionConfig(TemplateTrainingConfig):
    form: ClassVar[cf.FormLayout] = cf.FormLayout(
        [("Dataset and prompts", cf.TEMPLATE_DATA, True), ("Optimization", cf.TEMPLATE_OPTIM, True),
         ("Saving and previews", cf.TEMPLATE_OUTPUT + ["save_image_with_embedded"], False)],
        top=["embedding", "model"], hidden=cf.CREATE_MISSING)
    embedding: str = option("", "Embedding to train (from embeddings/). Training continues "
                            "from the file's step.", label="Embedding")
    save_image_with_embedded: bool = option(True, "Also save each preview as a PNG that "
                                            "carries the embedding.",
                                            label="Save images with embedding in PNG chunks")
    # not automatic: a mistyped name would otherwise start a new embedding without a word
    create_missing: bool = option(False, "When there is no embedding of this name, create "
                                  "it first from the initialization text and vectors per "
                                  "token (as Create embedding does) and say so.",
                                  label="Create the embedding if missing")
    init_text: str = option("*", "With create_missing: words whose token vectors start the "
                            "new embedding.", label="Initialization text")
    vectors_per_token: int = option(1, "With create_missing: how many token vectors the new "
                                    "embedding has.", label="Number of vectors per token",
                                    min=1, max=75)

    def validate(self) -> "TextualInversionConfig":
        problems = self.common_problems()
        if not self.embedding.strip():
            problems.append("embedding: choose an embedding (create one first)")
        elif self.create_missing:
            problems += check_name("embedding", self.embedding)
        return accept(self, problems)

    def file_problems(self, paths) -> list[str]:
        from trainers import preflight
        return super().file_problems(paths) + preflight.embedding_problems(
            paths, self.embedding, may_create=self.create_missing)


@dataclass
class AptConfig(TextualInversionConfig):
    """Advanced prompt tuning (DreamArtist): a positive embedding and its '-neg' partner trained
    together, with classifier-free guidance inside the loss."""
    form: ClassVar[cf.FormLayout] = cf.FormLayout(
        [("Positive and negative (DreamArtist)",
          ["cfg_scale", "negative_lr_weight", "reconstruction_weight", "ema_decay"], True),
         ("Dataset and prompts", cf.TEMPLATE_DATA, True), ("Optimization", cf.TEMPLATE_OPTIM, True),
         ("Saving and previews", cf.TEMPLATE_OUTPUT + ["save_image_with_embedded"], False)],
        top=["embedding", "model"], hidden=cf.CREATE_MISSING)
    log_directory: str = option("outputs/apt", "Where checkpoints, previews, the loss CSV and "
                                "settings go: <dir>/<date>/<name>/.", label="Log directory",
                                path="data")
    cfg_scale: float = option(5.0, "Guidance scale inside the loss: the prediction compared with "
                              "the noise is negative + scale × (positive − negative). Above 1, "
                              "else the negative embedding learns nothing.",
                              label="CFG scale (training)", min=1.0, max=30.0)
    negative_lr_weight: float = option(1.0, "The negative embedding's learning rate is the "
                                       "rate times this.", label="Negative learning-rate weight",
                                       min=0.0, max=100.0)
    reconstruction_weight: float = option(0.0, "Weight of an L1 loss between the training image "
                                          "and the image decoded from the predicted latents "
                                          "(DreamArtist's 'reconstruction'; slower, more "
                                          "memory); 0 turns it off.",
                                          label="Reconstruction loss weight", min=0.0, max=100.0)
    ema_decay: float = option(0.0, "Save an exponential moving average of the embeddings "
                              "(e.g. 0.99) instead of the latest values; 0 turns it off.",
                              label="EMA decay", min=0.0, max=0.99999)

    def validate(self) -> "AptConfig":
        problems = self.common_problems()
        if not self.embedding.strip():
            problems.append("embedding: choose the positive embedding (create one first)")
        elif self.create_missing and (bad_name := check_name("embedding", self.embedding)):
            problems += bad_name
        elif self.embedding.strip().endswith("-neg"):
            problems.append("embedding: choose the positive embedding; its '-neg' partner is "
                            "found (or made) by name")
        if self.cfg_scale <= 1.0:
            problems.append(f"cfg_scale: must be above 1 (got {self.cfg_scale}); at 1 the "
                            "negative embedding gets no gradient")
        return accept(self, problems)


@dataclass
class XtiConfig(TemplateTrainingConfig):
    """Extended textual inversion (XTI, "P+"): one set of vectors per U-Net cross-attention
    layer, saved in kohya's XTI layout in models/xti/."""
    form: ClassVar[cf.FormLayout] = cf.FormLayout(
        [("Per-layer embedding", ["init_text", "num_vectors_per_token", "file_format", "overwrite"],
          True),
         ("Dataset and prompts", cf.TEMPLATE_DATA, True), ("Optimization", cf.TEMPLATE_OPTIM, True),
         ("Saving and previews", cf.TEMPLATE_OUTPUT, False)],
        top=["output_name", "model"])
    output_name: str = option("", "File name in models/xti and the word you type in prompts; "
                              "an existing file of this name is trained further.",
                              label="Name")
    init_text: str = option("*", "Words whose token vectors start every layer's vectors.",
                            label="Initialization text")
    num_vectors_per_token: int = option(1, "How many token vectors each layer has.",
                                        label="Number of vectors per token", min=1, max=75)
    file_format: str = option("safetensors", "kohya's XTI file: .safetensors or .pt.",
                              label="File format", choices=["safetensors", "pt"])
    overwrite: bool = option(False, "Start over even if a file of this name exists; otherwise "
                             "training continues from it.", label="Start over")
    log_directory: str = option("outputs/xti", "Where checkpoints, previews, the loss CSV and "
                                "settings go: <dir>/<date>/<name>/.", label="Log directory",
                                path="data")

    def validate(self) -> "XtiConfig":
        problems = self.common_problems() + check_name("output_name", self.output_name)
        return accept(self, problems)


HYPERNETWORK_SIZES = [768, 320, 640, 1024, 1280]
MAX_HYPERNETWORK_WIDTH = 4096  # SDXL's widest attention is 2048
HYPERNETWORK_ACTIVATIONS = ["linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid",
                            "celu", "gelu", "hardshrink", "hardsigmoid", "hardtanh", "logsigmoid",
                            "mish", "prelu", "relu6", "rrelu", "selu", "silu", "softplus",
                            "softshrink", "softsign", "tanhshrink"]
WEIGHT_INITS = ["Normal", "KaimingUniform", "KaimingNormal", "XavierUniform", "XavierNormal"]


@dataclass
class CreateHypernetworkConfig(NamesFiles):
    name: str = option("", "File name of the new hypernetwork in models/hypernetworks.",
                       label="Name")
    sizes: list[int] = option([768, 320, 640, 1280], "Attention widths it applies to: 768 (SD1), "
                              "1024 (SD2) or 2048 (SDXL) is the text context of cross-attention; "
                              "320, 640, 1280 are the U-Net's self-attention widths (SDXL: 640, "
                              "1280).", label="Modules")
    layer_structure: str = option("1, 2, 1", "Width of each layer as a multiple of the module "
                                  "width; starts and ends with 1.", label="Layer structure")
    activation_func: str = option("linear", "Activation after each hidden layer. 'swish' is "
                                  "torch's Hardswish, as in A1111.", label="Activation function",
                                  choices=HYPERNETWORK_ACTIVATIONS)
    weight_initialization: str = option("Normal", "How layer weights start.",
                                        label="Layer weight initialization", choices=WEIGHT_INITS)
    add_layer_norm: bool = option(False, "LayerNorm after each hidden layer.",
                                  label="Add layer normalization")
    use_dropout: bool = option(False, "Dropout after hidden layers.", label="Use dropout")
    dropout_structure: str = option("0, 0, 0", "One dropout rate per layer; first and last 0.",
                                    label="Dropout structure")
    overwrite: bool = option(False, "Replace an existing hypernetwork of the same name.",
                             label="Overwrite old hypernetwork")
    model: str = option("", "Base model, to check that a module width matches it (optional).",
                        label="Base model", path="model")

    def validate(self) -> "CreateHypernetworkConfig":
        problems = check_limits(self) + check_name("name", self.name)
        if not self.sizes:
            problems.append("sizes: choose at least one module width")
        if any(not 1 <= size <= MAX_HYPERNETWORK_WIDTH for size in self.sizes):
            problems.append(f"sizes: widths must be between 1 and {MAX_HYPERNETWORK_WIDTH}")
        return accept(self, problems)


@dataclass
class HypernetworkTrainingConfig(TemplateTrainingConfig):
    form: ClassVar[cf.FormLayout] = cf.FormLayout(
        [("Dataset and prompts", cf.TEMPLATE_DATA, True), ("Optimization", cf.TEMPLATE_OPTIM, True),
         ("Saving and previews", cf.TEMPLATE_OUTPUT + ["preview_strength"], False)],
        top=["hypernetwork", "model"], overrides={"preview_strength": cf.SLIDER})
    # A1111's defaults for hypernetworks differ from embeddings'
    learn_rate: str = option("0.00001", "Learning rate or schedule 'rate:step, rate:step, rate'; "
                             "training stops when the schedule ends.", label="Learning rate")
    template: str = option("hypernetwork.txt", "Prompt template file from "
                           "textual_inversion_templates/.", label="Prompt template")
    hypernetwork: str = option("", "Hypernetwork to train (from models/hypernetworks). Training "
                               "continues from the file's step.", label="Hypernetwork")
    preview_strength: float = option(1.0, "Strength of the hypernetwork in previews.",
                                     label="Preview strength", min=0.0, max=2.0)

    def validate(self) -> "HypernetworkTrainingConfig":
        problems = self.common_problems()
        if not self.hypernetwork.strip():
            problems.append("hypernetwork: choose a hypernetwork (create one first)")
        return accept(self, problems)

    def file_problems(self, paths) -> list[str]:
        from trainers import preflight
        return super().file_problems(paths) + preflight.hypernetwork_problems(paths, self.hypernetwork)

    def trainable_parameters(self, unet: float, text: float,
                             lora_per_rank: tuple[float, float] = (0.0, 0.0)) -> float:
        return 4 * 768 * 768 * 2 * 4 * unet / SD1_UNET_PARAMETERS


OPTIMIZERS = ["AdamW", "AdamW8bit", "PagedAdamW8bit", "PagedAdamW", "PagedAdamW32bit", "Lion",
              "Lion8bit", "PagedLion8bit", "Prodigy", "Adafactor", "SGDNesterov", "SGDNesterov8bit"]
LR_SCHEDULERS = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                 "polynomial"]
PRECISIONS = ["no", "fp16", "bf16"]
SAVE_PRECISIONS = ["fp32", "fp16", "bf16"]


@dataclass
class KohyaTrainingConfig(NamesFiles):
    """Options LoRA and DreamBooth share, with kohya sd-scripts' names and defaults."""
    model: str = option("", "Base model: a name under models/Stable-diffusion, 'tiny-demo', a "
                        "path, or a hub id when online.", label="Base model", path="model")
    output_name: str = option("", "Name of the saved file (and of the run folder).",
                              label="Output name")
    train_data_dir: str = option("", "Folder whose subfolders are named '<repeats>_<identifier> "
                                 "<class>' (e.g. '20_sks dog'); a folder of images counts as "
                                 "one repeat.", label="Image folder", path="data")
    reg_data_dir: str = option("", "Regularization images, in the same folder layout "
                               "(optional).", label="Regularization folder", path="data")
    dataset_config: str = option("", "A kohya dataset TOML ([general], [[datasets]], "
                                 "[[datasets.subsets]]); replaces the folders above.",
                                 label="Dataset config (TOML)", path="data")
    caption_extension: str = option(".txt", "Caption files beside the images.",
                                    label="Caption extension")
    resolution: int = option(512, "Training resolution (the bucket area budget).",
                             label="Resolution", min=8, max=4096, multiple_of=8)
    enable_bucket: bool = option(True, "Aspect-ratio buckets, so non-square images are not "
                                 "cropped.", label="Enable buckets")
    min_bucket_reso: int = option(256, "Smallest bucket side.", label="Min bucket resolution",
                                  min=8, max=4096)
    max_bucket_reso: int = option(1024, "Largest bucket side.", label="Max bucket resolution",
                                  min=8, max=8192)
    bucket_reso_steps: int = option(64, "Bucket sides are multiples of this.",
                                    label="Bucket resolution steps", min=8, max=256,
                                    multiple_of=8)
    bucket_no_upscale: bool = option(False, "Never enlarge small images to fill a bucket.",
                                     label="Don't upscale bucket resolution")
    shuffle_caption: bool = option(False, "Shuffle comma-separated tags.", label="Shuffle caption")
    keep_tokens: int = option(0, "Keep the first N tags in place when shuffling.",
                              label="Keep N tokens", min=0, max=75)
    caption_dropout_rate: float = option(0.0, "Chance of training an image with an empty caption.",
                                         label="Caption dropout rate", min=0.0, max=1.0)
    caption_tag_dropout_rate: float = option(0.0, "Chance of dropping each tag.",
                                             label="Tag dropout rate", min=0.0, max=1.0)
    flip_aug: bool = option(False, "Also train on mirrored images.", label="Flip augmentation")
    masked_loss: bool = option(False, "Train only where each image's mask is white (kohya's "
                               "masked_loss): masks are the images' file names in the mask "
                               "folder (a <repeats>_<tokens> sub-folder's in the sub-folder "
                               "of the same name, if there is one), gray = a partial weight.",
                               label="Masked loss")
    conditioning_data_dir: str = option("", "Mask folder for masked loss: one grayscale image "
                                        "per training image, same file name and size (kohya's "
                                        "conditioning_data_dir).", label="Mask folder",
                                        path="data")
    alpha_mask: bool = option(False, "Use each image's alpha channel as its loss mask (kohya's "
                              "alpha_mask; transparent = ignored).", label="Alpha channel as mask")
    validation_split: float = option(0.0, "Share of the training images held out for the "
                                     "validation loss (kohya's validation_split); 0 holds out "
                                     "none.", label="Validation split", min=0.0, max=1.0)
    validation_data_dir: str = option("", "A folder of validation images (with captions) instead "
                                      "of a held-out share.", label="Validation folder",
                                      path="data")
    validate_every_n_steps: int = option(0, "Compute the validation loss every N steps (fixed "
                                         "timesteps and noise, no gradients); 0 never.",
                                         label="Validate every N steps", min=0)
    validation_seed: int = option(-1, "Seed of the held-out choice and the validation noise; -1 "
                                  "uses the training seed.", label="Validation seed", min=-1,
                                  max=2**63 - 1)
    log_with: str = option("none", "Also log the loss, learning rates, validation loss, "
                           "previews and settings for TensorBoard (kohya's log_with), in the "
                           "run folder's tensorboard/; needs pip install tensorboard.",
                           label="Log with", choices=["none", "tensorboard"])
    max_token_length: int = option(75, "Longest caption in tokens: 150 or 225 encode it in "
                                   "75-token chunks, as kohya's --max_token_length does; tokens "
                                   "past the limit are dropped.", label="Max token length",
                                   choices=MAX_TOKEN_LENGTHS)
    learning_rate: float = option(1e-4, "Base learning rate.", label="Learning rate", min=0.0)
    optimizer_type: str = option("AdamW", "Optimizer.", label="Optimizer", choices=OPTIMIZERS)
    lr_scheduler: str = option("constant", "How the learning rate changes over the run.",
                               label="LR scheduler", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = option(0, "Warm-up steps.", label="LR warmup steps", min=0)
    lr_scheduler_num_cycles: int = option(1, "Restarts for cosine_with_restarts.",
                                          label="LR cycles", min=1)
    lr_scheduler_power: float = option(1.0, "Power for polynomial.", label="LR power", min=0.0)
    train_batch_size: int = option(1, "Images per step.", label="Batch size", min=1, max=64)
    gradient_accumulation_steps: int = option(1, "Batches per optimizer step.",
                                              label="Gradient accumulation steps", min=1, max=1024)
    max_train_steps: int = option(1600, "Total optimizer steps.", label="Max train steps",
                                  min=1, max=10_000_000)
    max_train_epochs: int = option(0, "If set, overrides max steps.", label="Max train epochs",
                                   min=0, max=100_000)
    min_snr_gamma: float = option(0.0, "Min-SNR loss weighting (5 is common); 0 disables.",
                                  label="Min SNR gamma", min=0.0, max=100.0)
    noise_offset: float = option(0.0, "Noise offset (0.05–0.1 helps very dark/bright images).",
                                 label="Noise offset", min=0.0, max=1.0)
    v_parameterization: bool = option(False, "Train to predict v (kohya's v_parameterization), "
                                      "for v-prediction models whose files do not say so "
                                      "(NoobAI-XL v-pred marks itself and needs no tick).",
                                      label="v-parameterization")
    zero_terminal_snr: bool = option(False, "Rescale the noise schedule to zero SNR at the last "
                                     "timestep (kohya's zero_terminal_snr; with v-prediction).",
                                     label="Zero terminal SNR")
    scale_v_pred_loss_like_noise_pred: bool = option(
        False, "Weigh a v-prediction loss by SNR / (SNR + 1), like a noise-prediction loss.",
        label="Scale v-pred loss like noise pred")
    debiased_estimation_loss: bool = option(False, "Weigh the loss by 1 / sqrt(SNR) (debiased "
                                            "estimation).", label="Debiased estimation loss")
    max_grad_norm: float = option(1.0, "Clip the gradients' total norm to this before each "
                                  "optimizer step (kohya's and diffusers' default 1.0); 0 does "
                                  "not clip.", label="Max grad norm", min=0.0, max=1e6)
    clip_skip: int = option(1, "Use the text encoder's N-th layer from the end.",
                            label="CLIP skip", min=1, max=12)
    mixed_precision: str = option("no", "Compute precision (bf16 also works on CPUs); where "
                                  "the whole base model stays frozen (LoRA) its weights are "
                                  "stored in it too, half the memory.",
                                  label="Mixed precision", choices=PRECISIONS)
    gradient_checkpointing: bool = option(False, "Less memory, ~20–30% slower.",
                                          label="Gradient checkpointing")
    attention: str = option("sdpa", "Attention kernel; xformers needs a CUDA GPU and the "
                            "package.", label="Attention", choices=["sdpa", "xformers"])
    cache_latents_to_disk: bool = option(False, "Latents are always encoded once; this also "
                                         "keeps them as .npz beside the images for later runs.",
                                         label="Cache latents to disk")
    cache_text_encoder_outputs: bool = option(False, "Encode each caption once (only when the "
                                              "text encoder is frozen and captions fixed).",
                                              label="Cache text encoder outputs")
    sample_every_n_steps: int = option(0, "Render sample images every N steps; 0 disables.",
                                       label="Sample every N steps", min=0)
    sample_every_n_epochs: int = option(0, "Render sample images every N epochs; 0 disables.",
                                        label="Sample every N epochs", min=0)
    sample_prompts: str = option("", "One prompt per line, with kohya's flags: --n negative "
                                 "--w width --h height --d seed --l cfg --s steps.",
                                 label="Sample prompts")
    sample_sampler: str = option("Euler a", "Sampler for sample images.", label="Sample sampler",
                                 choices=SAMPLERS)
    sample_at_first: bool = option(True, "Render samples before the first step, as a baseline.",
                                   label="Sample at step 0")
    seed: int = option(42, "Seed for data order, noise and timesteps; samples use their own "
                       "(fixed) seeds.", label="Seed", min=0, max=2**63 - 1)
    on_nan: str = option("stop", "When the loss or a gradient becomes NaN/inf: stop (the file "
                         "keeps the last good step) or skip that step (training still stops "
                         "after 10 bad steps in a row).", label="On NaN/inf loss",
                         choices=NAN_POLICIES)
    save_every_n_steps: int = option(0, "Save a checkpoint every N steps; 0 disables.",
                                     label="Save every N steps", min=0)
    save_every_n_epochs: int = option(1, "Save a checkpoint every N epochs; 0 disables.",
                                      label="Save every N epochs", min=0)
    save_last_n: int = option(0, "Keep only the newest N checkpoints of the run; 0 keeps all.",
                              label="Keep last N checkpoints", min=0)
    save_precision: str = option("fp16", "Precision of saved weights.", label="Save precision",
                                 choices=SAVE_PRECISIONS)
    log_directory: str = option("outputs/lora", "Run folders: checkpoints, samples, loss CSV, "
                                "settings.", label="Log directory", path="data")
    overwrite: bool = option(False, "Start over even if a file of this name exists; otherwise "
                             "training continues from it.", label="Start over")

    def text_outputs_cached(self, trains_text_encoder: bool) -> bool:
        """Whether each caption is encoded once (a frozen text encoder and fixed captions; a
        token trained by pivotal tuning goes through the encoder at every step)."""
        varying = self.shuffle_caption or self.caption_dropout_rate or self.caption_tag_dropout_rate
        return bool(self.cache_text_encoder_outputs and not varying and not trains_text_encoder
                    and not getattr(self, "pivotal_tuning", False))

    def kohya_problems(self) -> list[str]:
        problems = check_limits(self)
        if not self.model.strip():
            problems.append("model: choose a base model")
        problems += check_name("output_name", self.output_name)
        if not (self.train_data_dir.strip() or self.dataset_config.strip()):
            problems.append("train_data_dir: choose an image folder (or a dataset config)")
        if self.min_bucket_reso > self.max_bucket_reso:
            problems.append("min_bucket_reso: larger than max_bucket_reso")
        problems += mask_problems(self, toml=bool(self.dataset_config.strip()))
        problems += validation_problems(self)
        return problems

    def file_problems(self, paths) -> list[str]:
        from trainers import preflight
        return super().file_problems(paths) + preflight.log_directory_problems(self, paths)

    def check_data(self, paths) -> None:
        from trainers import preflight
        preflight.check_kohya_dataset(self, paths)

    def noise_weighting(self):
        from trainers.flow_options import NoiseWeighting
        return NoiseWeighting(v_like_noise=self.scale_v_pred_loss_like_noise_pred,
                              debiased=self.debiased_estimation_loss)

    def scheduler_overrides(self) -> dict:
        """What the run changes in the model's noise schedule (v target, zero terminal SNR)."""
        overrides = {}
        if self.v_parameterization:
            overrides["prediction_type"] = "v_prediction"
        if self.zero_terminal_snr:
            overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        return overrides


@dataclass
class FlowMatchingFields:
    """The flow-matching options (sd-scripts' names) of every method that trains a flow
    family's transformer (LoRA, DreamBooth, fine-tuning), and what a model's family says
    about them and the SD-only options."""
    timestep_sampling: str = option("shift", "Flow-matching models (Flux): how sigmas are "
                                    "drawn — logit-normal ('sigmoid'), shifted toward noise "
                                    "('shift', kohya's Flux advice), by resolution "
                                    "('flux_shift'), 'uniform' or SD3's 'mode'.",
                                    label="Timestep sampling", choices=list(SIGMA_SAMPLINGS))
    discrete_flow_shift: float = option(3.1582, "Shift for 'shift' sampling.",
                                        label="Discrete flow shift", min=0.01, max=100.0)
    sigmoid_scale: float = option(1.0, "Spread of the logit-normal sigmas.",
                                  label="Sigmoid scale", min=0.01, max=10.0)
    weighting_scheme: str = option("none", "Flow-matching loss weighting per sigma.",
                                   label="Loss weighting", choices=list(FLOW_WEIGHTINGS))
    guidance_scale: float = option(1.0, "The guidance value a guidance-distilled model (Flux.1 "
                                    "dev) is trained at; 1 is the common choice.",
                                    label="Guidance scale", min=0.0, max=100.0)

    def flow_options(self):
        from trainers.flow_options import FlowMatchingOptions
        return FlowMatchingOptions(sampling=self.timestep_sampling, shift=self.discrete_flow_shift,
                                   logit_std=self.sigmoid_scale, weighting=self.weighting_scheme,
                                   guidance=self.guidance_scale)

    def flow_family_problems(self, family) -> list[str]:
        """On a flow-matching model: the noise-prediction options and sizes that do not apply;
        on an SD model: flow-matching options changed from their defaults."""
        problems = []
        if family.prediction != "flow":
            return [f"{name}: applies to flow-matching models only; {family.label} is trained "
                    "with noise prediction" for name in FLOW_FIELDS
                    if getattr(self, name) != FLOW_DEFAULTS[name]]
        if self.min_snr_gamma:
            problems.append(f"min_snr_gamma: does not apply to flow-matching models like "
                            f"{family.label}; use the loss weighting instead")
        problems += [f"{name}: applies to the noise schedules of SD models; {family.label} is "
                     "a flow-matching model" for name in SD_SCHEDULE_FIELDS if getattr(self, name)]
        if self.mixed_precision == "fp16":
            problems.append(f"mixed_precision: {family.label} is a bf16 model whose "
                            "activations overflow fp16; use bf16")
        if self.resolution % 16:
            problems.append(f"resolution: {family.label} needs a multiple of 16 (8 px per "
                            f"latent, 2x2 latents per token), got {self.resolution}")
        return problems


SD_SCHEDULE_FIELDS = ("v_parameterization", "zero_terminal_snr",
                      "scale_v_pred_loss_like_noise_pred", "debiased_estimation_loss")


@dataclass
class LoraConfig(FlowMatchingFields, KohyaTrainingConfig):
    form: ClassVar[cf.FormLayout] = cf.FormLayout(
        cf.LORA_GROUPS, top=["output_name", "model"],
        overrides={"sample_prompts": {"lines": 3}, "preview_strength": cf.SLIDER})
    network_dim: int = option(8, "Rank of the LoRA matrices.", label="Network rank (dim)",
                              min=1, max=1024)
    network_alpha: float = option(1.0, "Scale = alpha / rank.", label="Network alpha", min=0.0)
    conv_dim: int = option(0, "Rank for 3x3 conv layers (LoCon); 0 trains no conv layers.",
                           label="Conv rank (dim)", min=0, max=1024)
    conv_alpha: float = option(1.0, "Alpha for conv layers.", label="Conv alpha", min=0.0)
    network_type: str = option("lora", "What the adapter trains: 'lora' (kohya LoRA / LoCon), "
                               "LyCORIS 'loha' (Hadamard product of two low-rank pairs) or "
                               "'lokr' (Kronecker product); LoHa/LoKr for SD1/SD2/SDXL.",
                               label="Network type", choices=["lora", "loha", "lokr"])
    lokr_factor: int = option(-1, "LoKr: LyCORIS's factor, the size of the small Kronecker "
                              "factor's sides; -1 picks the most square split.",
                              label="LoKr factor", min=-1)
    dora_wd: bool = option(False, "DoRA (LyCORIS's dora_wd): weight-decomposed LoRA, which also "
                           "trains each layer's magnitude (per output row; saved as "
                           "dora_scale); for network type 'lora' on SD1/SD2/SDXL.",
                           label="DoRA (weight-decomposed)")
    wd_on_output: bool = option(True, "DoRA's norm per output row (LyCORIS's wd_on_output, its "
                                "default; ComfyUI, LyCORIS and diffusers' copy read it) or, "
                                "unticked, per input column (the older files A1111 reads).",
                                label="DoRA norm on the output axis")
    network_train_unet_only: bool = option(False, "Train the U-Net only (leave the text "
                                           "encoder as it is).", label="Train U-Net only")
    unet_lr: float = option(0.0, "U-Net learning rate; 0 uses the base learning rate.",
                            label="U-Net learning rate", min=0.0)
    text_encoder_lr: float = option(0.0, "Text-encoder learning rate; 0 uses the base learning "
                                    "rate.", label="Text encoder learning rate", min=0.0)
    preview_strength: float = option(1.0, "LoRA strength for sample images.",
                                     label="Sample strength", min=0.0, max=2.0)
    save_diffusers_format: bool = option(False, "Also write the LoRA in diffusers' (peft) format: "
                                         "models/Lora/<name>-diffusers/pytorch_lora_weights"
                                         ".safetensors, for load_lora_weights(folder).",
                                         label="Also save diffusers format")
    train_double_block_indices: str = option(
        "all", "Flux.1 / Chroma: which double-stream blocks get a LoRA — 'all', 'none' or "
        "indices and ranges such as '0-9,18' (kohya's train_double_block_indices).",
        label="Double blocks to train")
    train_single_block_indices: str = option(
        "all", "The same for the single-stream blocks (kohya's train_single_block_indices).",
        label="Single blocks to train")
    type_dims: str = option(
        "", "Flux.1 / Chroma: a rank per kind of layer, kohya's type_dims — e.g. 'img_attn=16, "
        "txt_attn=8, img_mlp=16, txt_mlp=8, img_mod=0, txt_mod=0, single=16, single_mod=0'; 0 "
        "leaves that kind untrained, 'name=rank/alpha' sets its alpha too; kinds not named keep "
        "the network rank and alpha.", label="Rank per layer type")
    fp8_base: bool = option(False, "Store the frozen U-Net / transformer's Linear and conv "
                            "weights in 8 bits (kohya's fp8_base): half of bf16's memory for "
                            "them, slightly less precise; needs mixed precision bf16 or fp16.",
                            label="fp8 base weights")
    blocks_to_swap: int = option(0, "Keep the frozen weights of the denoiser's last N blocks in "
                                 "CPU memory and copy each to the GPU just before it runs "
                                 "(kohya's / musubi-tuner's blocks_to_swap): less GPU memory, "
                                 "slower steps; 0 swaps none.", label="Blocks to swap", min=0,
                                 max=500)
    pivotal_tuning: bool = option(False, "Pivotal tuning: also train new token vectors that "
                                  "the captions' word (below) stands for, bundled in the LoRA "
                                  "file as A1111 reads them (SD 1.x / 2.x / SDXL).",
                                  label="Train new token (pivotal tuning)")
    pivotal_token: str = option("", "The new word, as the captions and prompts write it: "
                                "lowercase letters, digits, '_' and '-', not a word the text "
                                "encoder already has (e.g. 'ohwx').", label="Token")
    pivotal_vectors: int = option(2, "Vectors the word stands for (SDXL: per text encoder).",
                                  label="Vectors per token", min=1, max=75)
    pivotal_init_text: str = option("*", "The vectors start as these words' embeddings (spread "
                                    "over the vectors as A1111 does); empty starts at zeros.",
                                    label="Initialization text")
    pivotal_lr: float = option(1e-3, "Learning rate of the token vectors; 0 uses the base "
                               "learning rate.", label="Token learning rate", min=0.0)
    pivotal_stop_step: int = option(0, "The vectors stop training after this many steps (the "
                                    "LoRA goes on); 0 trains them to the end.",
                                    label="Stop token training after step", min=0)

    def validate(self) -> "LoraConfig":
        problems = self.kohya_problems()
        try:
            self.type_ranks()
        except ValueError as error:
            problems.append(f"type_dims: {error}")
        for name in BLOCK_FIELDS:
            try:
                block_indices(getattr(self, name), None)
            except ValueError as error:
                problems.append(f"{name}: {error}")
        if self.fp8_base and self.mixed_precision not in ("bf16", "fp16"):
            problems.append("fp8_base: needs mixed precision bf16 or fp16 (the 8-bit weights "
                            "are up-cast to it for each layer)")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            problems.append(f"lokr_factor: -1 (automatic) or 1 and more, got {self.lokr_factor}")
        if self.dora_wd and self.network_type != "lora":
            problems.append(f"dora_wd: DoRA is offered for network type 'lora' (peft's use_dora), "
                            f"not {self.network_type}; untick it or pick 'lora'")
        if not self.wd_on_output and not self.dora_wd:
            problems.append("wd_on_output: applies to DoRA only; tick dora_wd or leave it on")
        if self.dora_wd and not self.wd_on_output and self.save_diffusers_format:
            problems.append("save_diffusers_format: diffusers (peft) takes DoRA's norm on the "
                            "output axis only; untick it or tick wd_on_output")
        if self.dora_wd and self.fp8_base:
            problems.append("fp8_base: DoRA takes the norm of every base weight at each step; it "
                            "is not combined with 8-bit base weights here, untick one of them")
        if self.network_type in ("loha", "lokr") and self.save_diffusers_format:
            problems.append(f"save_diffusers_format: diffusers' format holds LoRA only, not "
                            f"{self.network_type}; untick it")
        problems += self.pivotal_problems()
        return accept(self, problems)

    def pivotal_problems(self) -> list[str]:
        if not self.pivotal_tuning:
            return []
        token = self.pivotal_token
        if not token.strip():
            return ["pivotal_token: pivotal tuning needs the new word, e.g. 'ohwx'"]
        if not PIVOTAL_TOKEN.match(token):
            return [f"pivotal_token: {token!r} may hold only lowercase letters, digits, '_' and "
                    "'-' (it is the word in captions, the embedding's file name and a key of "
                    "the LoRA file), at most 64 characters"]
        if self.cache_text_encoder_outputs:
            return ["cache_text_encoder_outputs: pivotal tuning trains token vectors through "
                    "the text encoder, so its outputs change every step and cannot be cached; "
                    "untick one of them"]
        return []

    def adapter_family_problems(self, family) -> list[str]:
        """Network types a model of `family` cannot train (LyCORIS types, DoRA: SD U-Nets
        only)."""
        sd_unet = family.prediction != "flow" and \
            family.lora_layout == "trainers.lora_network:UNET_LAYOUT"
        if self.dora_wd and not sd_unet:
            return [f"dora_wd: DoRA trains SD1/SD2/SDXL models only; {family.label} takes "
                    "plain 'lora'"]
        if self.network_type != "lora" and not sd_unet:
            return [f"network_type: {self.network_type} trains SD1/SD2/SDXL models only; "
                    f"{family.label} takes 'lora'"]
        return []

    def blocks(self) -> dict[str, str]:
        """LoraSpec.blocks: the block kinds whose choice is not 'all'."""
        return {kind: getattr(self, name) for kind, name in zip(("double", "single"),
                                                                 BLOCK_FIELDS)
                if getattr(self, name).strip().lower() != "all"}

    def type_ranks(self) -> dict[str, tuple[int, float | None]]:
        """LoraSpec.type_ranks from `type_dims`: layer type -> (rank, alpha or None)."""
        return parse_type_dims(self.type_dims)

    def family_problems(self, family) -> list[str]:
        """Options that do not apply to a model of `family` (its Family record)."""
        from trainers.families import resolve
        problems = []
        layer_types = resolve(family.lora_layout).layer_types
        unknown = [name for name in self.type_ranks() if name not in layer_types]
        if unknown:
            problems.append(f"type_dims: {family.label} has no {', '.join(unknown)} layers"
                            + (f" (its layer types: {', '.join(layer_types)})" if layer_types
                               else " (a rank per layer type is for Flux.1 and Chroma)"))
        if self.type_dims.strip() and self.network_type != "lora":
            problems.append("type_dims: a rank per layer type is for network type 'lora'")
        kinds = resolve(family.lora_layout).block_kinds
        problems += [f"train_{kind}_block_indices: {family.label} has no {kind}-stream blocks "
                     "(the block choice is for Flux.1 and Chroma)"
                     for kind in self.blocks() if kind not in kinds]
        if not self.network_train_unet_only and not resolve(family.lora_layout).trains_text_encoder:
            problems.append(f"network_train_unet_only: {family.label} has no text-encoder LoRA; "
                            "tick 'U-Net only'")
        if family.prediction == "flow":
            if self.pivotal_tuning:
                problems.append(f"pivotal_tuning: trains CLIP token vectors (SD 1.x / 2.x / "
                                f"SDXL); {family.label} is a flow-matching model without them")
            if self.conv_dim:
                problems.append(f"conv_dim: {family.label} has no convolutions to adapt "
                                "(LoCon is for SD U-Nets); set it to 0")
        return problems + self.flow_family_problems(family)

    def frozen_dtype(self) -> str:
        # the LoRA factors train in fp32 beside the frozen base weights
        if self.fp8_base:
            return "fp8"
        return self.mixed_precision if self.mixed_precision in ("bf16", "fp16") else "fp32"

    def trainable_parameters(self, unet: float, text: float,
                             lora_per_rank: tuple[float, float] = (0.0, 0.0)) -> float:
        denoiser, text_part = lora_per_rank
        linear = denoiser + (0 if self.network_train_unet_only else text_part)
        return linear * self.network_dim + 0.5 * denoiser * self.conv_dim  # LoCon: a rough half


@dataclass
class FullModelConfig(FlowMatchingFields, KohyaTrainingConfig):
    """Options of the methods that train the whole model (DreamBooth, native fine-tuning)."""
    # full fine-tuning wants a far smaller rate than LoRA (diffusers' DreamBooth default)
    learning_rate: float = option(5e-6, "Base learning rate.", label="Learning rate", min=0.0)
    log_directory: str = option("outputs/dreambooth", "Run folders: checkpoints, samples, loss "
                                "CSV, settings.", label="Log directory", path="data")
    save_every_n_epochs: int = option(0, "Save a checkpoint every N epochs; 0 disables (each "
                                      "is a whole model).", label="Save every N epochs", min=0)
    train_text_encoder: bool = option(False, "Fine-tune the text encoder too.",
                                      label="Train text encoder")
    text_encoder_lr: float = option(0.0, "Text-encoder learning rate; 0 uses the base rate.",
                                    label="Text encoder learning rate", min=0.0)
    stop_text_encoder_training: int = option(0, "Stop training the text encoder after this many "
                                             "steps; 0 never stops.",
                                             label="Stop text encoder after N steps", min=0)
    use_ema: bool = option(False, "Keep an exponential moving average of the U-Net weights and "
                           "save it (smoother results, one more copy of the U-Net in memory).",
                           label="EMA of weights")
    ema_decay: float = option(0.9999, "EMA decay per step.", label="EMA decay", min=0.0, max=1.0)
    save_diffusers: bool = option(False, "Also save a diffusers folder beside the file.",
                                  label="Also save diffusers folder")
    fused_backward_pass: bool = option(False, "Step each weight as soon as its gradient is "
                                       "ready and free that gradient (kohya's "
                                       "fused_backward_pass): the whole model's gradients never "
                                       "exist at once. AdamW or Adafactor, no gradient "
                                       "accumulation, max grad norm 0, not fp16.",
                                       label="Fused backward pass")
    full_bf16: bool = option(False, "Keep the whole model in bf16 while it trains (kohya's "
                             "full_bf16): half the memory of fp32 weights and gradients; each "
                             "step is taken in fp32 and rounded back stochastically, so small "
                             "updates are not lost. Needs mixed precision bf16.",
                             label="Full bf16 (stochastic rounding)")
    full_fp16: bool = option(False, "Keep the whole model in fp16 while it trains (kohya's "
                             "full_fp16), for cards without bf16 (a T4): half the memory of fp32 "
                             "weights and gradients; the loss is scaled so small gradients do not "
                             "vanish (steps whose gradients overflow are skipped and said), each "
                             "step is taken in fp32 and rounded back stochastically. Needs mixed "
                             "precision fp16.", label="Full fp16 (loss scaling, stochastic "
                                                      "rounding)")

    def full_model_problems(self) -> list[str]:
        problems = self.kohya_problems()
        if self.fused_backward_pass:
            from trainers.fused_backward import problems as fused_problems
            problems += [f"{p} (fused_backward_pass)" for p in fused_problems(
                self.optimizer_type, self.gradient_accumulation_steps, self.max_grad_norm,
                self.mixed_precision, self.on_nan)]
        if self.full_bf16 and self.mixed_precision != "bf16":
            problems.append("full_bf16: needs mixed precision bf16 (the whole model computes in "
                            f"it), got {self.mixed_precision!r}")
        if self.full_fp16 and self.full_bf16:
            problems.append("full_fp16: the whole model is kept in fp16 or in bf16 (full_bf16), "
                            "not both; untick one")
        elif self.full_fp16 and self.mixed_precision != "fp16":
            problems.append("full_fp16: needs mixed precision fp16 (the whole model computes in "
                            f"it), got {self.mixed_precision!r}")
        return problems

    def family_problems(self, family) -> list[str]:
        """Options that do not apply to a model of `family`: a flow family's text encoders
        stay frozen (as in kohya's flux_train and musubi-tuner), and the flow / SD options."""
        problems = []
        if family.prediction == "flow" and self.train_text_encoder:
            problems.append(f"train_text_encoder: {family.label} full fine-tuning trains the "
                            "transformer only; untick it")
        if family.prediction == "flow" and self.full_fp16:
            problems.append(f"full_fp16: {family.label} is a bf16 model whose activations "
                            "overflow fp16; use full_bf16")
        return problems + self.flow_family_problems(family)

    def trainable_parameters(self, unet: float, text: float,
                             lora_per_rank: tuple[float, float] = (0.0, 0.0)) -> float:
        return unet + (text if self.train_text_encoder else 0)


@dataclass
class DreamBoothConfig(FullModelConfig):
    form: ClassVar[cf.FormLayout] = cf.FormLayout(
        cf.DREAMBOOTH_GROUPS, top=["output_name", "model"],
        overrides={"sample_prompts": {"lines": 3}})
    instance_prompt: str = option("", "Caption for instance images without a caption file, e.g. "
                                  "'a photo of sks dog' (repeats folders use their class tokens).",
                                  label="Instance prompt")
    class_prompt: str = option("", "Prompt of the class images, e.g. 'a photo of a dog'.",
                               label="Class prompt")
    class_data_dir: str = option("", "Folder of class (regularization) images; missing ones are "
                                 "generated here by the base model.", label="Class images folder",
                                 path="data")
    num_class_images: int = option(0, "Class images wanted for prior preservation; 0 turns prior "
                                   "preservation off.", label="Number of class images", min=0,
                                   max=100_000)
    prior_loss_weight: float = option(1.0, "Weight of the class images' loss.",
                                      label="Prior loss weight", min=0.0, max=100.0)

    def validate(self) -> "DreamBoothConfig":
        problems = self.full_model_problems()
        if self.num_class_images and not self.class_data_dir.strip():
            problems.append("class_data_dir: choose a folder for the class images (needed when "
                            "num_class_images is more than 0)")
        if self.num_class_images and not self.class_prompt.strip():
            problems.append("class_prompt: needed to generate class images (num_class_images "
                            "is more than 0)")
        return accept(self, problems)


@dataclass
class FineTuneConfig(FullModelConfig):
    """kohya's native fine-tuning: captions and tags from a metadata JSON, latents cached as
    .npz beside the images, the whole U-Net (and optionally the text encoder) trained."""
    form: ClassVar[cf.FormLayout] = cf.FormLayout(
        cf.FINE_TUNE_GROUPS, top=["output_name", "model"],
        overrides={"sample_prompts": {"lines": 3}}, tools=("metadata_json",),
        # fine-tuning reads its images from the JSON and always caches to .npz
        hidden=["reg_data_dir", "dataset_config", "cache_latents_to_disk"])
    learning_rate: float = option(2e-6, "Base learning rate.", label="Learning rate", min=0.0)
    train_data_dir: str = option("", "Folder of the images the metadata JSON names (their "
                                 "latents are cached here as <image>.npz).", label="Image folder",
                                 path="data")
    in_json: str = option("", "Metadata JSON: {image key: {\"caption\", \"tags\", "
                          "\"train_resolution\"}}, keys being file stems (or full paths). "
                          "Build it with 'Make metadata JSON'.", label="Metadata JSON",
                          path="data")
    dataset_repeats: int = option(1, "How many times each image appears per epoch.",
                                  label="Repeats", min=1, max=10_000)
    log_directory: str = option("outputs/fine_tune", "Run folders: checkpoints, samples, loss "
                                "CSV, settings.", label="Log directory", path="data")
    caption_extension: str = option(".caption", "Caption files merged into the JSON by 'Make "
                                    "metadata JSON'.", label="Caption extension")
    tag_extension: str = option(".txt", "Tag files (e.g. WD14 / DeepDanbooru output) merged into "
                                "the JSON by 'Make metadata JSON'.", label="Tag extension")
    clean_captions: bool = option(True, "When making the JSON: tidy captions and tags (underscores "
                                  "to spaces, rating tags and duplicates removed).",
                                  label="Clean captions and tags")
    anime_caption_rules: bool = option(False, "When making the JSON: kohya's caption "
                                       "replacements for captions of anime pictures ('anime "
                                       "girl', 'woman', 'person', 'lady' ... become 'girl', "
                                       "'young' is dropped).", label="Anime caption rules")

    def validate(self) -> "FineTuneConfig":
        problems = self.full_model_problems()
        if not self.in_json.strip():
            problems.append("in_json: choose the metadata JSON")
        if self.dataset_config.strip():
            problems.append("dataset_config: fine-tuning reads its images from the metadata JSON; "
                            "leave the dataset config empty")
        if self.reg_data_dir.strip():
            problems.append("reg_data_dir: fine-tuning has no regularization images; leave it empty")
        if self.validation_data_dir.strip():
            problems.append("validation_data_dir: fine-tuning's captions come from the metadata "
                            "JSON; hold out a share of it with validation_split instead")
        for name in ("caption_extension", "tag_extension"):
            value = getattr(self, name)
            if not value.startswith(".") or len(value) < 2:
                problems.append(f"{name}: must start with a dot, like '.txt', got {value!r}")
        return accept(self, problems)

    def check_data(self, paths) -> None:  # images and captions come from the metadata JSON
        from trainers.methods.fine_tune import check_dataset
        check_dataset(self, paths)


@dataclass
class ExtractLoraConfig(NamesFiles):
    form: ClassVar[cf.FormLayout] = cf.FormLayout(
        [("Extraction", ["rank", "conv_rank", "save_precision", "overwrite"], True)],
        top=["checkpoint", "model", "output_name"])
    checkpoint: str = option("", "The fine-tuned model (e.g. a DreamBooth result) in "
                             "models/Stable-diffusion.", label="Fine-tuned checkpoint",
                             path="model")
    model: str = option("", "The base model it was trained from.", label="Base model", path="model")
    output_name: str = option("", "Name of the LoRA file in models/Lora.", label="Output name")
    rank: int = option(32, "Rank of the extracted LoRA: higher keeps more of the difference.",
                       label="Rank", min=1, max=1024)
    conv_rank: int = option(0, "Rank for the U-Net's ResNet convolutions (LoCon), which "
                            "DreamBooth changes too; 0 leaves them out.", label="Conv rank",
                            min=0, max=1024)
    save_precision: str = option("fp16", "Precision of saved weights.", label="Save precision",
                                 choices=SAVE_PRECISIONS)
    overwrite: bool = option(False, "Replace an existing LoRA of this name.", label="Overwrite")

    def validate(self) -> "ExtractLoraConfig":
        problems = check_limits(self) + check_name("output_name", self.output_name)
        if not self.checkpoint.strip():
            problems.append("checkpoint: choose the fine-tuned model")
        if not self.model.strip():
            problems.append("model: choose the base model")
        if self.checkpoint.strip() and self.checkpoint.strip() == self.model.strip():
            problems.append("checkpoint: must differ from the base model")
        return accept(self, problems)

    def file_problems(self, paths) -> list[str]:
        return super().file_problems(paths) + lora_output_problems(paths, self.output_name,
                                                                   self.overwrite)


def lora_output_problems(paths, output_name: str, overwrite: bool) -> list[str]:
    """The LoRA tools' output in models/Lora: an existing file is replaced only with Overwrite
    (checked before queueing; the tool checks again when it writes)."""
    name = output_name.strip()
    if name and not overwrite and (paths.lora / f"{name}.safetensors").exists():
        return [f"output_name: {name}.safetensors exists in {paths.lora}; tick 'Overwrite' to "
                "replace it"]
    return []


@dataclass
class ResizeLoraConfig(NamesFiles):
    """A kohya LoRA / LoCon file made smaller: each layer's weight change cut to a lower rank
    by SVD (trainers/resize_lora.py)."""
    form: ClassVar[cf.FormLayout] = cf.FormLayout(
        [("Resize", ["rank", "conv_rank", "dynamic_method", "dynamic_param", "save_precision",
                     "overwrite"], True)],
        top=["lora", "output_name"])
    lora: str = option("", "The LoRA file in models/Lora to resize (it is not changed).",
                       label="LoRA", path="lora")
    output_name: str = option("", "Name of the resized file in models/Lora.",
                              label="Output name")
    rank: int = option(8, "New rank: lower is smaller and keeps less of the LoRA's change; a "
                       "layer already at this rank or lower stays as it is; with a dynamic "
                       "method, the most a layer gets.", label="Rank",
                       min=1, max=1024)
    conv_rank: int = option(0, "New rank for LoCon's 3x3 convolutions; 0 uses Rank.",
                            label="Conv rank", min=0, max=1024)
    dynamic_method: str = option(
        "none", "none: every layer cut to Rank. Otherwise each layer gets its own rank from its "
        "singular values S (kohya's resize_lora), Rank / Conv rank being the most: sv_ratio "
        "keeps those above the largest / Dynamic param; sv_cumulative the fewest whose sum "
        "reaches that share of sum(S); sv_fro the fewest keeping that share of the Frobenius "
        "norm.", label="Dynamic method", choices=["none", "sv_ratio", "sv_fro", "sv_cumulative"])
    dynamic_param: float = option(
        0.0, "The dynamic method's target: sv_ratio a ratio above 1 (e.g. 8); sv_cumulative and "
        "sv_fro a share in (0, 1] (e.g. 0.9). 0 with no method.", label="Dynamic param")
    save_precision: str = option("fp16", "Precision of saved weights.", label="Save precision",
                                 choices=SAVE_PRECISIONS)
    overwrite: bool = option(False, "Replace an existing LoRA of the output name.",
                             label="Overwrite")

    def validate(self) -> "ResizeLoraConfig":
        problems = [p for p in check_limits(self) if not p.startswith("dynamic_method:")]
        problems += check_name("output_name", self.output_name)
        method, param = str(self.dynamic_method).strip(), self.dynamic_param
        numeric = isinstance(param, (int, float)) and not isinstance(param, bool)
        if method == "none":
            if numeric and param != 0:
                problems.append("dynamic_param: set only with a dynamic_method (sv_ratio, "
                                "sv_fro or sv_cumulative); 0 for a fixed rank")
        elif method == "sv_ratio":
            if numeric and not param > 1:
                problems.append(f"dynamic_param: sv_ratio needs a ratio above 1 (the largest "
                                f"singular value over the smallest kept), not {param:g}")
        elif method in ("sv_fro", "sv_cumulative"):
            if numeric and not 0 < param <= 1:
                problems.append(f"dynamic_param: {method} needs a share in (0, 1], not "
                                f"{param:g}")
        else:
            problems.append(f"dynamic_method: {method!r} is not one of sv_ratio, sv_fro, "
                            "sv_cumulative or none (a fixed rank)")
        if not self.lora.strip():
            problems.append("lora: choose the LoRA to resize")
        elif Path(self.lora.strip()).stem == self.output_name.strip():
            problems.append("output_name: choose a name other than the LoRA's own (it is kept)")
        return accept(self, problems)

    def file_problems(self, paths) -> list[str]:
        problems = super().file_problems(paths)
        name = self.lora.strip()
        if name and not problems and not (paths.lora / name).is_file():
            problems.append(f"lora: no file {name!r} in {paths.lora}")
        return problems + lora_output_problems(paths, self.output_name, self.overwrite)


@dataclass
class MergeLoraConfig(NamesFiles):
    """Several kohya LoRA files merged into one, each at its weight (trainers/merge_lora.py)."""
    form: ClassVar[cf.FormLayout] = cf.FormLayout(
        [("Merge", ["rank", "save_precision", "overwrite"], True)], top=["loras", "output_name"],
        overrides={"loras": {"lines": 2}})
    loras: str = option("", "LoRA files in models/Lora with their weights, e.g. "
                        "'style.safetensors: 0.7, face.safetensors: 1'.",
                        label="LoRAs and weights")
    output_name: str = option("", "Name of the merged file in models/Lora.", label="Output name")
    rank: int = option(0, "0 keeps every file's whole change (the ranks add up); a rank cuts "
                       "each merged layer to it by SVD.", label="Rank", min=0, max=1024)
    save_precision: str = option("fp16", "Precision of saved weights.", label="Save precision",
                                 choices=SAVE_PRECISIONS)
    overwrite: bool = option(False, "Replace an existing LoRA of the output name.",
                             label="Overwrite")

    def weighted(self) -> list[tuple[str, float]]:
        """[(file name, weight)] from `loras` (ConfigError naming `loras` when malformed)."""
        pairs, problems = weighted_names(self.loras)
        if len(pairs) < 2 and not problems:
            problems.append("loras: name at least two LoRA files, e.g. 'a.safetensors: 0.5, "
                            "b.safetensors: 0.5'")
        if problems:
            raise ConfigError(problems)
        return pairs

    def validate(self) -> "MergeLoraConfig":
        problems = check_limits(self) + check_name("output_name", self.output_name)
        try:
            names = [name for name, _ in self.weighted()]
            if f"{self.output_name.strip()}.safetensors" in names:
                problems.append("output_name: choose a name other than a merged file's (they "
                                "are kept)")
        except ConfigError as error:
            problems += error.problems
        return accept(self, problems)

    def file_problems(self, paths) -> list[str]:
        problems = super().file_problems(paths)
        for name, _ in self.weighted():
            if not (paths.lora / name).is_file():
                problems.append(f"loras: no file {name!r} in {paths.lora}")
        return problems + lora_output_problems(paths, self.output_name, self.overwrite)


def weighted_names(text: str, field: str = "loras") -> tuple[list[tuple[str, float]], list[str]]:
    """([(file name, weight)], problems) from "a.safetensors: 0.7, b.safetensors" (no weight
    is 1); each name must be a bare file name."""
    pairs, problems = [], []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, _, weight = entry.partition(":")
        name, weight = name.strip(), weight.strip() or "1"
        problems += check_name(field, name)
        try:
            pairs.append((name, float(weight)))
        except ValueError:
            problems.append(f"{field}: {weight!r} is not a weight (write name: 0.5)")
    return pairs, problems


def checkpoint_output_problems(paths, output_name: str, overwrite: bool) -> list[str]:
    """A merged checkpoint's output in models/Stable-diffusion, as lora_output_problems."""
    name = output_name.strip()
    if name and not overwrite and (paths.stable_diffusion / f"{name}.safetensors").exists():
        return [f"output_name: {name}.safetensors exists in {paths.stable_diffusion}; tick "
                "'Overwrite' to replace it"]
    return []


@dataclass
class MergeIntoCheckpointConfig(NamesFiles):
    """LoRA / LoCon / LyCORIS files added into a base model's weights, saved as one
    original-layout checkpoint (trainers/merge_into_checkpoint.py)."""
    form: ClassVar[cf.FormLayout] = cf.FormLayout(
        [("Merge", ["save_precision", "overwrite"], True)], top=["model", "loras", "output_name"],
        overrides={"loras": {"lines": 2}})
    model: str = option("", "The base model (SD 1.x, SD 2.x or SDXL) the LoRAs are merged into; "
                        "it is not changed.", label="Base model", path="model")
    loras: str = option("", "LoRA files in models/Lora with their weights, e.g. "
                        "'style.safetensors: 0.7, face.safetensors: 1' (LoHa / LoKr too).",
                        label="LoRAs and weights")
    output_name: str = option("", "Name of the merged checkpoint in models/Stable-diffusion.",
                              label="Output name")
    save_precision: str = option("fp16", "Precision of saved weights.", label="Save precision",
                                 choices=SAVE_PRECISIONS)
    overwrite: bool = option(False, "Replace an existing checkpoint of the output name.",
                             label="Overwrite")

    def weighted(self) -> list[tuple[str, float]]:
        pairs, problems = weighted_names(self.loras)
        if not pairs and not problems:
            problems.append("loras: name at least one LoRA file, e.g. 'style.safetensors: 0.8'")
        if problems:
            raise ConfigError(problems)
        return pairs

    def validate(self) -> "MergeIntoCheckpointConfig":
        problems = check_limits(self) + check_name("output_name", self.output_name)
        if not self.model.strip():
            problems.append("model: choose the base model")
        elif Path(self.model.strip()).name == f"{self.output_name.strip()}.safetensors":
            problems.append("output_name: choose a name other than the base model's (it is kept)")
        try:
            self.weighted()
        except ConfigError as error:
            problems += error.problems
        return accept(self, problems)

    def file_problems(self, paths) -> list[str]:
        problems = super().file_problems(paths)
        for name, _ in self.weighted():
            if not (paths.lora / name).is_file():
                problems.append(f"loras: no file {name!r} in {paths.lora}")
        return problems + checkpoint_output_problems(paths, self.output_name, self.overwrite)


# sigma_rel at which the power-function EMA is the plain average (gamma = 0, Karras et al.)
EQUAL_AVERAGE_SIGMA_REL = 12 ** -0.5


@dataclass
class LoraEmaConfig(NamesFiles):
    """A training run's periodic LoRA copies averaged in step order: post-hoc EMA
    (trainers/lora_ema.py)."""
    form: ClassVar[cf.FormLayout] = cf.FormLayout(
        [("Average", ["decay", "decay_end", "sigma_rel", "from_step", "include_final",
                      "save_precision", "overwrite"], True)], top=["run_folder", "output_name"])
    run_folder: str = option("", "The training run's folder (outputs/<log>/<date>/<name>) or its "
                             "checkpoints folder: its numbered copies are averaged in step order.",
                             label="Run folder", path="data")
    output_name: str = option("", "Name of the averaged LoRA in models/Lora.", label="Output name")
    decay: float = option(0.95, "EMA decay (beta): each later copy gets 1 - decay of the average; "
                          "0 keeps only the last copy, closer to 1 keeps more of the early ones.",
                          label="Decay", min=0.0, max=1.0)
    decay_end: float = option(-1.0, "Decay for the last copy, moving linearly from Decay over "
                              "the copies; -1 keeps Decay throughout.", label="Decay at the end",
                              min=-1.0, max=1.0)
    sigma_rel: float = option(0.0, "Power-function EMA (EDM2) of this relative width instead of "
                              "Decay, e.g. 0.1; 0 is off, 0.2887 is the plain average.",
                              label="Sigma rel", min=0.0, max=round(EQUAL_AVERAGE_SIGMA_REL, 4))
    from_step: int = option(0, "Leave out copies saved before this step.", label="From step",
                            min=0)
    include_final: bool = option(True, "Also the run's final LoRA file, when it is newer than "
                                 "the last copy.", label="Include the final file")
    save_precision: str = option("fp16", "Precision of saved weights.", label="Save precision",
                                 choices=SAVE_PRECISIONS)
    overwrite: bool = option(False, "Replace an existing LoRA of the output name.",
                             label="Overwrite")

    def validate(self) -> "LoraEmaConfig":
        problems = check_limits(self) + check_name("output_name", self.output_name)
        if not self.run_folder.strip():
            problems.append("run_folder: choose the training run's folder")
        if -1.0 < self.decay_end < 0.0:
            problems.append("decay_end: -1 (off) or between 0 and 1")
        return accept(self, problems)

    def file_problems(self, paths) -> list[str]:
        problems = super().file_problems(paths)
        if not problems and self.run_folder.strip() and \
                not paths.resolve(self.run_folder, "run_folder").is_dir():
            problems.append(f"run_folder: no folder {self.run_folder.strip()!r}")
        return problems + lora_output_problems(paths, self.output_name, self.overwrite)


@dataclass
class CheckLoraConfig(NamesFiles):
    """A LoRA-family file checked against the key maps of A1111, ComfyUI and diffusers
    (trainers/formats/key_check.py); it writes nothing."""
    lora: str = option("", "The LoRA / LoCon / LoHa / LoKr file: a name in models/Lora or a "
                       "path.", label="LoRA", path="lora")
    family: str = option("auto", "The base model family to check against; auto reads it from "
                         "the file's metadata (or its layer names).", label="Family",
                         choices=["auto", *CHECK_FAMILIES])

    def validate(self) -> "CheckLoraConfig":
        problems = check_limits(self)
        if not self.lora.strip():
            problems.append("lora: choose the LoRA file to check")
        return accept(self, problems)

    def file_problems(self, paths) -> list[str]:
        problems = super().file_problems(paths)
        if not problems and self.lora.strip() and self.lora_path(paths) is None:
            problems.append(f"lora: no file {self.lora.strip()!r} in {paths.lora} or the data "
                            "folder")
        return problems

    def lora_path(self, paths) -> Path | None:
        """The file: a name in models/Lora first, then a path from the data folder."""
        for typed in (paths.lora / self.lora.strip(), self.lora.strip()):
            path = paths.resolve(typed, "lora")
            if path.is_file():
                return path
        return None


@dataclass
class AestheticEmbeddingConfig(NamesFiles):
    name: str = option("", "File name in models/aesthetic_embeddings (A1111's aesthetic-gradients "
                       "extension reads the same .pt).", label="Name")
    data_root: str = option("", "Folder of images whose look the embedding captures.",
                            label="Source images", path="data")
    clip_model: str = option("models/CLIP/clip-vit-large-patch14", "Local CLIP model folder "
                             "(CLIPModel, or a CLIPVisionModelWithProjection); SD1 pairs with "
                             "ViT-L/14.", label="CLIP model folder", path="data")
    batch_size: int = option(8, "Images per CLIP forward pass.", label="Batch size", min=1,
                             max=256)
    overwrite: bool = option(False, "Replace an existing aesthetic embedding of this name.",
                             label="Overwrite")

    def validate(self) -> "AestheticEmbeddingConfig":
        problems = check_limits(self) + check_name("name", self.name)
        if not self.data_root.strip():
            problems.append("data_root: choose a folder of images")
        if not self.clip_model.strip():
            problems.append("clip_model: choose a local CLIP model folder")
        return accept(self, problems)


@dataclass
class AestheticPreviewConfig(NamesFiles):
    model: str = option("", "Base model to render with.", label="Base model", path="model")
    aesthetic_embedding: str = option("", "From models/aesthetic_embeddings.",
                                      label="Aesthetic embedding", path="aesthetic")
    clip_model: str = option("models/CLIP/clip-vit-large-patch14", "The CLIP model (with its text "
                             "tower) the embedding was made with.", label="CLIP model folder",
                             path="data")
    prompt: str = option("", "Prompt to render.", label="Prompt")
    negative: str = option("", "Negative prompt.", label="Negative prompt")
    aesthetic_steps: int = option(5, "Adam steps on a copy of the CLIP text tower per prompt "
                                  "(the cost grows with them).", label="Aesthetic steps", min=0,
                                  max=50)
    aesthetic_lr: float = option(1e-4, "Learning rate of those steps.",
                                 label="Aesthetic learning rate", min=0.0, max=1.0)
    aesthetic_weight: float = option(0.9, "How much of the steered conditioning is mixed in.",
                                     label="Aesthetic weight", min=0.0, max=1.0)
    aesthetic_slerp: bool = option(False, "Mix the steered conditioning in by spherical "
                                   "interpolation (by the weight) instead of linearly.",
                                   label="Slerp interpolation")
    aesthetic_text: str = option("", "A text whose CLIP embedding turns the aesthetic "
                                 "embedding toward it (by the slerp angle) before steering.",
                                 label="Aesthetic text for imgs")
    aesthetic_slerp_angle: float = option(0.1, "How far toward the aesthetic text: 0 keeps the "
                                          "images' embedding, 1 is the text's.",
                                          label="Slerp angle", min=0.0, max=1.0)
    aesthetic_text_negative: bool = option(False, "Steer away from the aesthetic text instead.",
                                           label="Is negative text")
    seed: int = option(42, "Seed of both images (plain and steered).", label="Seed", min=0)
    steps: int = option(20, "Sampling steps.", label="Sampling steps", min=1, max=150)
    cfg_scale: float = option(7.0, "Classifier-free guidance scale.", label="CFG scale", min=1.0,
                              max=30.0)
    sampler: str = option("Euler a", "Sampler.", label="Sampler", choices=SAMPLERS)
    width: int = option(512, "Width in pixels.", label="Width", min=8, max=2048, multiple_of=8)
    height: int = option(512, "Height in pixels.", label="Height", min=8, max=2048, multiple_of=8)
    clip_skip: int = option(1, "Use the text encoder's N-th layer from the end.",
                            label="CLIP skip", min=1, max=12)

    def validate(self) -> "AestheticPreviewConfig":
        problems = check_limits(self)
        for name in ("model", "aesthetic_embedding", "clip_model"):
            if not getattr(self, name).strip():
                problems.append(f"{name}: required")
        return accept(self, problems)


FLOW_FIELDS = ("timestep_sampling", "discrete_flow_shift", "sigmoid_scale", "weighting_scheme",
               "guidance_scale")
FLOW_DEFAULTS = {name: FlowMatchingFields.__dataclass_fields__[name].default
                 for name in FLOW_FIELDS}


BLOCK_FIELDS = ("train_double_block_indices", "train_single_block_indices")


def parse_type_dims(text: str) -> dict[str, tuple[int, float | None]]:
    """'img_attn=16, txt_mod=0, single=8/4' -> {type: (rank, alpha or None)} (ValueError naming
    the bad part). Types are checked against the model's layout when the family is known."""
    out: dict[str, tuple[int, float | None]] = {}
    for part in (p.strip() for p in (text or "").replace(";", ",").split(",")):
        if not part:
            continue
        name, sep, value = (s.strip() for s in part.partition("="))
        name = name.removesuffix("_dim")  # kohya's network_args spell them img_attn_dim=...
        rank_text, _, alpha_text = (s.strip() for s in value.partition("/"))
        try:
            rank = int(rank_text)
            alpha = float(alpha_text) if alpha_text else None
        except ValueError:
            raise ValueError(f"'{part}' is not name=rank or name=rank/alpha") from None
        if not sep or not name or rank < 0 or (alpha is not None and alpha < 0):
            raise ValueError(f"'{part}': a layer type, then = a rank of 0 or more (and "
                             "optionally / an alpha of 0 or more)")
        if name in out:
            raise ValueError(f"{name} is given twice")
        out[name] = (rank, alpha)
    return out


def block_indices(text: str, count: int | None) -> list[int]:
    """kohya's block choice: 'all', 'none' or '0,2,4-7' -> sorted indices (all of `count`
    for 'all'); ValueError naming what is wrong, an index past `count` included."""
    text = str(text).strip().lower()
    if text == "all":
        return list(range(count or 0))
    if text in ("none", ""):
        return []
    chosen = set()
    for part in (p.strip() for p in text.split(",")):
        first, dash, last = part.partition("-")
        if not (first.strip().isdigit() and (not dash or last.strip().isdigit())):
            raise ValueError(f"{part!r} is not an index or a range (write 'all', 'none' or "
                             "'0-9,18')")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"{part!r} runs backwards")
        chosen.update(range(low, high + 1))
    if count is not None and chosen and max(chosen) >= count:
        raise ValueError(f"index {max(chosen)} is past the model's {count} blocks")
    return sorted(chosen)
