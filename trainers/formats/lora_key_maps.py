"""The module names a LoRA file may name in each model family, as A1111's built-in Lora
extension, ComfyUI and diffusers look them up (trainers/formats/key_check.py); torch-free.

The names are generated from each family's real architecture (SD 1.x / 2.x / SDXL U-Nets and
CLIP encoders at their published sizes; Flux.1 19 + 38 blocks, Chroma 19 + 38, Flux.2 Klein up
to 9B's 8 + 24, Z-Image 30 layers, Qwen-Image 60 blocks), in three spellings:

- original (LDM / SGM / BFL) module paths, which A1111 and ComfyUI build their maps from;
- diffusers module paths (kohya's SD1/SD2 U-Net names; diffusers' own loaders);
- the text encoders' Hugging Face CLIP paths (`text_model.encoder.layers.N.self_attn.q_proj`).

Only layers a LoRA can change are listed (Linear and Conv weights); norms are left out."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

CLIP_LEAVES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
               "mlp.fc1", "mlp.fc2")
# diffusers ResnetBlock2D leaf -> LDM ResBlock leaf
RESNET_LEAVES = {"conv1": "in_layers.2", "conv2": "out_layers.3",
                 "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


@dataclass(frozen=True)
class UnetShape:
    attention_depths: tuple[int, ...]  # per level: transformer blocks (0: no attention)
    mid_depth: int
    shortcut_levels: tuple[int, ...]  # levels whose first down ResNet changes the width
    add_embedding: bool = False  # SDXL's size / crop conditioning


SD_UNET = UnetShape((1, 1, 1, 0), 1, (1, 2))
SDXL_UNET = UnetShape((0, 2, 10), 10, (1, 2), add_embedding=True)


def _attention(prefix: str, depth: int) -> list[str]:
    names = [f"{prefix}.proj_in", f"{prefix}.proj_out"]
    for k in range(depth):
        block = f"{prefix}.transformer_blocks.{k}"
        for attn in ("attn1", "attn2"):
            names += [f"{block}.{attn}.to_{p}" for p in ("q", "k", "v")] + [f"{block}.{attn}.to_out.0"]
        names += [f"{block}.ff.net.0.proj", f"{block}.ff.net.2"]
    return names


def _resnet(diffusers: str, ldm: str, shortcut: bool) -> list[tuple[str, str]]:
    leaves = [k for k in RESNET_LEAVES if shortcut or k != "conv_shortcut"]
    return [(f"{diffusers}.{leaf}", f"{ldm}.{RESNET_LEAVES[leaf]}") for leaf in leaves]


def _attention_pairs(diffusers: str, ldm: str, depth: int) -> list[tuple[str, str]]:
    return [(name, ldm + name[len(diffusers):]) for name in _attention(diffusers, depth)]


@lru_cache(maxsize=None)
def unet_modules(shape: UnetShape) -> tuple[tuple[str, str], ...]:
    """(diffusers path, LDM / SGM path) of every Linear / Conv of a U-Net of this shape."""
    levels = len(shape.attention_depths)
    pairs = [("conv_in", "input_blocks.0.0"), ("conv_out", "out.2"),
             ("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2")]
    if shape.add_embedding:
        pairs += [("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2")]
    for i, depth in enumerate(shape.attention_depths):
        for j in range(2):
            block = 3 * i + j + 1
            pairs += _resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{block}.0",
                             j == 0 and i in shape.shortcut_levels)
            if depth:
                pairs += _attention_pairs(f"down_blocks.{i}.attentions.{j}",
                                          f"input_blocks.{block}.1", depth)
        if i < levels - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{3 * i + 3}.0.op"))
    pairs += _resnet("mid_block.resnets.0", "middle_block.0", False)
    pairs += _attention_pairs("mid_block.attentions.0", "middle_block.1", shape.mid_depth)
    pairs += _resnet("mid_block.resnets.1", "middle_block.2", False)
    for i, depth in enumerate(reversed(shape.attention_depths)):
        for j in range(3):
            block = 3 * i + j
            pairs += _resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{block}.0", True)
            if depth:
                pairs += _attention_pairs(f"up_blocks.{i}.attentions.{j}",
                                          f"output_blocks.{block}.1", depth)
        if i < levels - 1:
            pairs.append((f"up_blocks.{i}.upsamplers.0.conv",
                          f"output_blocks.{3 * i + 2}.{2 if depth else 1}.conv"))
    return tuple(pairs)


def clip_paths(layers: int) -> list[str]:
    """Hugging Face CLIPTextModel paths of every encoder layer's Linears."""
    return [f"text_model.encoder.layers.{n}.{leaf}" for n in range(layers) for leaf in CLIP_LEAVES]


