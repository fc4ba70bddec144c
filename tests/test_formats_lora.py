"""kohya LoRA .safetensors writer/reader: metadata, hashes, precision, clear errors."""
from __future__ import annotations

import datetime
import hashlib
import json

import pytest
import safetensors.torch
import torch

from trainers.formats.lora import (LoraFormatError, LoraTrainingInfo, load_lora, lora_hashes, lora_metadata,
                                   precision_dtype, read_lora_metadata, save_lora,
                                   update_progress)

NAME = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"


def small_state(rank=4, alpha=1.0, big=False):
    generator = torch.Generator().manual_seed(0)
    width = 320 if big else 32  # big: > 1 MiB, so the legacy hash reads real bytes
    return {
        f"{NAME}.lora_down.weight": torch.randn(rank, width, generator=generator),
        f"{NAME}.lora_up.weight": torch.randn(width, rank, generator=generator),
        f"{NAME}.alpha": torch.tensor(alpha),
        f"{CONV}.lora_down.weight": torch.randn(rank, width, 3, 3, generator=generator),
        f"{CONV}.lora_up.weight": torch.randn(width, rank, 1, 1, generator=generator),
        f"{CONV}.alpha": torch.tensor(alpha),
        **({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
            torch.randn(rank, 768 * 4 * 30, generator=generator),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight":
            torch.randn(8, rank, generator=generator)} if big else {}),
    }


def metadata(**overrides):
    values = dict(
        network_dim=4, network_alpha=1.0, conv_dim=2, conv_alpha=1.0, output_name="sks-dog",
        steps=120, epoch=3, resolution=(512, 512), learning_rate=1e-4, unet_lr=1e-4,
        text_encoder_lr=5e-5, optimizer="AdamW8bit", lr_scheduler="cosine", seed=1234,
        tag_frequency={"20_sks dog": {"sks dog": 12, "grass": 3}},
        dataset_dirs={"20_sks dog": {"n_repeats": 20, "img_count": 12}},
        training_started_at=1_700_000_000.5, training_finished_at=1_700_000_600.25,
        num_train_images=240, batch_size=2, max_train_steps=120, mixed_precision="bf16",
        clip_skip=2, min_snr_gamma=5.0, noise_offset=0.05, sd_model_name="v1-5.safetensors")
    values.update(overrides)
    return lora_metadata(LoraTrainingInfo(**values))


def data_section(path):
    raw = path.read_bytes()
    return raw[8 + int.from_bytes(raw[:8], "little"):]


def test_metadata_keys_and_json(tmp_path):
    meta = metadata()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "1.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_resolution"] == "(512, 512)"
    assert meta["ss_output_name"] == "sks-dog"
    assert (meta["ss_steps"], meta["ss_epoch"]) == ("120", "3")
    assert meta["ss_clip_skip"] == "2" and meta["ss_seed"] == "1234"
    assert meta["ss_mixed_precision"] == "bf16" and meta["ss_optimizer"] == "AdamW8bit"
    assert float(meta["ss_learning_rate"]) == 1e-4 and float(meta["ss_text_encoder_lr"]) == 5e-5
    assert float(meta["ss_training_started_at"]) == 1_700_000_000.5
    assert float(meta["ss_training_finished_at"]) == 1_700_000_600.25
    assert json.loads(meta["ss_tag_frequency"]) == {"20_sks dog": {"sks dog": 12, "grass": 3}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"20_sks dog": {"n_repeats": 20, "img_count": 12}}
    assert meta["ss_sd_model_name"] == "v1-5.safetensors"
    assert meta["ss_batch_size_per_device"] == "2" and meta["ss_max_train_steps"] == "120"
    assert meta["ss_min_snr_gamma"] == "5.0" and meta["ss_noise_offset"] == "0.05"
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.title"] == "sks-dog"
    assert meta["modelspec.resolution"] == "512x512"
    assert meta["modelspec.encoder_layer"] == "2"
    assert datetime.datetime.fromisoformat(meta["modelspec.date"]) == \
        datetime.datetime.fromtimestamp(1_700_000_600)
    assert "ss_network_args" not in metadata(conv_dim=0)  # kohya omits it without network args
    v2 = metadata(v2=True, v_parameterization=True)
    assert v2["ss_base_model_version"] == "sd_v2_v"
    assert v2["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert update_progress(meta, steps=200, epoch=4)["ss_steps"] == "200"


def test_base_model_file_hashes(tmp_path):
    model = tmp_path / "base.safetensors"
    model.write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    meta = metadata(sd_model_name=None, sd_model_path=model)
    raw = model.read_bytes()
    assert meta["ss_sd_model_name"] == "base.safetensors"
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(raw).hexdigest()
    assert meta["ss_sd_model_hash"] == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]


