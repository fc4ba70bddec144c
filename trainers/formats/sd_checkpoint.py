"""Single-file checkpoints in the original (CompVis/LDM) layout: the `.safetensors` files that
A1111, ComfyUI and Forge load from `models/Stable-diffusion`.

diffusers reads this layout (`from_single_file`) but never writes it, so the writer is ours:
diffusers state dicts are renamed block by block into

    model.diffusion_model.*     UNet (input_blocks / middle_block / output_blocks)
    first_stage_model.*         VAE (encoder.down / decoder.up, mid.attn_1 as 1x1 convs)
    cond_stage_model.transformer.text_model.*   SD1: OpenAI CLIP ViT-L, Hugging Face names
    cond_stage_model.model.*    SD2: OpenCLIP ViT-H, fused q/k/v (`attn.in_proj_*`)

Every converter first checks the state dict against the model it claims to be (built on the
`meta` device, so no memory is used) and names the missing, unexpected or misshapen keys.
    conditioner.embedders.0.transformer.text_model.*   SDXL: CLIP ViT-L, Hugging Face names
    conditioner.embedders.1.model.*   SDXL: OpenCLIP ViT-bigG, fused q/k/v, text_projection

SDXL's UNet has `label_emb` (size/crop conditioning) and several transformer blocks per attention.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import safetensors.torch
import torch

from core.atomic import atomic_write
from trainers.formats.save_check import check_savable
from trainers.families import detect_family  # noqa: F401  (family detection lives there)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer.text_model."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_PREFIX = "conditioner.embedders."

SAVE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FAMILIES = ("sd1", "sd2", "sdxl")

StateDict = Mapping[str, torch.Tensor]
# diffusers prefix -> (original prefix, renames for the part after the prefix, or None)
PrefixMap = dict[str, tuple[str, dict[str, str] | None]]


class CheckpointLayoutError(ValueError):
    """A state dict that does not match the model it should hold; the message names the keys."""


# ----------------------------------------------------------------------------------------------
# shared helpers

# inside a UNet resnet block
UNET_RESNET = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.",
               "time_emb_proj.": "emb_layers.1.", "norm2.": "out_layers.0.",
               "conv2.": "out_layers.3.", "conv_shortcut.": "skip_connection."}
# inside a VAE resnet block only the shortcut is renamed
VAE_RESNET = {"conv_shortcut.": "nin_shortcut."}
# the VAE's mid-block attention
VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.",
                 "to_out.0.": "proj_out."}


def _longest_prefix(key: str, prefixes: Mapping[str, Any]) -> str | None:
    """The longest entry of `prefixes` (each ending in '.') that `key` starts with."""
    end = len(key)
    while True:
        end = key.rfind(".", 0, end)
        if end < 0:
            return None
        candidate = key[:end + 1]
        if candidate in prefixes:
            return candidate


def _rename(state_dict: StateDict, prefix_map: PrefixMap, what: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        prefix = _longest_prefix(key, prefix_map)
        if prefix is None:
            raise CheckpointLayoutError(f"{what}: no original-layout name for {key!r}")
        original, inner = prefix_map[prefix]
        rest = key[len(prefix):]
        if inner:
            inner_prefix = _longest_prefix(rest, inner)
            if inner_prefix is not None:
                rest = inner[inner_prefix] + rest[len(inner_prefix):]
        out[original + rest] = value
    return out


def _shapes(state_dict: StateDict) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state_dict.items()}


def _listing(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _check_keys(state_dict: StateDict, reference: Mapping[str, tuple[int, ...]], what: str,
                ignore: Iterable[str] = ()) -> None:
    """Raise CheckpointLayoutError naming missing, unexpected and misshapen keys."""
    ignore = set(ignore)
    given = {k: tuple(v.shape) for k, v in state_dict.items() if k not in ignore}
    expected = {k: v for k, v in reference.items() if k not in ignore}
    problems = []
    missing = sorted(set(expected) - set(given))
    if missing:
        problems.append(f"missing key(s) {_listing(missing)}")
    unexpected = sorted(set(given) - set(expected))
    if unexpected:
        problems.append(f"unexpected key(s) {_listing(unexpected)}")
    misshapen = sorted(k for k in set(given) & set(expected) if given[k] != expected[k])
    if misshapen:
        problems.append("wrong shape for " + ", ".join(
            f"{k!r} ({list(given[k])}, expected {list(expected[k])})" for k in misshapen[:5]))
    if problems:
        raise CheckpointLayoutError(f"{what}: " + "; ".join(problems))


def _need(state_dict: StateDict, key: str, what: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise CheckpointLayoutError(f"{what}: missing key(s) {key!r}")
    return tuple(state_dict[key].shape)


def _indices(keys: Iterable[str], pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` (a regex with one group) at key starts."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := regex.match(k))})


def _config_dict(config: Any) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"config must be a mapping (e.g. unet.config), not {type(config).__name__}")


def _meta_shapes(build: Callable[[], torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a model built on the meta device (no memory, no weight init)."""
    with torch.device("meta"):
        model = build()
    return _shapes(model.state_dict())


