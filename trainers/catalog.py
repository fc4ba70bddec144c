"""The method catalog: one torch-free record per training method, saying everything the rest of
the house knows about it — its title, config, entry point, where its files go, what a checkpoint
is and how one is applied to a pipeline. The page, the CLI, run history, Compare, *Use this
checkpoint*, launch and the preflight read it; a new method is one record here (or `register`ed
from its own module) and its own module.

Entry points are "module:function" strings, imported only when called, so reading the catalog
imports no torch."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from core.registry import Registry
from trainers import configs
from trainers.apt_prompts import NEGATIVE_SUFFIX

# the U-Net families (trainers/families/) every method here was built for; a method lists
# the families it trains, so a new family is offered only by the methods that opt in
SD_FAMILIES = ("sd1", "sd2", "sdxl")
# the flow-matching transformer families: LoRA, and DreamBooth / fine-tuning of the transformer
FLOW_FAMILIES = ("flux1", "zimage", "chroma", "flux2_klein", "qwen_image")


@dataclass(frozen=True)
class Method:
    name: str  # the CLI verb and the key in run settings, e.g. "lora"
    title: str  # what the page, job names and run history call it
    config: type  # its typed config (trainers/configs.py)
    run: str  # "module:function" taking (cfg, ctx)
    target_field: str = "output_name"  # the config field that names what it makes
    final_folder: str = "models/Lora"  # where finished files live, under the data folder
    suffixes: tuple[str, ...] = (".safetensors",)  # files that share a name there
    checkpoint_kind: str = "network"  # embedding | hypernetwork | network | model | layers
    strength: bool = False  # a checkpoint is applied at a strength (Compare rows)
    prompt_names_it: bool = False  # prompts use the run's name as a token
    step_schedule: bool = False  # A1111-style `steps` + learning-rate schedule string
    # each checkpoint comes with a partner embedding `<name><suffix>` for the negative prompt,
    # which the run's settings name under `negative_embedding` (APT: "-neg"); "" for none
    negative_partner: str = ""
    parallel: bool = False  # trains data-parallel under accelerate
    apply: str | None = None  # "module:function": context manager applying a checkpoint
    families: tuple[str, ...] = SD_FAMILIES
    loss_csv: str = "loss.csv"  # the loss log in its run folder (A1111's names for its methods)
    copies_folder: str = "checkpoints"  # the run folder's subfolder of numbered checkpoints
    # what marks a run folder without Danlu's settings (A1111's own log folders) as this method's
    run_marks: tuple[str, ...] = ()
    help: str = ""  # one line for --list

    @property
    def comparable(self) -> bool:
        return self.apply is not None

    def runner(self):
        return _resolve(self.run)

    def applier(self):
        if self.apply is None:
            raise ValueError(f"comparing {self.title} checkpoints is not supported")
        return _resolve(self.apply)


_METHODS: Registry[Method] = Registry("method")


def register(method: Method) -> Method:
    """Add a method (a test's toy method, or a plug-in); a name is registered once."""
    return _METHODS.add(method.name, method)


unregister = _METHODS.remove
get = _METHODS.get  # KeyError naming the known methods
find = _METHODS.find  # None when unknown
names = _METHODS.names
methods = _METHODS.records


def family_problem(method: Method, family: str, model_name: str) -> str | None:
    """What is wrong when `method` is asked to train a model of `family`; None when it can."""
    from trainers import families
    if family in method.families:
        return None
    labels = ", ".join(families.get(f).label for f in method.families)
    return (f"model: {model_name} is a {families.get(family).label} model; {method.title} "
            f"trains {labels} models")


def require_family(name: str, model, model_name: str) -> None:
    """FamilyError when loaded `model` is of a family method `name` does not train."""
    from trainers.families import FamilyError
    problem = family_problem(get(name), model.family, model_name)
    if problem:
        raise FamilyError(problem)


def for_config(config: type) -> Method | None:
    return next((m for m in methods() if m.config is config), None)


def _resolve(target: str):
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


_EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")
_MODEL_SUFFIXES = (".safetensors", ".ckpt")
_APPLY = "trainers.checkpoint_apply:"
_TI_CSV = "textual_inversion_loss.csv"

for _method in (
    Method("textual_inversion", "Textual inversion", configs.TextualInversionConfig,
           "trainers.methods.textual_inversion:run", target_field="embedding",
           final_folder="embeddings", suffixes=_EMBEDDING_SUFFIXES, checkpoint_kind="embedding",
           prompt_names_it=True, step_schedule=True, parallel=True,
           apply=_APPLY + "embedding", loss_csv=_TI_CSV, run_marks=(_TI_CSV, "embeddings"),
           copies_folder="embeddings",
           help="A1111's textual inversion"),
    Method("apt", "APT / DreamArtist", configs.AptConfig, "trainers.methods.apt:run",
           target_field="embedding", final_folder="embeddings", suffixes=_EMBEDDING_SUFFIXES,
           checkpoint_kind="embedding", prompt_names_it=True, step_schedule=True,
           negative_partner=NEGATIVE_SUFFIX, apply=_APPLY + "embedding_pair",
           families=("sd1", "sd2"), loss_csv=_TI_CSV, copies_folder="embeddings",
           help="a positive and a negative embedding trained together"),
    Method("xti", "XTI (P+)", configs.XtiConfig, "trainers.methods.xti:run",
           final_folder="models/xti", suffixes=(".safetensors", ".pt"), checkpoint_kind="layers",
           prompt_names_it=True, step_schedule=True, apply=_APPLY + "xti",
           families=("sd1", "sd2"), loss_csv=_TI_CSV, copies_folder="xti",
           help="one embedding per U-Net cross-attention layer"),
    Method("hypernetwork", "Hypernetwork", configs.HypernetworkTrainingConfig,
           "trainers.methods.hypernetwork:run", target_field="hypernetwork",
           final_folder="models/hypernetworks", suffixes=(".pt",),
           checkpoint_kind="hypernetwork", strength=True, step_schedule=True, parallel=True,
           apply=_APPLY + "hypernetwork", loss_csv="hypernetwork_loss.csv",
           run_marks=("hypernetwork_loss.csv", "hypernetworks"), copies_folder="hypernetworks",
           help="A1111's hypernetwork"),
    Method("lora", "LoRA", configs.LoraConfig, "trainers.methods.lora:run",
           suffixes=(".safetensors", ".pt", ".ckpt"), strength=True, parallel=True,
           apply=_APPLY + "lora", help="kohya's LoRA / LoCon, LyCORIS LoHa / LoKr",
           families=SD_FAMILIES + FLOW_FAMILIES),
    Method("dreambooth", "DreamBooth", configs.DreamBoothConfig, "trainers.methods.dreambooth:run",
           final_folder="models/Stable-diffusion", suffixes=_MODEL_SUFFIXES,
           checkpoint_kind="model", parallel=True, apply=_APPLY + "whole_model",
           families=SD_FAMILIES + FLOW_FAMILIES,
           help="the whole model, with prior preservation"),
    Method("fine_tune", "Fine-tune", configs.FineTuneConfig, "trainers.methods.fine_tune:run",
           final_folder="models/Stable-diffusion", suffixes=_MODEL_SUFFIXES,
           checkpoint_kind="model", apply=_APPLY + "whole_model",
           families=SD_FAMILIES + FLOW_FAMILIES,
           help="kohya's native fine-tuning from a metadata JSON"),
    Method("extract_lora", "Extract LoRA", configs.ExtractLoraConfig,
           "trainers.extract_lora:run", help="a LoRA from a fine-tune's difference to its base"),
    Method("resize_lora", "Resize LoRA", configs.ResizeLoraConfig, "trainers.resize_lora:run",
           help="a LoRA cut to a lower rank by SVD"),
    Method("merge_lora", "Merge LoRAs", configs.MergeLoraConfig, "trainers.merge_lora:run",
           help="several LoRAs merged into one, each at its weight"),
    Method("merge_into_checkpoint", "Merge LoRAs into a checkpoint",
           configs.MergeIntoCheckpointConfig, "trainers.merge_into_checkpoint:run",
           final_folder="models/Stable-diffusion", checkpoint_kind="model",
           help="LoRAs at their weights baked into a base model, saved as one checkpoint"),
    Method("lora_ema", "Post-hoc EMA of a LoRA run", configs.LoraEmaConfig,
           "trainers.lora_ema:run",
           help="a run's periodic LoRA copies averaged in step order (exponential or EDM2)"),
):
    register(_method)
del _method
