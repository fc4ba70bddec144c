"""Resize LoRA (#21 item 4): each layer's change cut to a lower rank by SVD (a fixed rank or
kohya's dynamic sv_ratio / sv_cumulative / sv_fro), written as a kohya file diffusers loads; bad
settings named; nothing on disk replaced silently."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.config import ConfigError
from tests.conftest import RecordingContext, demo_images_with_lora, kohya_photos
from tests.test_lora_training import lora_config
from trainers.configs import ResizeLoraConfig
from trainers.formats.lora import load_lora, save_lora
from trainers.methods.lora import run as train_lora
from trainers.preflight import check_before_queueing
from trainers.resize_lora import layer_delta, resize_layers, resize_state, run


def random_lora(rank: int = 8) -> dict:
    torch.manual_seed(0)
    return {"lora_unet_a.lora_down.weight": torch.randn(rank, 16),
            "lora_unet_a.lora_up.weight": torch.randn(12, rank),
            "lora_unet_a.alpha": torch.tensor(4.0),
            "lora_unet_conv.lora_down.weight": torch.randn(rank, 6, 3, 3),
            "lora_unet_conv.lora_up.weight": torch.randn(10, rank, 1, 1),
            "lora_unet_conv.alpha": torch.tensor(float(rank))}


def test_each_layer_becomes_its_best_lower_rank_approximation():
    state = random_lora(8)
    small = resize_state(state, rank=3, conv_rank=2)
    assert small["lora_unet_a.lora_down.weight"].shape == (3, 16)
    assert small["lora_unet_a.lora_up.weight"].shape == (12, 3)
    assert small["lora_unet_conv.lora_down.weight"].shape == (2, 6, 3, 3)
    assert small["lora_unet_conv.lora_up.weight"].shape == (10, 2, 1, 1)
    for name, rank in (("lora_unet_a", 3), ("lora_unet_conv", 2)):
        full = layer_delta(state, name)
        s = torch.linalg.svdvals(full)
        error = torch.linalg.matrix_norm(full - layer_delta(small, name))
        # Eckart-Young: the best rank-r error is the norm of the dropped singular values
        assert float(error) == pytest.approx(float(s[rank:].norm()), rel=1e-4)
    same = resize_state(state, rank=16)  # a layer at or below the rank keeps its change
    assert same["lora_unet_a.lora_down.weight"].shape[0] == 8
    for name in ("lora_unet_a", "lora_unet_conv"):
        assert torch.allclose(layer_delta(same, name), layer_delta(state, name), atol=1e-4)


def test_a_trained_lora_resized_loads_in_diffusers_and_still_changes_the_image(data_paths, tmp_path):
    trained = train_lora(lora_config(kohya_photos(tmp_path / "train"), max_train_steps=4,
                                     learning_rate=5e-3, network_dim=4, conv_dim=2),
                         RecordingContext(data_paths))
    ctx = RecordingContext(data_paths)
    path = run(ResizeLoraConfig(lora=trained.name, output_name="small", rank=2,
                                save_precision="fp32"), ctx)
    assert path == data_paths.lora / "small.safetensors"
    state, meta = load_lora(path)
    assert {v.shape[0] for k, v in state.items() if k.endswith(".lora_down.weight")} == {2}
    assert meta["ss_network_dim"] == "2" and "resized from mylora.safetensors" in \
        meta["ss_training_comment"]
    assert "% of its weight change kept" in ctx.events[-1].message
    base, with_lora = demo_images_with_lora(data_paths, path)
    assert not np.allclose(base, with_lora)

    # the same file resized dynamically: each layer its own rank by kohya's sv_fro
    source, _ = load_lora(trained)
    ctx = RecordingContext(data_paths)
    path = run(ResizeLoraConfig(lora=trained.name, output_name="dynamic", rank=4,
                                dynamic_method="sv_fro", dynamic_param=0.6,
                                save_precision="fp32"), ctx)
    state, meta = load_lora(path)
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "Dynamic"
    assert meta["ss_training_comment"].startswith("Dynamic resize with sv_fro: 0.6 from 4")
    assert "ranks " in ctx.events[-1].message and "by sv_fro 0.6" in ctx.events[-1].message
    names = [k[:-len(".lora_down.weight")] for k in state if k.endswith(".lora_down.weight")]
    for name in names:
        s = torch.linalg.svdvals(layer_delta(source, name)).double().numpy()
        rank = state[name + ".lora_down.weight"].shape[0]
        old = source[name + ".lora_down.weight"].shape[0]
        assert rank == min(formula_rank(s, "sv_fro", 0.6), old), name
        assert torch.allclose(layer_delta(state, name), truncated(layer_delta(source, name), rank),
                              atol=1e-5), name
    base, with_lora = demo_images_with_lora(data_paths, path)
    assert not np.allclose(base, with_lora)

    # Danlu's own network (Compare, resume) takes each layer at its own rank
    from trainers.checkpoint_apply import spec_from_state
    from trainers.lora_network import LoraNetwork
    from trainers.models import load_model
    model = load_model(data_paths, "tiny-demo")
    mixed = dict(load_lora(data_paths.lora / "small.safetensors")[0])  # rank 2 everywhere ...
    for key in [k for k in source if k.startswith(names[0] + ".")]:
        mixed[key] = source[key]  # ... but one layer at its trained rank 4
    assert len({v.shape[0] for k, v in mixed.items() if k.endswith("down.weight")}) > 1
    with LoraNetwork(model.unet, model.text_encoder, spec_from_state(mixed)) as network:
        network.load_kohya_state_dict(mixed)
        assert all(torch.equal(network.kohya_state_dict()[k], v.float()) for k, v in mixed.items())


def formula_rank(s, method: str, param: float) -> int:
    """The issue's definitions, written out independently of the code under test."""
    s = [float(x) for x in s]
    if method == "sv_ratio":
        count = sum(1 for x in s if x > s[0] / param)
    else:
        values = [x * x for x in s] if method == "sv_fro" else s
        target = param ** 2 if method == "sv_fro" else param
        total, running, count = sum(values), 0.0, len(s)
        for i, x in enumerate(values):
            running += x
            if running / total >= target:
                count = i + 1
                break
    return max(1, min(count, len(s)))