# ----------------------------------------------------------------------------------------------
# UNet

def _has_attention(block_type: str) -> bool:
    return "Attn" in block_type


def _unet_prefix_map(config: dict) -> PrefixMap:
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise CheckpointLayoutError(
            f"unet: layers_per_block={per_block!r}; only one number for every block is supported")
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    mid = config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    if mid != "UNetMidBlock2DCrossAttn":
        raise CheckpointLayoutError(f"unet: mid_block_type {mid!r} has no original layout here")
    step = per_block + 1  # input_blocks per down block (resnets + downsampler)
    m: PrefixMap = {
        "conv_in.": ("input_blocks.0.0.", None),
        "time_embedding.linear_1.": ("time_embed.0.", None),
        "time_embedding.linear_2.": ("time_embed.2.", None),
        "add_embedding.linear_1.": ("label_emb.0.0.", None),  # SDXL's size/crop conditioning
        "add_embedding.linear_2.": ("label_emb.0.2.", None),
        "conv_norm_out.": ("out.0.", None),
        "conv_out.": ("out.2.", None),
        "mid_block.resnets.0.": ("middle_block.0.", UNET_RESNET),
        "mid_block.attentions.0.": ("middle_block.1.", None),
        "mid_block.resnets.1.": ("middle_block.2.", UNET_RESNET),
    }
    for i, kind in enumerate(down):
        for j in range(per_block):
            index = 1 + i * step + j
            m[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{index}.0.", UNET_RESNET)
            if _has_attention(kind):
                m[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{index}.1.", None)
        if i < len(down) - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{(i + 1) * step}.0.op.",
                                                          None)
    for i, kind in enumerate(up):
        for j in range(per_block + 1):
            index = i * step + j
            m[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{index}.0.", UNET_RESNET)
            if _has_attention(kind):
                m[f"up_blocks.{i}.attentions.{j}."] = (f"output_blocks.{index}.1.", None)
        if i < len(up) - 1:
            slot = 2 if _has_attention(kind) else 1
            index = i * step + per_block
            m[f"up_blocks.{i}.upsamplers.0.conv."] = (f"output_blocks.{index}.{slot}.conv.", None)
    return m


def original_unet_path(path: str, config: Any) -> str:
    """A diffusers U-Net module path -> its path in the original layout (no prefix), e.g.
    `down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in` (SDXL)."""
    key = _rename({path + ".weight": None}, _unet_prefix_map(_config_dict(config)), "unet")
    return next(iter(key)).removesuffix(".weight")


def _unet_reference(config: dict) -> dict[str, tuple[int, ...]]:
    from diffusers import UNet2DConditionModel
    return _meta_shapes(lambda: UNet2DConditionModel.from_config(config))


def unet_to_original(state_dict: StateDict, config: Any, *,
                     linear_projection: bool | None = None) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel state dict -> `model.diffusion_model.*` (SD1/SD2/SDXL shapes).

    `config` is the UNet's config (`unet.config` or its dict): the block types say which blocks
    have attention, `layers_per_block` how the input/output blocks are numbered.
    `linear_projection` sets the shape of the transformers' proj_in/proj_out weights: True gives
    [C, C] (SD2, SDXL), False gives 1x1 convs [C, C, 1, 1] (SD1), None keeps the given shape.
    """
    config = _config_dict(config)
    _check_keys(state_dict, _unet_reference(config), "unet")
    converted = _rename(state_dict, _unet_prefix_map(config), "unet")
    out = {}
    for key, value in converted.items():
        if linear_projection is not None and re.search(r"\.(proj_in|proj_out)\.weight$", key):
            if linear_projection and value.ndim == 4:
                value = value.reshape(value.shape[0], value.shape[1])
            elif not linear_projection and value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)
        out[UNET_PREFIX + key] = value
    return out


# ----------------------------------------------------------------------------------------------
# VAE

def _vae_config_from_keys(state_dict: StateDict) -> dict:
    """The AutoencoderKL structure implied by the keys and shapes (norm groups do not matter)."""
    what = "vae"
    blocks = _indices(state_dict, r"encoder\.down_blocks\.(\d+)\.")
    if not blocks:
        raise CheckpointLayoutError(f"{what}: missing key(s) 'encoder.down_blocks.0.*' "
                                    "(not a diffusers AutoencoderKL state dict)")
    per_block = len(_indices(state_dict, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."))
    channels = [_need(state_dict, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", what)[0]
                for i in range(len(blocks))]
    return {
        "in_channels": _need(state_dict, "encoder.conv_in.weight", what)[1],
        "out_channels": _need(state_dict, "decoder.conv_out.weight", what)[0],
        "latent_channels": _need(state_dict, "decoder.conv_in.weight", what)[1],
        "block_out_channels": channels,
        "layers_per_block": per_block,
        "down_block_types": ["DownEncoderBlock2D"] * len(blocks),
        "up_block_types": ["UpDecoderBlock2D"] * len(blocks),
        "norm_num_groups": 1,
        "mid_block_add_attention": any(k.startswith("encoder.mid_block.attentions.")
                                       for k in state_dict),
        "use_quant_conv": "quant_conv.weight" in state_dict,
        "use_post_quant_conv": "post_quant_conv.weight" in state_dict,
    }


def _vae_prefix_map(config: dict) -> PrefixMap:
    count, per_block = len(config["block_out_channels"]), config["layers_per_block"]
    m: PrefixMap = {
        "quant_conv.": ("quant_conv.", None),
        "post_quant_conv.": ("post_quant_conv.", None),
    }
    for part in ("encoder", "decoder"):
        m[f"{part}.conv_in."] = (f"{part}.conv_in.", None)
        m[f"{part}.conv_out."] = (f"{part}.conv_out.", None)
        m[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", None)
        m[f"{part}.mid_block.resnets.0."] = (f"{part}.mid.block_1.", VAE_RESNET)
        m[f"{part}.mid_block.resnets.1."] = (f"{part}.mid.block_2.", VAE_RESNET)
        m[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", VAE_ATTENTION)
    for i in range(count):
        for j in range(per_block):
            m[f"encoder.down_blocks.{i}.resnets.{j}."] = (f"encoder.down.{i}.block.{j}.",
                                                          VAE_RESNET)
        if i < count - 1:
            m[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = (
                f"encoder.down.{i}.downsample.conv.", None)
        # the decoder counts its levels from the bottom in the original layout
        level = count - 1 - i
        for j in range(per_block + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}."] = (f"decoder.up.{level}.block.{j}.",
                                                        VAE_RESNET)
        if i < count - 1:
            m[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = (
                f"decoder.up.{level}.upsample.conv.", None)
    return m


def vae_to_original(state_dict: StateDict, config: Any = None) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> `first_stage_model.*`.

    The mid-block attention's linear q/k/v/proj_out weights become the 1x1 conv weights
    [C, C, 1, 1] of the original. Without `config` the structure is read from the keys.
    """
    config = _vae_config_from_keys(state_dict) if config is None else _config_dict(config)

    def build():
        from diffusers import AutoencoderKL
        return AutoencoderKL.from_config({**config, "norm_num_groups": 1})

    _check_keys(state_dict, _meta_shapes(build), "vae")
    converted = _rename(state_dict, _vae_prefix_map(config), "vae")
    out = {}
    for key, value in converted.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)
        out[VAE_PREFIX + key] = value
    return out


# ----------------------------------------------------------------------------------------------
# text encoders

def _clip_keys(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """Keys of a CLIPTextModel without the `text_model.` level (transformers 4 had it, 5 not)."""
    return {k.removeprefix("text_model."): v for k, v in state_dict.items()}


def _check_clip(state_dict: StateDict) -> int:
    """Check a (prefix-free) CLIPTextModel state dict against its own shapes; return positions."""
    what = "text_encoder"
    vocab, width = _need(state_dict, "embeddings.token_embedding.weight", what)
    positions = _need(state_dict, "embeddings.position_embedding.weight", what)[0]
    layers = _indices(state_dict, r"encoder\.layers\.(\d+)\.")
    if not layers:
        raise CheckpointLayoutError(f"{what}: missing key(s) 'encoder.layers.0.*'")
    inner = _need(state_dict, f"encoder.layers.{layers[0]}.mlp.fc1.weight", what)[0]

    def build():
        from transformers import CLIPTextConfig, CLIPTextModel
        return CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab, hidden_size=width, intermediate_size=inner,
            num_hidden_layers=layers[-1] + 1, num_attention_heads=1,
            max_position_embeddings=positions))

    reference = {k.removeprefix("text_model."): v for k, v in _meta_shapes(build).items()}
    _check_keys(state_dict, reference, what, ignore=["embeddings.position_ids"])
    return positions


