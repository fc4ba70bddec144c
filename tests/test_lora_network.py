"""LoRA network on the tiny SD1 model: kohya names, diffusers loads our files, remove() restores."""
from __future__ import annotations

import copy
import re

import pytest
import torch

from trainers.formats.lora import load_lora, save_lora
from trainers.lora_network import LoraNetwork, LoraSpec, LoraStateError, merge_into

RANK, ALPHA, CONV_RANK, CONV_ALPHA = 4, 2.0, 2, 4.0


def load_pipe(model_dir):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return load_pipe(tiny_model_dir)


@pytest.fixture
def network(pipe):
    """A factory for networks on the shared pipeline; every one is removed after the test."""
    made = []

    def make(**spec):
        net = LoraNetwork(pipe.unet, pipe.text_encoder, LoraSpec(**spec))
        made.append(net)
        return net
    yield make
    for net in made:
        net.remove()


def randomize(net: LoraNetwork, seed: int = 1, std: float = 0.2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)


INPUT_IDS = torch.tensor([[49406, 320, 1125, 539, 48136, 1929, 49407] + [49407] * 70])


def outputs(unet, text_encoder):
    """(text embedding, U-Net prediction) for fixed inputs."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    with torch.no_grad():
        cond = text_encoder(INPUT_IDS)[0]
        noise_pred = unet(latents, torch.tensor([500]), encoder_hidden_states=cond).sample
    return cond, noise_pred


def image(pipe):
    return pipe("a photo of sks dog", num_inference_steps=2, guidance_scale=1.0, height=64,
                width=64, output_type="np", generator=torch.Generator().manual_seed(0)).images


def expected_attention_targets(unet, text_encoder):
    """Independently: every Linear/Conv2d below a U-Net `attentions.N` block, every Linear of a
    CLIP layer's self_attn / mlp, spelled the kohya way."""
    unet_names = {"lora_unet_" + path.replace(".", "_") for path, m in unet.named_modules()
                  if re.search(r"(^|\.)attentions\.\d+\.", path)
                  and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    te_names = {"lora_te_text_model_" + path.replace(".", "_")
                for path, m in text_encoder.named_modules()
                if re.fullmatch(r"encoder\.layers\.\d+\.(self_attn|mlp)\.\w+", path)
                and isinstance(m, torch.nn.Linear)}
    return unet_names, te_names


def module_names(state):
    return {key.split(".", 1)[0] for key in state}


def test_kohya_names_and_shapes(pipe, network):
    unet_names, te_names = expected_attention_targets(pipe.unet, pipe.text_encoder)
    assert len(unet_names) == 4 * 12 and len(te_names) == 2 * 6  # 4 transformers, 2 CLIP layers
    net = network(rank=RANK, alpha=ALPHA)
    state = net.kohya_state_dict()
    names = module_names(state)
    assert names == unet_names | te_names
    assert len(state) == 3 * len(names)
    assert all("." not in name for name in names)

    def shapes(name):
        return [list(state[f"{name}.lora_down.weight"].shape),
                list(state[f"{name}.lora_up.weight"].shape)]
    assert shapes("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q") == \
        [[RANK, 32], [32, RANK]]
    assert shapes("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k") == \
        [[RANK, 32], [32, RANK]]  # cross-attention: in = cross_attention_dim
    assert shapes("lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj") == \
        [[RANK, 32], [256, RANK]]  # GEGLU: out = 2 * 4 * 32
    assert shapes("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0") == \
        [[RANK, 64], [64, RANK]]
    assert shapes("lora_unet_down_blocks_0_attentions_0_proj_in") == \
        [[RANK, 32, 1, 1], [32, RANK, 1, 1]]  # SD1 proj_in is a 1x1 conv
    assert shapes("lora_te_text_model_encoder_layers_0_self_attn_q_proj") == [[RANK, 32], [32, RANK]]
    assert shapes("lora_te_text_model_encoder_layers_1_mlp_fc2") == [[RANK, 64], [32, RANK]]
    alpha = state["lora_te_text_model_encoder_layers_1_mlp_fc2.alpha"]
    assert alpha.shape == () and alpha.item() == ALPHA
    assert not any("resnets" in name or "conv_in" in name for name in names)
    # kohya's init: down random, up zero
    assert state["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"].abs().sum() > 0
    assert all(state[k].abs().sum() == 0 for k in state if k.endswith("lora_up.weight"))


def test_conv_locon_targets(pipe, network):
    unet_names, te_names = expected_attention_targets(pipe.unet, pipe.text_encoder)
    big = {f"lora_unet_{p.replace('.', '_')}" for p, m in pipe.unet.named_modules()
           if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
           and re.search(r"\.(resnets|downsamplers|upsamplers)\.\d+\.", p)}
    net = network(rank=RANK, alpha=ALPHA, conv_rank=CONV_RANK, conv_alpha=CONV_ALPHA)
    state = net.kohya_state_dict()
    names = module_names(state)
    extra = names - unet_names - te_names
    assert len(big) == 18  # 8 resnets x (conv1, conv2) + downsampler + upsampler
    small = {n for n in extra if n.endswith(("conv_shortcut", "time_emb_proj"))}
    assert extra == big | small and len(small) == 5 + 8
    assert "lora_unet_conv_in" not in names and "lora_unet_conv_out" not in names

    def shapes(name):
        return [list(state[f"{name}.lora_down.weight"].shape),
                list(state[f"{name}.lora_up.weight"].shape)]
    assert shapes("lora_unet_down_blocks_0_resnets_0_conv1") == \
        [[CONV_RANK, 32, 3, 3], [32, CONV_RANK, 1, 1]]
    assert shapes("lora_unet_down_blocks_0_downsamplers_0_conv") == \
        [[CONV_RANK, 32, 3, 3], [32, CONV_RANK, 1, 1]]
    assert shapes("lora_unet_up_blocks_0_upsamplers_0_conv") == \
        [[CONV_RANK, 64, 3, 3], [64, CONV_RANK, 1, 1]]
    assert shapes("lora_unet_up_blocks_1_resnets_0_conv_shortcut") == \
        [[RANK, 96, 1, 1], [32, RANK, 1, 1]]  # 64 + skip 32
    assert shapes("lora_unet_mid_block_resnets_0_time_emb_proj") == [[RANK, 128], [64, RANK]]
    assert state["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].item() == CONV_ALPHA
    assert state["lora_unet_mid_block_resnets_0_time_emb_proj.alpha"].item() == ALPHA
    downsampler = pipe.unet.down_blocks[0].downsamplers[0].conv
    assert downsampler.lora_A["danlu"].stride == (2, 2)  # down conv keeps the base stride


def test_only_lora_trains_and_remove_restores_exactly(pipe):
    unet, te = pipe.unet, pipe.text_encoder
    before = {k: v.clone() for k, v in {**unet.state_dict(), **{f"te.{k}": v for k, v in
                                                                te.state_dict().items()}}.items()}
    classes = {p: type(m) for p, m in [*unet.named_modules(), *te.named_modules()]}
    flags = {n: p.requires_grad for n, p in [*unet.named_parameters(), *te.named_parameters()]}
    base_out = outputs(unet, te)

    net = LoraNetwork(unet, te, LoraSpec(rank=RANK, alpha=ALPHA, conv_rank=CONV_RANK))
    try:
        assert all(torch.equal(a, b) for a, b in zip(outputs(unet, te), base_out))  # up = 0
        trainable = [p for p in [*unet.parameters(), *te.parameters()] if p.requires_grad]
        ours = net.unet_parameters() + net.text_encoder_parameters()
        assert {id(p) for p in trainable} == {id(p) for p in ours}
        assert len(net.unet_parameters()) == 2 * (48 + 31) and len(net.text_encoder_parameters()) == 24
        optimizer = torch.optim.SGD(ours, lr=0.1)
        cond = te(INPUT_IDS)[0]
        pred = unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), encoder_hidden_states=cond).sample
        pred.square().mean().backward()
        optimizer.step()
        ups = [v for k, v in net.kohya_state_dict().items() if k.endswith("lora_up.weight")]
        assert any(v.abs().sum() > 0 for v in ups)  # the step trained the (zero-initialised) ups
    finally:
        net.remove()
    after = {**unet.state_dict(), **{f"te.{k}": v for k, v in te.state_dict().items()}}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert {p: type(m) for p, m in [*unet.named_modules(), *te.named_modules()]} == classes
    assert {n: p.requires_grad for n, p in [*unet.named_parameters(), *te.named_parameters()]} == flags
    assert "peft_config" not in vars(unet) and "peft_config" not in vars(te)
    assert all(torch.equal(a, b) for a, b in zip(outputs(unet, te), base_out))


