"""Flux.1-dev at its published shape, built on the meta device (no weights): the parameter count
the family record gives the estimates, and the LoRA a run would train — kohya's 304 Flux module
names (19 double blocks x 10, 38 single blocks x 3) from diffusers' 494 Linears."""
from __future__ import annotations

from trainers import families
from trainers.flux_lora import FLUX_LAYOUT, slot_sizes
from trainers.published_shapes import shape


def test_flux_1_dev_shape_gives_the_family_params_and_kohyas_lora_names():
    transformer = shape("flux1").build()
    count = sum(p.numel() for p in transformer.parameters())
    assert abs(count - families.get("flux1").params[0]) / count < 0.01  # 11.9 B
    targets = FLUX_LAYOUT.denoiser_targets(transformer, conv=False)
    assert len(targets) == 19 * 14 + 38 * 6
    files = {t.name.split("@")[0] for t in targets}
    double = ("img_attn_proj", "img_attn_qkv", "img_mlp_0", "img_mlp_2", "img_mod_lin",
              "txt_attn_proj", "txt_attn_qkv", "txt_mlp_0", "txt_mlp_2", "txt_mod_lin")
    assert files == {f"lora_unet_double_blocks_{i}_{n}" for i in range(19) for n in double} | {
        f"lora_unet_single_blocks_{i}_{n}" for i in range(38)
        for n in ("linear1", "linear2", "modulation_lin")}
    assert len(files) == 304
    sizes = {t.name: transformer.get_submodule(t.path).out_features for t in targets}
    fused = slot_sizes(sizes)
    assert fused["lora_unet_double_blocks_0_img_attn_qkv"] == (3072, 3072, 3072)
    assert fused["lora_unet_single_blocks_37_linear1"] == (3072, 3072, 3072, 12288)
    # a rank-16 LoRA on all of them (in + out features x rank each): the ~172 MB bf16 file a
    # rank-16 kohya Flux LoRA is
    trainable = sum(16 * (m.in_features + m.out_features)
                    for m in (transformer.get_submodule(t.path) for t in targets))
    assert 80e6 < trainable < 90e6
