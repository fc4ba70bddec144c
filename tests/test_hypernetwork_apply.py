"""Hypernetworks applied to a tiny diffusers U-Net through attention processors.

The tiny U-Net has context widths 32 (self-attention of the outer blocks, and every
cross-attention: the text width is 32 too) and 64 (self-attention of the mid block).
"""
from __future__ import annotations

import pytest
import torch

from trainers import hypernetwork_attention as hna
from trainers.formats.hypernetwork import load_hypernetwork, save_hypernetwork
from trainers.formats.safe_load import save_torch_legacy
from trainers.hypernetwork_net import Hypernetwork, HypernetworkSpec


@pytest.fixture(scope="module")
def unet(tiny_model_dir):
    from diffusers import UNet2DConditionModel
    model = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    model.requires_grad_(False)
    return model.eval()


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 7, 32, generator=generator)
    return latents, torch.tensor([10, 500]), context


def run(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


def make(sizes=(32, 64), **kw) -> Hypernetwork:
    torch.manual_seed(1)
    kw.setdefault("weight_initialization", "XavierNormal")  # a visible effect
    return Hypernetwork(HypernetworkSpec(name="hn", sizes=list(sizes), **kw).validate())


def test_apply_changes_output_and_round_trips(unet, inputs, tmp_path):
    net = make(activation_func="relu", add_layer_norm=True)
    base = run(unet, inputs)
    with hna.applied(unet, net):
        applied = run(unet, inputs)
    assert (applied - base).abs().max() > 1e-3
    path = tmp_path / "hn.pt"
    save_hypernetwork(path, net)
    with hna.applied(unet, load_hypernetwork(path)):
        reloaded = run(unet, inputs)
    torch.testing.assert_close(reloaded, applied, rtol=0, atol=1e-6)


def test_strength(unet, inputs):
    net = make()
    base = run(unet, inputs)
    with hna.applied(unet, net, strength=0.0):
        zero = run(unet, inputs)
    torch.testing.assert_close(zero, base, rtol=0, atol=1e-6)
    with hna.applied(unet, net, strength=0.5) as processor:
        half = run(unet, inputs)
        processor.strength = 1.0
        full = run(unet, inputs)
    assert (half - base).abs().max() > 1e-4
    assert (full - half).abs().max() > 1e-4


def test_processors_restored_even_after_errors(unet, inputs):
    before = dict(unet.attn_processors)
    keys_before = list(unet.state_dict())
    net = make()
    with hna.applied(unet, net):
        during = unet.attn_processors
        assert all(isinstance(p, hna.HypernetworkAttnProcessor) for p in during.values())
        assert list(unet.state_dict()) == keys_before  # processors add no parameters
    assert all(unet.attn_processors[k] is p for k, p in before.items())
    with pytest.raises(RuntimeError, match="boom"):
        with hna.applied(unet, net):
            raise RuntimeError("boom")
    assert all(unet.attn_processors[k] is p for k, p in before.items())


def test_self_attention_gets_it_too_and_other_widths_are_untouched(unet, inputs):
    before = dict(unet.attn_processors)
    base = run(unet, inputs)
    # only width 64: only the mid block's self-attention (attn1) reads a 64-wide context
    net = make(sizes=[64])
    assert hna.target_modules(unet, net) == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    with hna.applied(unet, net):
        changed = [k for k, p in unet.attn_processors.items() if p is not before[k]]
        assert changed == ["mid_block.attentions.0.transformer_blocks.0.attn1.processor"]
        output = run(unet, inputs)
    assert (output - base).abs().max() > 1e-4
    # a size the U-Net does not have changes nothing
    with hna.applied(unet, make(sizes=[768])):
        assert all(unet.attn_processors[k] is p for k, p in before.items())
        assert torch.equal(run(unet, inputs), base)


def test_key_and_value_use_their_own_modules(unet):
    """One attention call checked against attention written out by hand."""
    attn = dict(unet.named_modules())["mid_block.attentions.0.transformer_blocks.0.attn1"]
    net = make(sizes=[64], activation_func="tanh")
    hidden = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(3))
    hyper_k, hyper_v = net.layers[64]
    with torch.no_grad():
        q = attn.to_q(hidden)
        k = attn.to_k(hyper_k(hidden))
        v = attn.to_v(hyper_v(hidden))
        heads = attn.heads

        def split(t):
            return t.view(2, 16, heads, -1).transpose(1, 2)

        weights = (split(q) @ split(k).transpose(-1, -2) * attn.scale).softmax(-1)
        expected = attn.to_out[0]((weights @ split(v)).transpose(1, 2).reshape(2, 16, -1))
        with hna.applied(unet, net):
            got = attn(hidden)
        swapped = net.layers[64][::-1]
        net.layers[64] = swapped
        with hna.applied(unet, net):
            wrong = attn(hidden)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (wrong - expected).abs().max() > 1e-5


def test_legacy_file_applies(unet, inputs, tmp_path):
    generator = torch.Generator().manual_seed(5)

    def state():
        return {"linear1.weight": torch.randn(64, 32, generator=generator) * 0.2,
                "linear1.bias": torch.zeros(64),
                "linear2.weight": torch.randn(32, 64, generator=generator) * 0.2,
                "linear2.bias": torch.zeros(32)}

    path = tmp_path / "old.pt"
    save_torch_legacy({32: (state(), state()), "step": 100}, path)
    net = load_hypernetwork(path)
    base = run(unet, inputs)
    with hna.applied(unet, net):
        output = run(unet, inputs)
    assert (output - base).abs().max() > 1e-4


def test_training_grads_reach_only_the_hypernetwork(unet, inputs):
    net = make(activation_func="relu", add_layer_norm=True, use_dropout=True,
               dropout_structure=[0, 0.1, 0]).train()
    latents, timesteps, context = inputs
    with hna.applied(unet, net):
        loss = unet(latents, timesteps, context).sample.pow(2).mean()
    loss.backward()
    assert all(p.grad is None for p in unet.parameters())
    for size in (32, 64):
        for module in net.layers[size]:
            grads = [p.grad for p in module.parameters()]
            assert all(g is not None for g in grads), size
            assert any(g.abs().sum() > 0 for g in grads), size
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in net.parameters()]
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, net.parameters()))
    net.eval()
    assert not any(p.requires_grad for p in net.parameters())


def test_install_and_remove(unet, inputs):
    before = dict(unet.attn_processors)
    base = run(unet, inputs)
    net = make()
    hna.install(unet, net, 1.0)
    hna.install(unet, net, 0.7)  # replaces; remove still brings back the originals
    assert hna.is_installed(unet)
    assert (run(unet, inputs) - base).abs().max() > 1e-4
    hna.remove(unet)
    hna.remove(unet)  # a second remove does nothing
    assert not hna.is_installed(unet)
    assert all(unet.attn_processors[k] is p for k, p in before.items())
    assert torch.equal(run(unet, inputs), base)


def test_attention_widths(unet):
    assert hna.attention_widths(unet) == {32, 64}
