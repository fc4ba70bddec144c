"""The flow families' transformers in their original single-file layouts (Black Forest Labs'
names for Flux.1, Chroma and Flux.2, Z-Image's own; as ComfyUI and kohya / musubi load them,
optionally under `model.diffusion_model.`) and in diffusers' names, both ways, at any width.

diffusers' own converters split a single block's fused `linear1` by a fixed width of 3072, so they
read only full-size files; this table takes the width from `img_in`. One table gives both
directions: each entry is an original key, the diffusers key(s) it becomes and how (`same`;
`qkv`: three equal row blocks; `linear1`: q, k, v of the width and the MLP rows; `swap`: the two
row halves exchanged, BFL's shift/scale against diffusers' scale/shift)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

PREFIX = "model.diffusion_model."


class TransformerLayoutError(ValueError):
    pass


def _linear(original: str, diffusers: str | list[str], op: str = "same") -> list:
    names = [diffusers] if isinstance(diffusers, str) else diffusers
    return [(f"{original}.{suffix}", tuple(f"{n}.{suffix}" for n in names), op)
            for suffix in ("weight", "bias")]


def _norm(original: str, diffusers: str) -> tuple:
    return (f"{original}.scale", (f"{diffusers}.weight",), "same")


def _double_attention(o: str, d: str) -> list:
    """A double block's attention: fused q/k/v, q/k norms and output projections (Flux.1,
    Chroma and Flux.2 name them alike)."""
    return [
        *_linear(o + "img_attn.qkv", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"], "qkv"),
        *_linear(o + "txt_attn.qkv", [d + "attn.add_q_proj", d + "attn.add_k_proj",
                                      d + "attn.add_v_proj"], "qkv"),
        _norm(o + "img_attn.norm.query_norm", d + "attn.norm_q"),
        _norm(o + "img_attn.norm.key_norm", d + "attn.norm_k"),
        _norm(o + "txt_attn.norm.query_norm", d + "attn.norm_added_q"),
        _norm(o + "txt_attn.norm.key_norm", d + "attn.norm_added_k"),
        *_linear(o + "img_attn.proj", d + "attn.to_out.0"),
        *_linear(o + "txt_attn.proj", d + "attn.to_add_out"),
    ]


def _double(i: int) -> list:
    o, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
    return [
        *_linear(o + "img_mod.lin", d + "norm1.linear"),
        *_linear(o + "txt_mod.lin", d + "norm1_context.linear"),
        *_double_attention(o, d),
        *_linear(o + "img_mlp.0", d + "ff.net.0.proj"),
        *_linear(o + "img_mlp.2", d + "ff.net.2"),
        *_linear(o + "txt_mlp.0", d + "ff_context.net.0.proj"),
        *_linear(o + "txt_mlp.2", d + "ff_context.net.2"),
    ]


def _single(i: int) -> list:
    o, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
    return [
        *_linear(o + "modulation.lin", d + "norm.linear"),
        *_linear(o + "linear1", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v",
                                 d + "proj_mlp"], "linear1"),
        _norm(o + "norm.query_norm", d + "attn.norm_q"),
        _norm(o + "norm.key_norm", d + "attn.norm_k"),
        *_linear(o + "linear2", d + "proj_out"),
    ]


def _flux2_double(i: int) -> list:
    o, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
    return [
        *_double_attention(o, d),
        *_linear(o + "img_mlp.0", d + "ff.linear_in"),
        *_linear(o + "img_mlp.2", d + "ff.linear_out"),
        *_linear(o + "txt_mlp.0", d + "ff_context.linear_in"),
        *_linear(o + "txt_mlp.2", d + "ff_context.linear_out"),
    ]


def _flux2_single(i: int) -> list:
    o, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
    return [*_linear(o + "linear1", d + "attn.to_qkv_mlp_proj"),
            *_linear(o + "linear2", d + "attn.to_out"),
            _norm(o + "norm.query_norm", d + "attn.norm_q"),
            _norm(o + "norm.key_norm", d + "attn.norm_k")]


def _flux2_table(double: int, single: int, guidance: int) -> list:
    table = [
        *_linear("img_in", "x_embedder"),
        *_linear("txt_in", "context_embedder"),
        *_linear("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1"),
        *_linear("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2"),
        *_linear("guidance_in.in_layer", "time_guidance_embed.guidance_embedder.linear_1"),
        *_linear("guidance_in.out_layer", "time_guidance_embed.guidance_embedder.linear_2"),
        *_linear("double_stream_modulation_img.lin", "double_stream_modulation_img.linear"),
        *_linear("double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear"),
        *_linear("single_stream_modulation.lin", "single_stream_modulation.linear"),
        *_linear("final_layer.linear", "proj_out"),
        *_linear("final_layer.adaLN_modulation.1", "norm_out.linear", "swap"),
    ]
    for i in range(double):
        table += _flux2_double(i)
    for i in range(single):
        table += _flux2_single(i)
    return table


def _guidance(i: int) -> list:
    o = f"distilled_guidance_layer.layers.{i}."
    return [*_linear(o + "in_layer", o + "linear_1"), *_linear(o + "out_layer", o + "linear_2"),
            _norm(f"distilled_guidance_layer.norms.{i}", f"distilled_guidance_layer.norms.{i}")]


def _table(double: int, single: int, guidance: int) -> list:
    table = [
        *_linear("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        *_linear("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        *_linear("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        *_linear("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        *_linear("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
        *_linear("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
        *_linear("distilled_guidance_layer.in_proj", "distilled_guidance_layer.in_proj"),
        *_linear("distilled_guidance_layer.out_proj", "distilled_guidance_layer.out_proj"),
        *_linear("txt_in", "context_embedder"),
        *_linear("img_in", "x_embedder"),
        *_linear("final_layer.linear", "proj_out"),
        *_linear("final_layer.adaLN_modulation.1", "norm_out.linear", "swap"),
    ]
    for i in range(double):
        table += _double(i)
    for i in range(single):
        table += _single(i)
    for i in range(guidance):
        table += _guidance(i)
    return table


def _count(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _swap(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


@dataclass(frozen=True)
class TableLayout:
    """A transformer's original layout given by a table of (original key, diffusers keys, op)."""
    label: str
    table: Callable[[int, int, int], list]

    def _entries(self, state, double: str, single: str) -> list:
        return self.table(_count(state, double), _count(state, single),
                          _count(state, r"distilled_guidance_layer\.layers\.(\d+)\."))

    def to_diffusers(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The diffusers transformer's state dict from an original-layout one."""
        state = {k.removeprefix(PREFIX): v for k, v in state.items()}
        if "img_in.weight" not in state:
            raise TransformerLayoutError(f"not a {self.label} transformer: no img_in.weight")
        width = int(state["img_in.weight"].shape[0])
        out, used = {}, set()
        for original, targets, op in self._entries(state, r"double_blocks\.(\d+)\.",
                                                   r"single_blocks\.(\d+)\."):
            if original not in state:
                continue
            tensor = state[original]
            used.add(original)
            if op == "same":
                pieces = [tensor]
            elif op == "qkv":
                pieces = list(tensor.chunk(3, dim=0))
            elif op == "linear1":
                pieces = list(tensor.split([width, width, width, tensor.shape[0] - 3 * width]))
            else:
                pieces = [_swap(tensor)]
            out.update(zip(targets, pieces))
        _refuse_leftovers(set(state) - used, f"original {self.label}")
        return out

    def to_original(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The original (BFL / ComfyUI) layout of a diffusers transformer's state dict."""
        out, used = {}, set()
        for original, targets, op in self._entries(state, r"transformer_blocks\.(\d+)\.",
                                                   r"single_transformer_blocks\.(\d+)\."):
            present = [t in state for t in targets]
            if not any(present):
                continue
            if not all(present):
                missing = [t for t in targets if t not in state]
                raise TransformerLayoutError(f"cannot fuse {original}: missing {', '.join(missing)}")
            pieces = [state[t] for t in targets]
            used.update(targets)
            out[original] = _swap(pieces[0]) if op == "swap" else torch.cat(pieces, dim=0)
        _refuse_leftovers(set(state) - used, f"diffusers {self.label}")
        return out


# Z-Image's original names differ from diffusers' by these renames and a fused q/k/v
_ZIMAGE_RENAMES = ((".attention.to_out.0.", ".attention.out."), (".attention.norm_k.", ".attention.k_norm."),
                   (".attention.norm_q.", ".attention.q_norm."), ("all_final_layer.2-1.", "final_layer."),
                   ("all_x_embedder.2-1.", "x_embedder."))


class ZImageLayout:
    label = "Z-Image"

    def to_diffusers(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from diffusers.loaders.single_file_utils import \
            convert_z_image_transformer_checkpoint_to_diffusers as convert
        state = {k.removeprefix(PREFIX): v for k, v in state.items()}
        if not any(k.startswith("layers.") for k in state):
            raise TransformerLayoutError("not a Z-Image transformer: no layers.*")
        return convert(state)

    def to_original(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, tensor in state.items():
            if ".attention.to_k." in key or ".attention.to_v." in key:
                continue
            if ".attention.to_q." in key:
                parts = [state[key.replace(".to_q.", f".{n}.")] for n in ("to_q", "to_k", "to_v")]
                out[key.replace(".attention.to_q.", ".attention.qkv.")] = torch.cat(parts)
                continue
            for new, old in _ZIMAGE_RENAMES:
                key = key.replace(new, old)
            out[key] = tensor
        return out


FLUX = TableLayout("Flux.1 / Chroma", _table)
FLUX2 = TableLayout("Flux.2", _flux2_table)
ZIMAGE = ZImageLayout()


def _refuse_leftovers(leftover: set, layout: str) -> None:
    if leftover:
        sample = ", ".join(sorted(leftover)[:5])
        raise TransformerLayoutError(f"{len(leftover)} keys are not part of the {layout} layout "
                                   f"(e.g. {sample})")