def test_round_trip_with_hashes(tmp_path):
    path = tmp_path / "sks.safetensors"
    state = small_state(big=True)
    written = save_lora(path, state, metadata())
    loaded, meta = load_lora(path)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert meta == written == read_lora_metadata(path)
    assert json.loads(meta["ss_tag_frequency"])["20_sks dog"]["sks dog"] == 12
    # sshs_model_hash: sha256 of the file's data section (what A1111 computes from the file)
    assert meta["sshs_model_hash"] == hashlib.sha256(data_section(path)).hexdigest()
    # sshs_legacy_hash: 64 KiB at 1 MiB of the file serialised with only the ss_* metadata
    only_ss = {k: v for k, v in meta.items() if k.startswith("ss_")}
    raw = safetensors.torch.save(state, metadata=only_ss)
    assert len(raw) > 0x110000
    assert meta["sshs_legacy_hash"] == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    assert meta["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]
    # user metadata outside ss_* does not change the hashes; the weights do
    assert lora_hashes(state, {**only_ss, "modelspec.title": "renamed"}) == \
        (meta["sshs_model_hash"], meta["sshs_legacy_hash"])
    changed = dict(state)
    changed[f"{NAME}.alpha"] = torch.tensor(2.0)
    assert lora_hashes(changed, only_ss)[0] != meta["sshs_model_hash"]


@pytest.mark.parametrize("precision,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                             ("fp32", torch.float32)])
def test_save_precision(tmp_path, precision, dtype):
    path = tmp_path / f"{precision}.safetensors"
    state = small_state()
    save_lora(path, state, metadata(), precision=precision)
    loaded, _ = load_lora(path)
    assert {v.dtype for v in loaded.values()} == {dtype}  # alphas too, as kohya
    assert loaded[f"{NAME}.alpha"].shape == ()
    torch.testing.assert_close(loaded[f"{NAME}.lora_down.weight"].float(),
                               state[f"{NAME}.lora_down.weight"], atol=1e-2, rtol=1e-2)
    assert precision_dtype("FP16") == torch.float16
    with pytest.raises(ValueError, match="save precision"):
        precision_dtype("fp8")


def test_errors_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(LoraFormatError, match="corrupt.safetensors"):
        load_lora(corrupt)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 100)
    with pytest.raises(LoraFormatError, match="garbage.safetensors.*not a readable"):
        load_lora(garbage)
    embedding = tmp_path / "embedding.safetensors"
    safetensors.torch.save_file({"emb_params": torch.zeros(2, 768)}, str(embedding))
    with pytest.raises(LoraFormatError, match="embedding.safetensors.*not a kohya LoRA"):
        load_lora(embedding)
    peft_file = tmp_path / "peft.safetensors"
    safetensors.torch.save_file({"unet.x.lora_A.weight": torch.zeros(2, 2)}, str(peft_file))
    with pytest.raises(LoraFormatError, match="diffusers/peft"):
        load_lora(peft_file)
    with pytest.raises(LoraFormatError, match="missing.safetensors.*no such file"):
        load_lora(tmp_path / "missing.safetensors")
    half = tmp_path / "half.safetensors"
    safetensors.torch.save_file({f"{NAME}.lora_down.weight": torch.zeros(2, 2)}, str(half))
    with pytest.raises(LoraFormatError, match="no lora_up"):
        load_lora(half)


def test_save_refuses_bad_input_and_keeps_old_file(tmp_path):
    path = tmp_path / "keep.safetensors"
    save_lora(path, small_state(), {"ss_output_name": "first"})
    before = path.read_bytes()
    with pytest.raises(TypeError, match="ss_steps"):
        save_lora(path, small_state(), {"ss_steps": 12})
    with pytest.raises(ValueError, match="has no lora_up"):
        save_lora(path, {f"{NAME}.lora_down.weight": torch.zeros(2, 2)}, {})
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_lora(tmp_path / "x.pt", small_state(), {})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]