def open_clip_modules(layers: int) -> list[str]:
    """open_clip's text transformer modules (A1111's SD2 / SDXL-G encoders): the attention
    is one nn.MultiheadAttention (`attn`, with `attn.out_proj`), the MLP `c_fc` / `c_proj`."""
    return [f"model.transformer.resblocks.{n}.{leaf}" for n in range(layers)
            for leaf in ("attn", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")]


# ---- flow-matching transformers: (diffusers path, original path) --------------------------
FLUX_DOUBLE = {  # diffusers path in a double block -> BFL path (q/k/v share BFL's qkv)
    "attn.to_q": "img_attn.qkv", "attn.to_k": "img_attn.qkv", "attn.to_v": "img_attn.qkv",
    "attn.to_out.0": "img_attn.proj",
    "attn.add_q_proj": "txt_attn.qkv", "attn.add_k_proj": "txt_attn.qkv",
    "attn.add_v_proj": "txt_attn.qkv", "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin"}
FLUX_SINGLE = {"attn.to_q": "linear1", "attn.to_k": "linear1", "attn.to_v": "linear1",
               "proj_mlp": "linear1", "proj_out": "linear2", "norm.linear": "modulation.lin"}
FLUX_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in",
            "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
            "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
            "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
            "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
            "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
            "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
            "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
FLUX2_DOUBLE = {
    "attn.to_q": "img_attn.qkv", "attn.to_k": "img_attn.qkv", "attn.to_v": "img_attn.qkv",
    "attn.to_out.0": "img_attn.proj",
    "attn.add_q_proj": "txt_attn.qkv", "attn.add_k_proj": "txt_attn.qkv",
    "attn.add_v_proj": "txt_attn.qkv", "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
FLUX2_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
FLUX2_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear"}
ZIMAGE_BLOCK = {"attention.to_q": "attention.qkv", "attention.to_k": "attention.qkv",
                "attention.to_v": "attention.qkv", "attention.to_out.0": "attention.out",
                "feed_forward.w1": "feed_forward.w1", "feed_forward.w2": "feed_forward.w2",
                "feed_forward.w3": "feed_forward.w3", "adaLN_modulation.0": "adaLN_modulation.0"}


# Qwen-Image: ComfyUI's and the original model's module names are diffusers' own
QWEN_IMAGE_BLOCK = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                    "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj",
                    "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1",
                    "txt_mod.1")
QWEN_IMAGE_TOP = ("img_in", "txt_in", "proj_out", "norm_out.linear",
                  "time_text_embed.timestep_embedder.linear_1",
                  "time_text_embed.timestep_embedder.linear_2")


def _qwen_image(blocks: int = 60) -> tuple[tuple[str, str], ...]:
    names = list(QWEN_IMAGE_TOP) + [f"transformer_blocks.{n}.{leaf}" for n in range(blocks)
                                    for leaf in QWEN_IMAGE_BLOCK]
    return tuple((name, name) for name in names)


def _blocks(double: dict, single: dict, top: dict, counts: tuple[int, int],
            single_drop: tuple[str, ...] = (), double_drop: tuple[str, ...] = ()):
    pairs = list(top.items())
    for n in range(counts[0]):
        pairs += [(f"transformer_blocks.{n}.{d}", f"double_blocks.{n}.{o}")
                  for d, o in double.items() if d not in double_drop]
    for n in range(counts[1]):
        pairs += [(f"single_transformer_blocks.{n}.{d}", f"single_blocks.{n}.{o}")
                  for d, o in single.items() if d not in single_drop]
    return tuple(pairs)


def _zimage() -> tuple[tuple[str, str], ...]:
    pairs = []
    for stack, count in (("layers", 30), ("noise_refiner", 2), ("context_refiner", 2)):
        for n in range(count):
            pairs += [(f"{stack}.{n}.{d}", f"{stack}.{n}.{o}") for d, o in ZIMAGE_BLOCK.items()
                      if not (stack == "context_refiner" and d.startswith("adaLN"))]
    return tuple(pairs)


@dataclass(frozen=True)
class FamilyModules:
    """What one family's loaders can map. `a1111` None: A1111 does not load the family."""
    name: str
    label: str
    denoiser: tuple[tuple[str, str], ...]  # (diffusers path, original path)
    text: dict  # kohya prefix -> (diffusers component, HF CLIP layers, ComfyUI also accepts)
    a1111: frozenset | None
    sd_unet: bool  # kohya's LoRA names the U-Net by its diffusers paths (SD 1.x / 2.x)
    diffusers_component: str  # "unet" or "transformer"


def _a1111_names(denoiser, text_modules: list[str]) -> frozenset:
    return frozenset(["diffusion_model_" + ldm.replace(".", "_") for _, ldm in denoiser]
                     + [m.replace(".", "_") for m in text_modules])


@lru_cache(maxsize=None)
def family_modules(name: str) -> FamilyModules:
    if name == "sd1":
        unet = unet_modules(SD_UNET)
        text = {"lora_te": ("text_encoder", 12, ("lora_te1",))}
        a1111 = _a1111_names(unet, ["transformer." + p for p in clip_paths(12)])
        return FamilyModules(name, "SD 1.x", unet, text, a1111, True, "unet")
    if name == "sd2":
        unet = unet_modules(SD_UNET)
        text = {"lora_te": ("text_encoder", 23, ("lora_te1",))}
        a1111 = _a1111_names(unet, open_clip_modules(24))
        return FamilyModules(name, "SD 2.x", unet, text, a1111, True, "unet")
    if name == "sdxl":
        unet = unet_modules(SDXL_UNET)
        text = {"lora_te1": ("text_encoder", 12, ("lora_te",)),
                "lora_te2": ("text_encoder_2", 32, ())}
        a1111 = _a1111_names(unet, ["0_transformer." + p for p in clip_paths(12)]
                             + ["1_" + m for m in open_clip_modules(32)])
        return FamilyModules(name, "SDXL", unet, text, a1111, False, "unet")
    if name == "flux1":
        return FamilyModules(name, "Flux.1", _blocks(FLUX_DOUBLE, FLUX_SINGLE, FLUX_TOP, (19, 38)),
                             {"lora_te1": ("text_encoder", 12, ("lora_te",))}, None, False,
                             "transformer")
    if name == "chroma":
        top = {k: v for k, v in FLUX_TOP.items() if k in ("x_embedder", "context_embedder",
                                                            "proj_out")}
        return FamilyModules(name, "Chroma", _blocks(
            FLUX_DOUBLE, FLUX_SINGLE, top, (19, 38), single_drop=("norm.linear",),
            double_drop=("norm1.linear", "norm1_context.linear")), {}, None, False, "transformer")
    if name == "flux2_klein":
        return FamilyModules(name, "Flux.2 Klein",
                             _blocks(FLUX2_DOUBLE, FLUX2_SINGLE, FLUX2_TOP, (8, 24)), {}, None,
                             False, "transformer")
    if name == "zimage":
        return FamilyModules(name, "Z-Image", _zimage(), {}, None, False, "transformer")
    if name == "qwen_image":
        return FamilyModules(name, "Qwen-Image", _qwen_image(), {}, None, False, "transformer")
    raise ValueError(f"family: {name!r} is not one of {', '.join(FAMILIES)}")


FAMILIES = ("sd1", "sd2", "sdxl", "flux1", "chroma", "flux2_klein", "zimage", "qwen_image")
