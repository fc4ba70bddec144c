"""Flux LoRA names and fused-factor handling against diffusers' own Flux converters."""
from __future__ import annotations

import logging

import pytest
import torch

from trainers.formats.flux_lora_keys import (BLOCK_CLASSES, SLOT, delta_of, fuse_state,
                                              kohya_name, split_state)

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers  # noqa: E402
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers  # noqa: E402

# kohya's Flux.1 names per block (sd-scripts networks/lora_flux.py; diffusers' converter list)
KOHYA_DOUBLE = ("img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "img_mod_lin",
                "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2", "txt_mod_lin")
KOHYA_SINGLE = ("linear1", "linear2", "modulation_lin")

# Flux.1 [dev]/[schnell] Linear shapes (out, in) inside one block
DOUBLE_SHAPES = {
    **{f"attn.{p}": (3072, 3072) for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj",
                                           "add_v_proj", "to_out.0", "to_add_out")},
    "ff.net.0.proj": (12288, 3072), "ff.net.2": (3072, 12288),
    "ff_context.net.0.proj": (12288, 3072), "ff_context.net.2": (3072, 12288),
    "norm1.linear": (18432, 3072), "norm1_context.linear": (18432, 3072),
}
SINGLE_SHAPES = {
    "attn.to_q": (3072, 3072), "attn.to_k": (3072, 3072), "attn.to_v": (3072, 3072),
    "proj_mlp": (12288, 3072), "proj_out": (3072, 15360), "norm.linear": (9216, 3072),
}
# the last blocks of Flux.1: the converter loops over range(19) / range(38)
DOUBLE_INDEX, SINGLE_INDEX = 18, 37
REAL_SHAPES = {**{f"transformer_blocks.{DOUBLE_INDEX}.{p}": s for p, s in DOUBLE_SHAPES.items()},
               **{f"single_transformer_blocks.{SINGLE_INDEX}.{p}": s
                  for p, s in SINGLE_SHAPES.items()}}


def tiny_flux():
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return tiny_flux()


def block_linears(model) -> dict[str, torch.nn.Linear]:
    found = {}
    for path, module in model.named_modules():
        if type(module).__name__ in BLOCK_CLASSES:
            for sub, linear in module.named_modules():
                if isinstance(linear, torch.nn.Linear):
                    found[f"{path}.{sub}"] = linear
    return found


def base_name(name: str) -> str:
    return name.split(SLOT)[0]


def slots_of(shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, ...]]:
    """fused name -> each slot's output size, from module path -> (out, in)."""
    sizes: dict[str, dict[int, int]] = {}
    for path, (out, _) in shapes.items():
        name = kohya_name(path)
        if SLOT in name:
            base, slot = name.split(SLOT)
            sizes.setdefault(base, {})[int(slot)] = out
    return {base: tuple(s[i] for i in range(len(s))) for base, s in sizes.items()}