def test_diffusers_loads_our_file_and_agrees(pipe, tiny_model_dir, tmp_path):
    unet, te = pipe.unet, pipe.text_encoder
    base_cond, base_pred = outputs(unet, te)
    base_image = image(pipe)
    net = LoraNetwork(unet, te, LoraSpec(rank=RANK, alpha=ALPHA, conv_rank=CONV_RANK,
                                         conv_alpha=CONV_ALPHA))
    try:
        randomize(net)
        ours_cond, ours_pred = outputs(unet, te)
        ours_image = image(pipe)
        net.set_strength(0.0)
        zero = outputs(unet, te)
        net.set_strength(1.0)
        state = net.kohya_state_dict()
        path = tmp_path / "sks.safetensors"
        save_lora(path, state, {"ss_network_module": "networks.lora"})
    finally:
        net.remove()
    assert torch.equal(zero[0], base_cond) and torch.equal(zero[1], base_pred)
    assert (ours_cond - base_cond).abs().max() > 1e-2 and (ours_pred - base_pred).abs().max() > 1e-2

    # diffusers, from the file on disk, at LoRA scale 1
    other = load_pipe(tiny_model_dir)
    other.load_lora_weights(str(path))
    loaded = [n for n, m in other.unet.named_modules() if hasattr(m, "lora_A")]
    assert "down_blocks.0.resnets.0.conv1" in loaded and "mid_block.resnets.0.time_emb_proj" in loaded
    assert sum(hasattr(m, "lora_A") for m in other.text_encoder.modules()) == 12
    theirs_cond, theirs_pred = outputs(other.unet, other.text_encoder)
    torch.testing.assert_close(theirs_cond, ours_cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs_pred, ours_pred, atol=1e-5, rtol=1e-5)
    theirs_image = image(other)
    assert abs(theirs_image - base_image).max() > 1e-3
    assert abs(theirs_image - ours_image).max() < 1e-4

    # merging W + (alpha/r) up @ down into plain copies gives the same function
    file_state, _ = load_lora(path)
    plain_unet, plain_te = copy.deepcopy(unet), copy.deepcopy(te)
    merged = merge_into(plain_unet, plain_te, file_state)
    assert len(merged) == 48 + 31 + 12
    merged_cond, merged_pred = outputs(plain_unet, plain_te)
    torch.testing.assert_close(merged_cond, ours_cond, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged_pred, ours_pred, atol=1e-4, rtol=1e-4)