def truncated(delta: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).float()


SINGULAR = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]


def known_lora(singular=SINGULAR, alpha: float = 2.0) -> dict:
    """A linear layer (12 x 16) and a 3x3 convolution (10 x 6*9) whose up @ down has exactly
    the singular values `singular`, plus an empty layer (up all zero)."""
    generator = torch.Generator().manual_seed(1)
    rank = len(singular)
    state = {}
    for name, out, inner, kernel in (("lora_unet_a", 12, 16, ()), ("lora_unet_conv", 10, 54, (3, 3))):
        u = torch.linalg.qr(torch.randn(out, rank, generator=generator, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(inner, rank, generator=generator, dtype=torch.float64))[0]
        channels = inner // 9 if kernel else inner
        state[f"{name}.lora_up.weight"] = (u * torch.tensor(singular, dtype=torch.float64)) \
            .float().reshape(out, rank, *([1] * len(kernel)))
        state[f"{name}.lora_down.weight"] = v.T.float().reshape(rank, channels, *kernel)
        state[f"{name}.alpha"] = torch.tensor(alpha)
    state["lora_unet_empty.lora_down.weight"] = torch.randn(rank, 16, generator=generator)
    state["lora_unet_empty.lora_up.weight"] = torch.zeros(12, rank)
    state["lora_unet_empty.alpha"] = torch.tensor(alpha)
    return state


@pytest.mark.parametrize("method, param, expected", [
    ("sv_ratio", 5.0, 3),          # kept: S > 8 / 5 = 1.6 -> 8, 4, 2
    ("sv_ratio", 10.0, 4),         # S > 0.8
    ("sv_ratio", 1.5, 1),          # S > 5.33: only the largest
    ("sv_cumulative", 0.9, 4),     # cumsum / 15.75: .508 .762 .889 .952
    ("sv_cumulative", 0.76, 2),
    ("sv_cumulative", 0.5, 1),
    ("sv_cumulative", 1.0, 6),
    ("sv_fro", 0.95, 2),           # sqrt(cumsum(S^2) / 85.31): .866 .968 .992 .998
    ("sv_fro", 0.99, 3),
    ("sv_fro", 0.8, 1),
    ("sv_fro", 1.0, 6),
])
def test_each_dynamic_method_picks_the_rank_its_formula_gives(method, param, expected):
    assert formula_rank(SINGULAR, method, param) == expected
    state = known_lora()
    small, report = resize_layers(state, rank=8, method=method, param=param)
    ranks = {r.name: r.new_rank for r in report}
    assert ranks == {"lora_unet_a": expected, "lora_unet_conv": expected, "lora_unet_empty": 1}
    assert small["lora_unet_conv.lora_down.weight"].shape == (expected, 6, 3, 3)
    assert small["lora_unet_conv.lora_up.weight"].shape == (10, expected, 1, 1)
    for name in ("lora_unet_a", "lora_unet_conv"):
        # kohya's alpha: the layer's scale (2 / 6) kept, alpha = scale * new rank
        assert float(small[f"{name}.alpha"]) == pytest.approx(2.0 / 6 * expected)
        full = layer_delta(state, name)
        assert torch.allclose(layer_delta(small, name), truncated(full, expected), atol=1e-5)
        info = next(r for r in report if r.name == name)
        kept = sum(x * x for x in SINGULAR[:expected]) / sum(x * x for x in SINGULAR)
        assert info.fro_retained == pytest.approx(kept ** 0.5, rel=1e-5)
    assert not layer_delta(small, "lora_unet_empty").any()


def test_the_dynamic_rank_is_bounded_by_rank_conv_rank_and_the_layers_own_rank():
    state = known_lora()
    ranks = {r.name: r.new_rank for r in resize_layers(state, rank=2, conv_rank=3,
                                                       method="sv_cumulative", param=0.9)[1]}
    assert ranks["lora_unet_a"] == 2 and ranks["lora_unet_conv"] == 3  # the formula says 4
    # a ratio so large that the product's numerical noise beyond its rank would count
    ranks = {r.name: r.new_rank for r in resize_layers(known_lora(SINGULAR[:3]), rank=64,
                                                       method="sv_ratio", param=1e9)[1]}
    assert ranks["lora_unet_a"] == ranks["lora_unet_conv"] == 3
    fixed = resize_state(state, rank=3)  # fixed rank: one rank and alpha = rank, as before
    assert {fixed[k].shape[0] for k in fixed if k.endswith(".lora_down.weight")} == {3}
    assert {float(fixed[k]) for k in fixed if k.endswith(".alpha")} == {3.0}
    assert torch.allclose(layer_delta(fixed, "lora_unet_a"),
                          truncated(layer_delta(state, "lora_unet_a"), 3), atol=1e-5)


def test_a_dynamic_resize_writes_kohyas_metadata(data_paths):
    save_lora(data_paths.lora / "known.safetensors", known_lora(),
              {"ss_network_dim": "6", "ss_network_alpha": "2.0"})
    ctx = RecordingContext(data_paths)
    path = run(ResizeLoraConfig(lora="known.safetensors", output_name="dyn", rank=8, conv_rank=5,
                                dynamic_method="sv_ratio", dynamic_param=5,
                                save_precision="fp32"), ctx)
    state, meta = load_lora(path)
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "Dynamic"
    assert meta["ss_training_comment"] == ("Dynamic resize with sv_ratio: 5 from 6 (at most "
                                           "rank 8, conv 5); resized from known.safetensors "
                                           "(rank 6)")
    assert state["lora_unet_a.lora_down.weight"].shape[0] == 3
    assert "ranks 1-3 (mean 2.3) by sv_ratio 5" in ctx.events[-1].message
    assert "least " in ctx.events[-1].message


def test_bad_settings_are_named_and_nothing_is_replaced(data_paths):
    save_lora(data_paths.lora / "mine.safetensors", random_lora(4))
    before = (data_paths.lora / "mine.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="lora: choose the LoRA to resize"):
        ResizeLoraConfig(output_name="x").validate()
    with pytest.raises(ConfigError, match="rank"):
        ResizeLoraConfig(lora="mine.safetensors", output_name="x", rank=0).validate()
    with pytest.raises(ConfigError, match="output_name: choose a name other than"):
        ResizeLoraConfig(lora="mine.safetensors", output_name="mine").validate()
    for method, param, message in (
            ("sv_best", 0.9, "dynamic_method: 'sv_best' is not one of sv_ratio, sv_fro, "
                             "sv_cumulative"),
            ("none", 0.9, "dynamic_param: set only with a dynamic_method"),
            ("", 0, "dynamic_method: '' is not one of"),
            ("sv_ratio", 1.0, "dynamic_param: sv_ratio needs a ratio above 1"),
            ("sv_ratio", 0.0, "dynamic_param: sv_ratio needs a ratio above 1"),
            ("sv_fro", 0.0, r"dynamic_param: sv_fro needs a share in \(0, 1\]"),
            ("sv_fro", 1.5, r"dynamic_param: sv_fro needs a share in \(0, 1\]"),
            ("sv_cumulative", -0.1, r"dynamic_param: sv_cumulative needs a share in \(0, 1\]"),
            ("sv_cumulative", float("nan"), "dynamic_param: sv_cumulative needs a share")):
        with pytest.raises(ConfigError, match=message):
            ResizeLoraConfig(lora="mine.safetensors", output_name="x", dynamic_method=method,
                             dynamic_param=param).validate()
    for method, param in (("sv_ratio", 1.01), ("sv_fro", 1.0), ("sv_cumulative", 0.01), ("none", 0)):
        ResizeLoraConfig(lora="mine.safetensors", output_name="x", dynamic_method=method,
                         dynamic_param=param).validate()
    with pytest.raises(ConfigError, match="lora: no file 'gone.safetensors'"):
        check_before_queueing(ResizeLoraConfig(lora="gone.safetensors", output_name="x").validate(),
                              data_paths)
    save_lora(data_paths.lora / "taken.safetensors", random_lora(2))
    taken = (data_paths.lora / "taken.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="output_name: taken.safetensors exists .* 'Overwrite'"):
        check_before_queueing(ResizeLoraConfig(lora="mine.safetensors", output_name="taken"),
                              data_paths)
    with pytest.raises(FileExistsError, match="taken.safetensors exists"):
        run(ResizeLoraConfig(lora="mine.safetensors", output_name="taken"),
            RecordingContext(data_paths))
    assert (data_paths.lora / "taken.safetensors").read_bytes() == taken
    assert (data_paths.lora / "mine.safetensors").read_bytes() == before