def random_internal(shapes, rank, generator, alphas=(1.0, 4.0, 8.0, 16.0), dtype=torch.float32):
    """Per-module kohya factors under internal names; one alpha per fused group."""
    state = {}
    for i, (path, (out, inp)) in enumerate(shapes.items()):
        name = kohya_name(path)
        alpha = alphas[len(base_name(name)) % len(alphas)] if SLOT in name else alphas[i % len(alphas)]
        state[f"{name}.lora_down.weight"] = torch.randn(rank, inp, generator=generator).to(dtype)
        state[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=generator).to(dtype)
        state[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return state


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def converted_factors(file_state) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """diffusers module path -> (lora_A, lora_B) from diffusers' kohya Flux converter; the
    module's change is lora_B @ lora_A (the loader passes no alphas on, so peft's scale is 1:
    alpha / rank is folded into A and B). Fails when the converter leaves keys unconverted."""
    logger = logging.getLogger("diffusers")  # does not propagate to the root logger
    records = _Records()
    logger.addHandler(records)
    try:
        converted = _convert_kohya_flux_lora_to_diffusers(dict(file_state))
    finally:
        logger.removeHandler(records)
    assert not [m for m in records.messages if "Unsupported" in m], records.messages
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in converted.items():
        path, _, part = key.removeprefix("transformer.").rpartition(".lora_")
        factors.setdefault(path, {})[part] = value.float()
    assert all(set(f) == {"A.weight", "B.weight"} for f in factors.values())
    return {p: (f["A.weight"], f["B.weight"]) for p, f in factors.items()}


def assert_same_delta(factors, state, name, what):
    """lora_B @ lora_A == alpha / rank * up @ down of `name` in `state`, compared on random
    probes: at Flux.1 width the full [out, in] deltas are too slow to build for a unit test,
    and 16 random columns see every direction of a rank-4 difference."""
    lora_a, lora_b = factors
    down, up = state[f"{name}.lora_down.weight"].float(), state[f"{name}.lora_up.weight"].float()
    alpha = state.get(f"{name}.alpha")
    scale = (float(alpha) if alpha is not None else down.shape[0]) / down.shape[0]
    x = torch.randn(down.shape[1], 16, generator=torch.Generator().manual_seed(0))
    assert_close(lora_b @ (lora_a @ x), scale * (up @ (down @ x)), what)


def assert_close(actual, expected, what):
    error = (actual - expected).norm() / expected.norm()
    assert error < 1e-5, f"{what}: relative error {error:.2e}"


# ---- 1. naming ----------------------------------------------------------------------------
def test_every_block_linear_has_a_unique_kohya_name(tiny):
    linears = block_linears(tiny)
    assert len(linears) == len(DOUBLE_SHAPES) + len(SINGLE_SHAPES)
    names = {path: kohya_name(path) for path in linears}
    assert all(names.values()), [p for p, n in names.items() if n is None]
    assert len(set(names.values())) == len(names)
    assert {base_name(n) for n in names.values()} == (
        {f"lora_unet_double_blocks_0_{n}" for n in KOHYA_DOUBLE}
        | {f"lora_unet_single_blocks_0_{n}" for n in KOHYA_SINGLE})
    # every slot of a fused layer is there, numbered from 0
    for base, sizes in slots_of({p: tuple(m.weight.shape) for p, m in linears.items()}).items():
        assert len(sizes) == (4 if base.endswith("linear1") else 3)


def test_examples_and_modules_outside_the_blocks(tiny):
    assert kohya_name("transformer_blocks.0.attn.to_out.0") == "lora_unet_double_blocks_0_img_attn_proj"
    assert kohya_name("transformer_blocks.3.attn.to_k") == "lora_unet_double_blocks_3_img_attn_qkv@1"
    assert kohya_name("transformer_blocks.12.attn.add_v_proj") == \
        "lora_unet_double_blocks_12_txt_attn_qkv@2"
    assert kohya_name("single_transformer_blocks.2.proj_mlp") == "lora_unet_single_blocks_2_linear1@3"
    assert kohya_name("single_transformer_blocks.20.proj_out") == "lora_unet_single_blocks_20_linear2"
    assert kohya_name("proj_out") == "lora_unet_final_layer_linear"
    assert kohya_name("norm_out.linear") is None
    for path in ("transformer_blocks.0.attn.norm_q", "single_transformer_blocks.0.attn",
                 "transformer_blocks.0.attn.to_out.1", "pos_embed", "transformer.proj_out", ""):
        assert kohya_name(path) is None, path
    linears = {p for p, m in tiny.named_modules() if isinstance(m, torch.nn.Linear)}
    outside = linears - set(block_linears(tiny))
    assert {p: kohya_name(p) for p in outside} == {
        "x_embedder": "lora_unet_img_in",
        "context_embedder": "lora_unet_txt_in",
        "time_text_embed.timestep_embedder.linear_1": "lora_unet_time_in_in_layer",
        "time_text_embed.timestep_embedder.linear_2": "lora_unet_time_in_out_layer",
        "time_text_embed.text_embedder.linear_1": "lora_unet_vector_in_in_layer",
        "time_text_embed.text_embedder.linear_2": "lora_unet_vector_in_out_layer",
        "proj_out": "lora_unet_final_layer_linear",
        "norm_out.linear": None,
    }
    assert kohya_name("time_text_embed.guidance_embedder.linear_2") == "lora_unet_guidance_in_out_layer"


# ---- 2. against diffusers' loader conversion at Flux.1 width ------------------------------
def test_fused_file_matches_diffusers_conversion():
    generator = torch.Generator().manual_seed(1)
    internal = random_internal(REAL_SHAPES, 4, generator)
    file_state = fuse_state(internal)
    assert {base_name(k.split(".")[0]) for k in internal} == {k.split(".")[0] for k in file_state}
    assert file_state["lora_unet_single_blocks_37_linear1.lora_down.weight"].shape == (16, 3072)
    assert file_state["lora_unet_single_blocks_37_linear1.lora_up.weight"].shape == (21504, 16)

    converted = converted_factors(file_state)
    assert set(converted) == set(REAL_SHAPES)
    for path, factors in converted.items():
        assert_same_delta(factors, internal, kohya_name(path), path)
        # diffusers reads the block-diagonal up as "sparse" and gives each slot rank 4 back
        assert factors[0].shape[0] == 4, path


def test_kohya_shared_down_file_splits_like_diffusers():
    generator = torch.Generator().manual_seed(2)
    slots = slots_of(REAL_SHAPES)
    file_state = {}
    for path, (out, inp) in REAL_SHAPES.items():
        name = base_name(kohya_name(path))
        if f"{name}.lora_down.weight" in file_state:
            continue
        out = sum(slots[name]) if name in slots else out
        file_state[f"{name}.lora_down.weight"] = torch.randn(4, inp, generator=generator)
        file_state[f"{name}.lora_up.weight"] = torch.randn(out, 4, generator=generator)
        file_state[f"{name}.alpha"] = torch.tensor(2.0)

    internal = split_state(file_state, slots)
    assert internal["lora_unet_single_blocks_37_linear1@3.lora_up.weight"].shape == (12288, 4)
    assert internal["lora_unet_double_blocks_18_img_attn_qkv@2.lora_down.weight"].shape == (4, 3072)
    converted = converted_factors(file_state)
    assert set(converted) == set(REAL_SHAPES)
    for path, factors in converted.items():
        assert_same_delta(factors, internal, kohya_name(path), path)


def test_converted_tiny_lora_loads_with_peft_scale_one(tiny):
    """The diffusers-side claim above, loaded for real: after diffusers converts a fused file
    and peft loads it, each Linear's change is alpha / rank * up @ down of its slot. (Tiny
    width, so only the double block: the converter hard-codes single blocks' 3072-wide split.)"""
    model = tiny_flux()
    shapes = {p: tuple(m.weight.shape) for p, m in block_linears(model).items()
              if p.startswith("transformer_blocks.")}
    internal = random_internal(shapes, 2, torch.Generator().manual_seed(3))
    converted = _convert_kohya_flux_lora_to_diffusers(fuse_state(internal))
    model.load_lora_adapter(converted, prefix="transformer", adapter_name="t")
    for path, (out, inp) in shapes.items():
        module = model.get_submodule(path)
        x = torch.randn(3, inp)
        with torch.no_grad():
            change = module(x) - module.base_layer(x)
        assert_close(change, x @ delta_of(internal, kohya_name(path)).T, path)


# ---- 3. round trips -----------------------------------------------------------------------
def small_shapes():
    return {
        "transformer_blocks.0.attn.to_q": (8, 6), "transformer_blocks.0.attn.to_k": (8, 6),
        "transformer_blocks.0.attn.to_v": (8, 6), "transformer_blocks.0.attn.to_out.0": (6, 8),
        "single_transformer_blocks.1.attn.to_q": (8, 6),
        "single_transformer_blocks.1.attn.to_k": (8, 6),
        "single_transformer_blocks.1.attn.to_v": (8, 6),
        "single_transformer_blocks.1.proj_mlp": (24, 6),
        "single_transformer_blocks.1.proj_out": (6, 32),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_of_fuse_is_exact(dtype):
    internal = random_internal(small_shapes(), 3, torch.Generator().manual_seed(4),
                               alphas=(0.5, 3.0, 7.0, 24.0), dtype=dtype)
    file_state = fuse_state(internal)
    assert list(file_state) == [
        f"lora_unet_{n}{s}" for n in ("double_blocks_0_img_attn_qkv", "double_blocks_0_img_attn_proj",
                                      "single_blocks_1_linear1", "single_blocks_1_linear2")
        for s in (".lora_down.weight", ".lora_up.weight", ".alpha")]
    assert all(v.dtype == dtype for v in file_state.values())
    for key in ("lora_unet_double_blocks_0_img_attn_proj.lora_up.weight",
                "lora_unet_single_blocks_1_linear2.alpha"):
        assert file_state[key] is internal[key]
    for name, n in (("lora_unet_double_blocks_0_img_attn_qkv", 3), ("lora_unet_single_blocks_1_linear1", 4)):
        assert float(file_state[f"{name}.alpha"]) / (3 * n) == float(internal[f"{name}@0.alpha"]) / 3
        fused = delta_of(file_state, name)
        slots = torch.cat([delta_of(internal, f"{name}@{i}") for i in range(n)])
        assert_close(fused, slots, name)

    back = split_state(file_state, slots_of(small_shapes()))
    assert set(back) == set(internal)
    for key, value in internal.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_shared_down_file_split_then_fused_keeps_deltas():
    generator = torch.Generator().manual_seed(5)
    slots = {"lora_unet_double_blocks_2_txt_attn_qkv": (8, 8, 8),
             "lora_unet_single_blocks_0_linear1": (8, 8, 8, 24)}
    file_state = {}
    for name, sizes in slots.items():
        file_state[f"{name}.lora_down.weight"] = torch.randn(4, 6, generator=generator)
        file_state[f"{name}.lora_up.weight"] = torch.randn(sum(sizes), 4, generator=generator)
        file_state[f"{name}.alpha"] = torch.tensor(3.0)
    file_state["lora_unet_img_in.lora_down.weight"] = torch.randn(2, 4, generator=generator)
    file_state["lora_unet_img_in.lora_up.weight"] = torch.randn(6, 2, generator=generator)

    internal = split_state(file_state, slots)
    assert internal["lora_unet_img_in.lora_up.weight"] is file_state["lora_unet_img_in.lora_up.weight"]
    assert internal["lora_unet_single_blocks_0_linear1@3.lora_up.weight"].shape == (24, 4)
    refused = fuse_state(internal)
    assert refused["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (16, 6)
    for name, sizes in slots.items():
        expected = delta_of(file_state, name)
        assert_close(delta_of(refused, name), expected, name)
        for i, rows in enumerate(torch.split(expected, sizes)):
            assert_close(delta_of(internal, f"{name}@{i}"), rows, f"{name}@{i}")
    again = split_state(refused, slots)
    assert again.keys() == internal.keys()
    assert all(torch.equal(again[k], v) for k, v in internal.items())


def test_slots_of_different_ranks_load_back_as_shared_down():
    generator = torch.Generator().manual_seed(6)
    internal = {}
    for i, rank in enumerate((2, 4, 2)):
        name = f"lora_unet_double_blocks_0_img_attn_qkv@{i}"
        internal[f"{name}.lora_down.weight"] = torch.randn(rank, 6, generator=generator)
        internal[f"{name}.lora_up.weight"] = torch.randn(8, rank, generator=generator)
        internal[f"{name}.alpha"] = torch.tensor(float(rank) * 1.5)
    file_state = fuse_state(internal)
    assert float(file_state["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 12.0
    back = split_state(file_state, {"lora_unet_double_blocks_0_img_attn_qkv": (8, 8, 8)})
    for i in range(3):
        name = f"lora_unet_double_blocks_0_img_attn_qkv@{i}"
        assert back[f"{name}.lora_down.weight"].shape == (8, 6)
        assert_close(delta_of(back, name), delta_of(internal, name), name)


def test_names_without_alpha_keep_rank_scale():
    generator = torch.Generator().manual_seed(7)
    internal = {f"X@{i}.lora_{p}.weight": torch.randn(*s, generator=generator)
                for i in range(2) for p, s in (("down", (2, 5)), ("up", (3, 2)))}
    file_state = fuse_state(internal)
    assert "X.alpha" not in file_state
    assert_close(delta_of(file_state, "X"), torch.cat([delta_of(internal, "X@0"),
                                                       delta_of(internal, "X@1")]), "X")
    back = split_state(file_state, {"X": (3, 3)})
    assert set(back) == set(internal)
    assert all(torch.equal(back[k], v) for k, v in internal.items())


# ---- 4. bad input -------------------------------------------------------------------------
def _slot(name, rank=2, alpha=None, out=4, inp=5):
    state = {f"{name}.lora_down.weight": torch.randn(rank, inp),
             f"{name}.lora_up.weight": torch.randn(out, rank)}
    if alpha is not None:
        state[f"{name}.alpha"] = torch.tensor(float(alpha))
    return state


def test_fuse_refuses_missing_slots_and_mixed_scales():
    qkv = "lora_unet_double_blocks_4_img_attn_qkv"
    with pytest.raises(ValueError, match=qkv):  # a gap
        fuse_state({**_slot(f"{qkv}@0"), **_slot(f"{qkv}@2")})
    with pytest.raises(ValueError, match=qkv):  # the last slot (v) missing
        fuse_state({**_slot(f"{qkv}@0"), **_slot(f"{qkv}@1")})
    with pytest.raises(ValueError, match="lora_unet_single_blocks_0_linear1"):
        linear1 = "lora_unet_single_blocks_0_linear1"
        fuse_state({k: v for i in range(3) for k, v in _slot(f"{linear1}@{i}").items()})
    with pytest.raises(ValueError, match=qkv):  # a slot without lora_up
        state = {**_slot(f"{qkv}@0"), **_slot(f"{qkv}@1"), **_slot(f"{qkv}@2")}
        del state[f"{qkv}@1.lora_up.weight"]
        fuse_state(state)
    with pytest.raises(ValueError, match=qkv):  # alpha / rank 2 vs 1
        fuse_state({**_slot(f"{qkv}@0", alpha=4), **_slot(f"{qkv}@1", alpha=4),
                    **_slot(f"{qkv}@2", rank=4, alpha=4)})
    with pytest.raises(ValueError, match=qkv):  # missing alpha means alpha = rank
        fuse_state({**_slot(f"{qkv}@0", alpha=4), **_slot(f"{qkv}@1"), **_slot(f"{qkv}@2", alpha=4)})
    # same ratio with other ranks is fine
    fused = fuse_state({**_slot(f"{qkv}@0", alpha=1), **_slot(f"{qkv}@1", rank=4, alpha=2),
                        **_slot(f"{qkv}@2", alpha=1)})
    assert float(fused[f"{qkv}.alpha"]) == 4.0


def test_split_refuses_wrong_slot_sizes():
    name = "lora_unet_single_blocks_3_linear1"
    file_state = _slot(name, rank=4, alpha=4, out=30, inp=6)
    with pytest.raises(ValueError, match=name):
        split_state(file_state, {name: (8, 8, 8, 32)})
    del file_state[f"{name}.lora_up.weight"]
    with pytest.raises(ValueError, match=name):
        split_state(file_state, {name: (8, 8, 8, 6)})


# ---- 5. names against BFL's checkpoint layout ---------------------------------------------
def fake_bfl_checkpoint(double: int, single: int):
    """BFL Flux.1 keys with [rows, 1] int64 weights valued id * 10**6 + row, so that every
    diffusers weight the single-file converter makes tells which BFL rows it came from. Only
    the fused layers get their real row counts (the converter hard-codes linear1's split)."""
    rows = {"img_attn.qkv": 6, "txt_attn.qkv": 6, "linear1": 21504, "adaLN_modulation.1": 4}
    modules = ["time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
               "vector_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer", "txt_in",
               "img_in", "final_layer.linear", "final_layer.adaLN_modulation.1"]
    for i in range(double):
        modules += [f"double_blocks.{i}.{m}" for m in (
            "img_mod.lin", "txt_mod.lin", "img_attn.qkv", "txt_attn.qkv", "img_attn.proj",
            "txt_attn.proj", "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2")]
    for i in range(single):
        modules += [f"single_blocks.{i}.{m}" for m in ("linear1", "linear2", "modulation.lin")]
    checkpoint, ids = {}, {}
    for number, module in enumerate(modules, start=1):
        count = next((n for suffix, n in rows.items() if module.endswith(suffix)), 2)
        weight = number * 10**6 + torch.arange(count)
        checkpoint[f"{module}.weight"] = weight[:, None]
        checkpoint[f"{module}.bias"] = weight.clone()
        ids[number] = module
    for i in range(double):
        for part in ("img_attn", "txt_attn"):
            for norm in ("query_norm", "key_norm"):
                checkpoint[f"double_blocks.{i}.{part}.norm.{norm}.scale"] = torch.zeros(1)
    for i in range(single):
        for norm in ("query_norm", "key_norm"):
            checkpoint[f"single_blocks.{i}.norm.{norm}.scale"] = torch.zeros(1)
    return checkpoint, ids


def test_kohya_names_are_bfl_module_names():
    checkpoint, ids = fake_bfl_checkpoint(double=2, single=2)
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    assert not checkpoint  # the converter consumed every BFL key
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6), guidance_embeds=True)
    linears = [p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert {f"{p}.weight" for p in linears} <= set(converted)

    sources: dict[str, list[tuple[int, str]]] = {}  # BFL module -> [(first row, diffusers path)]
    for path in linears:
        first = int(converted[f"{path}.weight"][0, 0])
        sources.setdefault(ids[first // 10**6], []).append((first % 10**6, path))
    seen = set()
    for bfl, parts in sources.items():
        parts.sort()
        expected = "lora_unet_" + bfl.replace(".", "_")
        for slot, (first, path) in enumerate(parts):
            name = kohya_name(path)
            if bfl == "final_layer.adaLN_modulation.1":
                assert first != 0  # diffusers swaps its shift/scale halves: not a renaming
                assert name is None
                continue
            assert name == (expected if len(parts) == 1 else f"{expected}{SLOT}{slot}"), path
            seen.add(name)
    assert len(seen) == len(linears) - 1

    # diffusers' LoRA converter consumes all of those names, leaving nothing unconverted
    # (linear1 left out here: the converter splits it at Flux.1's width, tested above)
    shapes = {p: tuple(model.get_submodule(p).weight.shape) for p in linears
              if kohya_name(p) and "_linear1" not in kohya_name(p)}
    file_state = fuse_state(random_internal(shapes, 2, torch.Generator().manual_seed(8)))
    assert set(converted_factors(file_state)) == set(shapes)