def test_strength_scales_the_delta(pipe, network):
    te_names = expected_attention_targets(pipe.unet, pipe.text_encoder)[1]
    net = network(rank=RANK, alpha=ALPHA, train_unet=False)
    randomize(net)
    net.set_strength(0.0)
    zero = pipe.text_encoder.encoder.layers[0].self_attn.q_proj(torch.ones(1, 32))
    net.set_strength(1.0)
    one = pipe.text_encoder.encoder.layers[0].self_attn.q_proj(torch.ones(1, 32))
    net.set_strength(0.5)
    half = pipe.text_encoder.encoder.layers[0].self_attn.q_proj(torch.ones(1, 32))
    torch.testing.assert_close(half - zero, (one - zero) / 2)
    assert module_names(net.kohya_state_dict()) == te_names  # text encoder only
    assert net.unet_parameters() == [] and "peft_config" not in vars(pipe.unet)


def test_load_state_dict_roundtrip_and_mismatch(pipe, network):
    net = network(rank=RANK, alpha=ALPHA)
    randomize(net, seed=3)
    state = net.kohya_state_dict()
    net.remove()

    same = network(rank=RANK, alpha=ALPHA)
    same.load_kohya_state_dict(state)
    again = same.kohya_state_dict()
    assert all(torch.equal(again[k], state[k]) for k in state)
    same.remove()

    other_rank = network(rank=RANK * 2, alpha=ALPHA)
    with pytest.raises(LoraStateError, match="different network config") as error:
        other_rank.load_kohya_state_dict(state)
    assert "shape" in str(error.value) and "lora_down" in str(error.value)
    other_rank.remove()

    with_conv = network(rank=RANK, alpha=ALPHA, conv_rank=CONV_RANK)
    with pytest.raises(LoraStateError, match="missing"):
        with_conv.load_kohya_state_dict(state)
    with_conv.remove()

    other_alpha = network(rank=RANK, alpha=ALPHA * 2)
    with pytest.raises(LoraStateError, match="alpha"):
        other_alpha.load_kohya_state_dict(state)
    other_alpha.remove()

    te_only = network(rank=RANK, alpha=ALPHA, train_unet=False)
    with pytest.raises(LoraStateError, match="unexpected"):
        te_only.load_kohya_state_dict(state)


def test_text_encoder_with_text_model_level_is_not_doubled():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    model = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=16, intermediate_size=24, num_attention_heads=2, num_hidden_layers=1,
        projection_dim=8, vocab_size=100, max_position_embeddings=8))
    assert any(p.startswith("text_model.") for p, _ in model.named_modules())
    net = LoraNetwork(None, model, LoraSpec(rank=2, train_unet=False))
    try:
        names = module_names(net.kohya_state_dict())
    finally:
        net.remove()
    assert names == {f"lora_te_text_model_encoder_layers_0_{n}" for n in
                     ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj",
                      "self_attn_out_proj", "mlp_fc1", "mlp_fc2")}


def test_refuses_a_second_network_on_the_same_model(pipe, network):
    network(rank=2)
    with pytest.raises(RuntimeError, match="already carries peft adapters"):
        LoraNetwork(pipe.unet, pipe.text_encoder, LoraSpec(rank=2))
