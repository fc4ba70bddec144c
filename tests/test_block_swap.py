"""Block swap (#19 item 3): the frozen weights of the denoiser's last N blocks wait off the
device and come in just before each block runs. On the CPU the copies are the same memory, so
these tests make the parked weights NaN: any use of a block that is not in place poisons the
loss. The losses then equal a run without swapping, bit for bit, the blocks are visited in
order (forward, then backward in reverse), LoRA factors never move, and bad counts are refused
by name."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.config import ConfigError, from_dict
from core.events import Preview
from tests.conftest import RecordingContext, kohya_photos
from tests.test_lora_training import lora_config
from trainers import block_swap
from trainers.configs import DreamBoothConfig, LoraConfig
from trainers.loop import TrainingError
from trainers.methods.lora import run


class _Poisoned(block_swap._Slot):
    """Parked weights read as NaN (their real copies are kept for coming back)."""

    def parked(self):
        return [torch.full_like(home, float("nan")) if home.is_floating_point() else home
                for home in self.homes]


@pytest.fixture
def poisoned(monkeypatch):
    made = []
    original = block_swap.BlockSwap.__init__

    def spy(self, denoiser, count, slot=_Poisoned):
        original(self, denoiser, count, slot=_Poisoned)
        made.append(self)
    monkeypatch.setattr(block_swap.BlockSwap, "__init__", spy)
    return made


def _losses(paths, folder, **changes):
    ctx = RecordingContext(paths)
    run(lora_config(folder, overwrite=True, **changes), ctx)
    return ctx


@pytest.mark.parametrize("checkpointing", [False, True])
def test_swapped_unet_blocks_train_exactly_like_resident_ones(data_paths, tmp_path, poisoned,
                                                              checkpointing):
    folder = kohya_photos(tmp_path / "train")
    settings = dict(max_train_steps=3, gradient_checkpointing=checkpointing, conv_dim=2,
                    sample_every_n_steps=3, sample_prompts="zxq cat --w 64 --h 64 --s 2 --d 3")
    plain = _losses(data_paths, folder, **settings)
    swapped = _losses(data_paths, folder, blocks_to_swap=3, **settings)
    assert len(swapped.losses) == 3 and np.all(np.isfinite(swapped.losses))
    assert swapped.losses == plain.losses
    assert [p.step for p in swapped.of(Preview)] == [3]  # previews swap blocks in too
    swap = poisoned[0]
    assert [slot.index for slot in swap.slots] == [1, 2, 3]  # the demo has 2 down, 2 up blocks
    # the first step: forward 1..3 in order, then backward from 2 down (3 is still in place)
    assert swap.visits[:5] == [1, 2, 3, 2, 1]
    # after the run every block holds its real weights again
    for slot in swap.slots:
        assert slot.present
        assert all(torch.isfinite(p).all() for p in slot.block.parameters())


def test_lora_factors_stay_where_the_optimizer_has_them(data_paths, tmp_path):
    from trainers.models import load_model
    from trainers.lora_network import LoraNetwork, LoraSpec
    model = load_model(data_paths, "tiny-demo")
    network = LoraNetwork(model.unet, model.text_encoder, LoraSpec(rank=2, alpha=1.0,
                                                                   train_text_encoder=False))
    try:
        trained = {id(p): p.data_ptr() for p in network.unet_parameters()}
        with block_swap.BlockSwap(model.unet, 2, slot=_Poisoned) as swap:
            slot = swap.slots[0]
            moved = {id(module._parameters[name]) for module, name, is_param in slot.tensors
                     if is_param}
            assert moved and not moved & set(trained)  # only frozen weights are swapped
            assert all(torch.isnan(module._parameters[name]).all()
                       for module, name, is_param in slot.tensors if is_param)
        assert {id(p): p.data_ptr() for p in network.unet_parameters()} == trained
    finally:
        network.remove()


def test_flow_transformer_blocks_swap_too(family_paths, tmp_path, poisoned):
    folder = kohya_photos(tmp_path / "train")
    settings = dict(model="tiny-demo-flux", network_train_unet_only=True, max_train_steps=2,
                    mixed_precision="bf16")
    plain = _losses(family_paths, folder, **settings)
    swapped = _losses(family_paths, folder, blocks_to_swap=1, **settings)
    assert np.all(np.isfinite(swapped.losses)) and swapped.losses == plain.losses
    from trainers.models import load_model
    transformer = load_model(family_paths, "tiny-demo-flux", frozen_dtype="bf16").unet
    blocks = block_swap.swappable_blocks(transformer)
    assert blocks == [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    assert poisoned[0].slots[0].block is blocks[-1]


def test_bad_counts_and_methods_are_refused_by_name(data_paths, tmp_path):
    folder = kohya_photos(tmp_path / "train")
    with pytest.raises(TrainingError, match=r"blocks_to_swap: UNet2DConditionModel has 4 "
                                            r"blocks; swap 1 to 3 of them.*got 4"):
        run(lora_config(folder, blocks_to_swap=4), RecordingContext(data_paths))
    with pytest.raises(ConfigError, match="blocks_to_swap"):
        LoraConfig(blocks_to_swap=-1, model="m", output_name="o", train_data_dir="d").validate()
    # DreamBooth trains every weight of the U-Net: nothing frozen to swap, so no such option
    with pytest.raises(ConfigError, match="blocks_to_swap: unknown setting"):
        from_dict(DreamBoothConfig, {"blocks_to_swap": 2})
    with pytest.raises(block_swap.BlockSwapError, match="no blocks"):
        block_swap.swappable_blocks(torch.nn.Linear(2, 2))


def test_the_estimate_leaves_out_the_swapped_blocks_weights():
    from trainers.memory_estimate import estimate
    resident = estimate(LoraConfig(mixed_precision="bf16"), "sdxl").parts["weights"]
    swapped = estimate(LoraConfig(mixed_precision="bf16", blocks_to_swap=3), "sdxl").parts["weights"]
    # SDXL's U-Net in bf16: 3 of its 6 blocks wait in CPU memory, but the one that runs and
    # the one copied ahead are on the device: a sixth of it is off
    unet = 2567.5e6 * 2
    assert resident - swapped == pytest.approx(unet / 6)
    one = estimate(LoraConfig(mixed_precision="bf16", blocks_to_swap=1), "sdxl").parts["weights"]
    assert one == resident  # the only swapped block is always in flight
