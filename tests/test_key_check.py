"""The LoRA Check (trainers/formats/key_check.py): every file Danlu writes for each family's
full-size model loads by A1111's, ComfyUI's and diffusers' key maps (what does not is named);
broken files are reported naming the key; the save messages and the CLI verb carry it."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from core.events import Finished
from tests.conftest import ROOT, RecordingContext, kohya_photos
from tests.lora_check_files import lora_state, write
from trainers.formats.key_check import (KeyCheckError, a1111_compvis_name, check_file,
                                        saved_file_note)

ALL = ("A1111", "ComfyUI", "diffusers")


def loaders(report) -> dict:
    return {r.loader: r for r in report.results}


@pytest.mark.parametrize("family,conv", [("sd1", True), ("sd2", False), ("sdxl", True),
                                         ("flux1", False), ("chroma", False),
                                         ("flux2_klein", False), ("qwen_image", False)])
def test_every_lora_danlu_writes_loads_in_every_loader_of_its_family(tmp_path, family, conv):
    report = check_file(write(tmp_path / f"{family}.safetensors", family, conv))
    assert report.family == family and report.clean, report.text()
    if family in ("sd1", "sd2", "sdxl"):
        assert report.summary().endswith("loads in A1111 / ComfyUI / diffusers")
    else:  # A1111's Lora extension has no flow-matching families
        assert "loads in ComfyUI / diffusers" in report.summary()
        assert not loaders(report)["A1111"].applies


@pytest.mark.parametrize("family,algo", [("sd1", "loha"), ("sdxl", "lokr")])
def test_lycoris_files_load_in_a1111_and_comfyui_and_diffusers_says_it_does_not(
        tmp_path, family, algo):
    report = check_file(write(tmp_path / f"{algo}.safetensors", family, True, algo))
    found = loaders(report)
    assert found["A1111"].loads and found["ComfyUI"].loads and not report.problems
    assert "not been correctly renamed" in found["diffusers"].fatal  # diffusers' own converter


def test_zimage_loads_in_diffusers_and_comfyui_takes_only_the_feed_forward(tmp_path):
    """Danlu's Z-Image names are musubi-tuner's (diffusers paths); ComfyUI maps kohya names
    after Z-Image's original fused attention (trainers/zimage_lora.py says so)."""
    report = check_file(write(tmp_path / "z.safetensors", "zimage"))
    found = loaders(report)
    assert found["diffusers"].loads and not report.problems
    missing = found["ComfyUI"].not_loaded
    assert missing and all("_attention_to_" in key for key in missing)
    assert "lora_unet_layers_0_attention_to_q.lora_down.weight" in missing
    assert not report.broken  # a partial load is reported; the CLI still exits 0


def test_an_unknown_key_a_misnamed_layer_and_a_missing_alpha_are_named(tmp_path):
    state = lora_state("sd1")
    layer = "lora_unet_down_blocks_0_attentions_0_proj_in"
    state[f"{layer}.lora_weird.weight"] = torch.zeros(1)
    state.pop("lora_te_text_model_encoder_layers_0_mlp_fc1.alpha")
    bad = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn9_to_q"
    state[f"{bad}.lora_down.weight"] = torch.zeros(1, 320)
    state[f"{bad}.lora_up.weight"] = torch.zeros(320, 1)
    state[f"{bad}.alpha"] = torch.tensor(1.0)
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(state, str(path), {"ss_base_model_version": "sd_v1"})
    report = check_file(path)
    text = report.text()
    assert not report.clean and report.broken
    assert f"{layer}.lora_weird.weight: unknown key" in text
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha: missing" in text
    assert report.unmapped == [bad]
    found = loaders(report)
    assert f"{bad}.lora_down.weight" in found["A1111"].not_loaded
    assert f"{bad}.lora_down.weight" in found["ComfyUI"].not_loaded
    assert f"{layer}.lora_weird.weight" in found["ComfyUI"].not_loaded
    assert "lora_weird" in found["diffusers"].fatal  # diffusers' converter refuses the file
    assert "A1111 would not load" in report.summary()
    state.pop(f"{layer}.lora_weird.weight")  # without it, diffusers converts and skips attn9
    safetensors.torch.save_file(state, str(path), {"ss_base_model_version": "sd_v1"})
    assert any("attn9" in key for key in loaders(check_file(path))["diffusers"].not_loaded)


def test_an_sdxl_file_checked_as_sd1_and_a_file_claiming_another_family(tmp_path):
    sdxl = write(tmp_path / "xl.safetensors", "sdxl")
    report = check_file(sdxl, "sd1")
    assert "the file says SDXL" in report.family_note
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in \
        loaders(report)["A1111"].not_loaded
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q" in report.unmapped
    liar = write(tmp_path / "liar.safetensors", "sdxl", metadata={"ss_base_model_version": "sd_v1"})
    report = check_file(liar)
    assert report.family == "sd1" and "are SDXL's" in report.family_note and not report.clean


