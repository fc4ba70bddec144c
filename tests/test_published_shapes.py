"""The flow families' published transformer shapes (trainers/published_shapes.py) against their
family records, and the per-block memory measurement behind their `Memory` (bench/flow_memory.py):
its sum to a depth matches a model of that depth measured whole."""
from __future__ import annotations

import pytest

from bench.flow_memory import activations, lora_parameters_per_rank, measure_family
from trainers import families
from trainers.memory_estimate import estimate
from trainers.published_shapes import SHAPES, shape


@pytest.mark.parametrize("family", sorted(SHAPES))
def test_each_published_shape_gives_its_family_record(family):
    record = families.get(family)
    count = sum(p.numel() for p in shape(family).build().parameters())
    assert abs(count - record.params[0]) / count < 0.01
    assert record.memory is not None, f"{family}: its Memory is measured (bench/flow_memory.py)"
    per_rank = lora_parameters_per_rank(family)
    assert abs(record.memory.lora_per_rank[0] - per_rank) / per_rank < 0.001
    assert record.memory.checkpointed_256 < record.memory.activations_256[0] / 4


def test_an_unknown_family_is_named():
    with pytest.raises(KeyError, match="no published transformer shape for 'sd1'"):
        shape("sd1")


def test_blocks_measured_one_at_a_time_sum_to_a_deeper_model(tmp_path):
    """Flux.1's shape at the demo's width: one and two blocks of each kind predict a model with
    three double and two single blocks, which is then measured whole."""
    narrow = shape("flux1").with_changes(attention_head_dim=16, num_attention_heads=2,
                                         axes_dims_rope=(4, 6, 6), num_layers=3,
                                         num_single_layers=2)
    found = measure_family("flux1", tmp_path, published=narrow, report=lambda text: None)
    assert all(cost > 0 for cost in found["per_block"].values())
    root = tmp_path
    from core.paths import Paths
    plain, checkpointed = activations(Paths(root / "data", confine=False), root / "demo",
                                      root / "images", narrow,
                                      {"num_layers": 3, "num_single_layers": 2})
    assert abs(found["activations_256"] - plain) / plain < 0.03
    assert abs(found["checkpointed"]["held"] - checkpointed) / checkpointed < 0.03
    assert checkpointed < plain / 2


def test_the_estimate_uses_the_measured_checkpointed_activations():
    from trainers.configs import LoraConfig
    base = dict(model="x", output_name="x", train_data_dir="x", resolution=1024,
                mixed_precision="bf16", network_dim=16, network_train_unet_only=True)
    memory = families.get("flux1").memory
    plain = estimate(LoraConfig(**base), "flux1").parts["activations"]
    held = estimate(LoraConfig(**base, gradient_checkpointing=True), "flux1").parts["activations"]
    # 1024 px: 4096 image tokens beside the 512 T5 tokens, against 256 + 512 at 256 px
    assert memory.context_tokens == 512
    grows = (4096 + 512) / (256 + 512)
    assert plain == pytest.approx(memory.activations_256[0] * grows * 0.54, rel=0.001)
    assert held == pytest.approx(memory.checkpointed_256 * grows * 0.54, rel=0.001)