def _sd1_text(state_dict: StateDict) -> dict[str, torch.Tensor]:
    clip = _clip_keys(state_dict)
    positions = _check_clip(clip)
    out = {SD1_TEXT_PREFIX + k: v for k, v in clip.items()}
    # the original files carry CLIP's position ids ([1, 77] int64); transformers 5 does not
    # save them
    token = clip["embeddings.token_embedding.weight"]
    ids = clip.get("embeddings.position_ids")
    if ids is None:
        ids = torch.arange(positions, device=token.device).unsqueeze(0)
    out[SD1_TEXT_PREFIX + "embeddings.position_ids"] = ids.to(torch.int64)
    return out


OPENCLIP_LAYER = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.",
                  "mlp.fc2.": "mlp.c_proj.", "self_attn.out_proj.": "attn.out_proj."}
OPENCLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                "embeddings.position_embedding.weight": "positional_embedding",
                "final_layer_norm.weight": "ln_final.weight",
                "final_layer_norm.bias": "ln_final.bias"}


def _openclip(clip: dict[str, torch.Tensor], restore_last_layer: bool,
              projection: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Prefix-free CLIPTextModel keys -> OpenCLIP names (`transformer.resblocks.N.*`, fused
    q/k/v as `attn.in_proj_weight/bias` [3*width, width]), `text_projection` [width, proj]
    (the transpose of transformers' Linear weight; identity when not given) and `logit_scale`."""
    _check_clip(clip)
    out = {}
    layers = _indices(clip, r"encoder\.layers\.(\d+)\.")
    for key, value in clip.items():
        if key in OPENCLIP_TOP:
            out[OPENCLIP_TOP[key]] = value
        elif key.startswith("encoder.layers."):
            index, rest = key[len("encoder.layers."):].split(".", 1)
            if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                continue  # fused below
            inner = _longest_prefix(rest, OPENCLIP_LAYER)
            if inner is None:
                raise CheckpointLayoutError(f"text_encoder: no original-layout name for {key!r}")
            out[f"transformer.resblocks.{index}.{OPENCLIP_LAYER[inner]}{rest[len(inner):]}"] = value
        elif key != "embeddings.position_ids":
            raise CheckpointLayoutError(f"text_encoder: no original-layout name for {key!r}")
    for index in layers:
        for kind in ("weight", "bias"):
            parts = [clip[f"encoder.layers.{index}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
    if restore_last_layer:
        last = f"transformer.resblocks.{layers[-1]}."
        copy = f"transformer.resblocks.{layers[-1] + 1}."
        for key in [k for k in out if k.startswith(last)]:
            out[copy + key[len(last):]] = out[key].clone()
    token = clip["embeddings.token_embedding.weight"]
    width = token.shape[1]
    out["text_projection"] = (torch.eye(width, dtype=token.dtype, device=token.device)
                              if projection is None else projection.t().contiguous())
    out["logit_scale"] = torch.tensor(math.log(100.0), dtype=token.dtype, device=token.device)
    return out


def _sd2_text(state_dict: StateDict, restore_last_layer: bool = True) -> dict[str, torch.Tensor]:
    """CLIPTextModel (SD2's OpenCLIP ViT-H as diffusers holds it) -> `cond_stage_model.model.*`.

    SD2 conditions on the penultimate layer, so diffusers keeps 23 of OpenCLIP's 24 blocks; with
    `restore_last_layer` a copy of the last block is appended so the file has the block count the
    original has (it is never used). `text_projection` (identity) and `logit_scale` are written
    for the same reason.
    """
    out = _openclip(_clip_keys(state_dict), restore_last_layer, None)
    return {SD2_TEXT_PREFIX + k: v for k, v in out.items()}


SDXL_TEXT_PREFIX = SDXL_PREFIX + "0.transformer.text_model."
SDXL_TEXT_2_PREFIX = SDXL_PREFIX + "1.model."


def _sdxl_text_1(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """SDXL's first text encoder (CLIP ViT-L) -> `conditioner.embedders.0.transformer.*`."""
    sd1 = _sd1_text(state_dict)
    return {SDXL_TEXT_PREFIX + k[len(SD1_TEXT_PREFIX):]: v for k, v in sd1.items()}


def _sdxl_text_2(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """SDXL's second text encoder (CLIPTextModelWithProjection, OpenCLIP ViT-bigG) ->
    `conditioner.embedders.1.model.*`, all its blocks, with its real text projection."""
    clip = _clip_keys(state_dict)
    projection = clip.pop("text_projection.weight", None)
    if projection is None:
        raise CheckpointLayoutError("text_encoder_2: missing key(s) 'text_projection.weight' "
                                    "(SDXL's second text encoder has a projection)")
    out = _openclip(clip, False, projection)
    return {SDXL_TEXT_2_PREFIX + k: v for k, v in out.items()}


TEXT_CONVERTERS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "sd1": _sd1_text,
    "sd2": _sd2_text,
}


def text_encoder_to_original(state_dict: StateDict, family: str = "sd1",
                             **options) -> dict[str, torch.Tensor]:
    """CLIPTextModel state dict (keys with or without `text_model.`) -> the original layout.

    sd1: `cond_stage_model.transformer.text_model.*` (+ `embeddings.position_ids`).
    sd2: `cond_stage_model.model.*` (OpenCLIP names, fused q/k/v); option `restore_last_layer`.
    """
    if family not in TEXT_CONVERTERS:
        raise ValueError(f"text encoder family {family!r} cannot be written; "
                         f"choose one of {', '.join(TEXT_CONVERTERS)}")
    return TEXT_CONVERTERS[family](state_dict, **options)


# ----------------------------------------------------------------------------------------------
# family detection

def read_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a `.safetensors` file, from its header only."""
    with safetensors.safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


# ----------------------------------------------------------------------------------------------
# writing

def infer_family(text_encoder: torch.nn.Module) -> str:
    """SD1's CLIP uses quick_gelu, SD2's OpenCLIP gelu (both as transformers' CLIPTextModel)."""
    config = getattr(text_encoder, "config", None)
    activation = getattr(config, "hidden_act", None)
    if type(text_encoder).__name__ != "CLIPTextModel" or activation not in ("quick_gelu", "gelu"):
        raise ValueError(f"cannot tell the model family from a {type(text_encoder).__name__} "
                         f"(hidden_act={activation!r}); pass family='sd1' or 'sd2'")
    return "sd1" if activation == "quick_gelu" else "sd2"


def _prepare(key: str, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if value.is_meta:
        raise CheckpointLayoutError(f"{key}: tensor has no data (meta device); "
                                    "load the weights first")
    value = value.detach()
    if value.is_floating_point():
        return value.to(device="cpu", dtype=dtype).contiguous()
    return value.to("cpu").contiguous()


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata {key!r}: keys and values must be str "
                            f"(got {type(value).__name__}); json.dumps other values")
    return dict(metadata)


def original_state_dict(unet, vae, text_encoder, family: str | None = None,
                        text_encoder_2=None) -> dict[str, torch.Tensor]:
    """The whole pipeline's weights in the original layout (tensors as the modules hold them).

    SDXL (`family='sdxl'`, or whenever `text_encoder_2` is given) needs both text encoders."""
    if family is None:
        family = "sdxl" if text_encoder_2 is not None else infer_family(text_encoder)
    if family not in FAMILIES:
        raise ValueError(f"{family!r} checkpoints cannot be written "
                         f"(supported: {', '.join(FAMILIES)})")
    if (family == "sdxl") != (text_encoder_2 is not None):
        raise ValueError(f"family {family!r}: an 'sdxl' checkpoint needs both text encoders "
                         "(text_encoder_2), and only SDXL has a second one")
    tensors = unet_to_original(unet.state_dict(), unet.config, linear_projection=family != "sd1")
    tensors.update(vae_to_original(vae.state_dict(), vae.config))
    if family == "sdxl":
        tensors.update(_sdxl_text_1(text_encoder.state_dict()))
        tensors.update(_sdxl_text_2(text_encoder_2.state_dict()))
    else:
        tensors.update(text_encoder_to_original(text_encoder.state_dict(), family))
    return tensors


def save_single_file(path: str | Path, unet, vae, text_encoder, dtype: torch.dtype = torch.float16,
                     metadata: Mapping[str, str] | None = None, family: str | None = None,
                     text_encoder_2=None, markers: Iterable[str] = ()) -> Path:
    """Write UNet + VAE + text encoder as one original-layout `.safetensors` file, atomically.

    Floating tensors are cast to `dtype` (fp16 is what people share; int tensors such as CLIP's
    position ids keep their type). `metadata` lands in the safetensors header (str -> str).
    `family` ('sd1' / 'sd2') is read from the text encoder when not given; SDXL files need
    `text_encoder_2` as well. `markers` are empty tensors saying how the model was trained
    (`v_pred`, `ztsnr`: sd-scripts writes them and ComfyUI reads them).
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path.name}: a single-file checkpoint is written as .safetensors")
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype {dtype} is not one of float16, bfloat16, float32")
    header = _check_metadata(metadata)
    source = original_state_dict(unet, vae, text_encoder, family, text_encoder_2)
    check_savable(path.name, source, dtype)
    tensors = {key: _prepare(key, value, dtype) for key, value in source.items()}
    tensors.update({marker: torch.tensor([]) for marker in markers})
    atomic_write(path, lambda temp: safetensors.torch.save_file(tensors, str(temp),
                                                                metadata=header))
    return path