def test_a_corrupt_or_foreign_file_gives_a_clear_error(tmp_path):
    for name, data in [("short.safetensors", b"abc"), ("text.safetensors", b"not a model" * 20),
                       ("huge.safetensors", (10 ** 12).to_bytes(8, "little") + b"{}")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(KeyCheckError, match=f"{name}: not a readable safetensors file"):
            check_file(tmp_path / name)
    with pytest.raises(KeyCheckError, match="no such file"):
        check_file(tmp_path / "missing.safetensors")
    safetensors.torch.save_file({"weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyCheckError, match="no LoRA keys"):
        check_file(tmp_path / "model.safetensors")
    assert saved_file_note(tmp_path / "short.safetensors").startswith("Check could not run:")


def test_a1111_names_diffusers_unet_layers_as_its_ldm_modules():
    assert a1111_compvis_name("lora_unet_up_blocks_1_resnets_2_conv_shortcut", False) == \
        "diffusion_model_output_blocks_5_0_skip_connection"
    assert a1111_compvis_name("lora_unet_up_blocks_0_upsamplers_0_conv", False) == \
        "diffusion_model_output_blocks_2_1_conv"
    assert a1111_compvis_name("lora_te_text_model_encoder_layers_3_mlp_fc1", True) == \
        "model_transformer_resblocks_3_mlp_c_fc"


def test_the_cli_verb_prints_the_report_and_refuses_a_missing_file(tmp_path):
    data = tmp_path / "data"
    (data / "models" / "Lora").mkdir(parents=True)
    write(data / "models" / "Lora" / "a.safetensors", "sd2")
    done = subprocess.run([sys.executable, "-m", "trainers", "check_lora", "--data-dir",
                           str(data), "--json-events", "--set", "lora=a.safetensors"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert "loads in A1111 / ComfyUI / diffusers" in last["message"]
    done = subprocess.run([sys.executable, "-m", "trainers", "check_lora", "--data-dir",
                           str(data), "--set", "lora=nothere.safetensors"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "lora: no file 'nothere.safetensors'" in done.stderr
    state = lora_state("sd2")
    state.pop("lora_te_text_model_encoder_layers_0_mlp_fc1.alpha")
    safetensors.torch.save_file(state, str(data / "models" / "Lora" / "b.safetensors"),
                                {"ss_base_model_version": "sd_v2"})
    done = subprocess.run([sys.executable, "-m", "trainers", "check_lora", "--data-dir",
                           str(data), "--set", "lora=b.safetensors"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr  # a broken file fails the command
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha: missing" in done.stderr


def test_a_lora_run_and_the_tools_end_with_the_check(data_paths, tmp_path):
    """The tiny SD1 demo's names are a subset of SD 1.x's, so its file checks clean."""
    from trainers.configs import LoraConfig, MergeLoraConfig
    from trainers.merge_lora import run as merge
    from trainers.methods.lora import run
    folder = kohya_photos(tmp_path / "train")
    cfg = LoraConfig(model="tiny-demo", output_name="checked", train_data_dir=str(folder),
                     resolution=64, min_bucket_reso=32, max_bucket_reso=128,
                     bucket_reso_steps=16, network_dim=2, network_alpha=1.0, max_train_steps=1,
                     save_every_n_epochs=0, sample_at_first=False, seed=3).validate()
    ctx = RecordingContext(data_paths)
    path = run(cfg, ctx)
    assert ctx.of(Finished)[-1].message.endswith(
        "Check (SD 1.x): loads in A1111 / ComfyUI / diffusers")
    (data_paths.lora / "copy.safetensors").write_bytes(path.read_bytes())
    ctx = RecordingContext(data_paths)
    merge(MergeLoraConfig(loras="checked.safetensors: 0.5, copy.safetensors: 0.5",
                          output_name="both").validate(), ctx)
    assert "Check (SD 1.x): loads in A1111 / ComfyUI / diffusers" in ctx.of(Finished)[-1].message


def test_dora_scale_and_bundled_embeddings_are_judged_as_each_loader_reads_them(tmp_path):
    state = lora_state("sd1")
    layer = "lora_unet_down_blocks_0_attentions_0_proj_in"
    state[f"{layer}.dora_scale"] = torch.ones(320, 1)
    dora = write(tmp_path / "dora.safetensors", "sd1", state=state)
    found = loaders(check_file(dora))
    assert found["A1111"].loads and found["ComfyUI"].loads  # both read dora_scale
    assert list(found["diffusers"].not_loaded) == [f"{layer}.dora_scale"]
    state.pop(f"{layer}.dora_scale")
    state["bundle_emb.zxq.string_to_param.*"] = torch.zeros(2, 768)
    bundled = tmp_path / "bundled.safetensors"
    safetensors.torch.save_file(state, str(bundled), {"ss_base_model_version": "sd_v1"})
    report = check_file(bundled)
    found = loaders(report)
    assert report.embeddings == ["zxq"] and found["A1111"].loads
    assert list(found["ComfyUI"].not_loaded) == ["bundle_emb.zxq.string_to_param.*"]
    assert "keys without 'lora'" in found["diffusers"].fatal
