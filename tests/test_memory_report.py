"""The measured memory of one step (#19 item 5): exact parts on the tiny demo, activations that
grow with the image, nothing written to the user's folders, the CLI's JSON, refusals."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, kohya_photos
from tests.test_lora_training import lora_config
from trainers.memory_report import measure


def test_one_lora_step_is_measured_part_by_part(data_paths, tmp_path):
    from trainers.models import load_model
    folder = kohya_photos(tmp_path / "train")
    before = sorted(p.relative_to(data_paths.data_dir) for p in data_paths.data_dir.rglob("*")
                    if ".cache" not in p.parts)
    small = measure("lora", lora_config(folder, resolution=64, network_dim=4), data_paths)
    model = load_model(data_paths, "tiny-demo")
    assert small["weights"]["unet"]["float32"] == sum(
        p.numel() * 4 for p in model.unet.parameters()) + sum(
        b.numel() * b.element_size() for b in model.unet.buffers())
    trainable = small["trainable_parameters"]
    assert trainable > 0
    measured = small["measured"]
    assert measured["gradients"] == trainable * 4  # fp32 LoRA factors
    # AdamW: two fp32 moments per parameter, plus a step counter per tensor
    assert 8 * trainable <= measured["optimizer"] < 8 * trainable + 4096
    assert measured["activations"] > 0 and small["estimate"]["total"] > 0
    assert measured["total"] == sum(v for k, v in measured.items() if k != "total")
    # the VAE waits off the device during the steps (latents are cached) and its return between
    # steps fits in what the step's gradients and activations free
    everything = sum(sum(parts.values()) for parts in small["weights"].values())
    assert measured["weights"] == everything - sum(small["weights"]["vae"].values())
    assert measured["text encoders / VAE between steps"] == max(
        0, sum(small["weights"]["vae"].values()) - measured["gradients"] - measured["activations"])
    unet_only = dict(network_dim=4, network_train_unet_only=True)
    small_unet, big = (measure("lora", lora_config(folder, resolution=size, **unet_only),
                               data_paths)["measured"]["activations"] for size in (64, 128))
    # the first batch's bucket holds 2.7x the latent pixels at 128 px (16x10 against 10x6)
    assert big > 1.6 * small_unet
    bf16 = measure("lora", lora_config(folder, resolution=64, network_dim=4,
                                       mixed_precision="bf16"), data_paths)
    assert set(bf16["weights"]["unet"]) == {"bfloat16"}
    assert bf16["measured"]["weights"] < 0.6 * measured["weights"]
    after = sorted(p.relative_to(data_paths.data_dir) for p in data_paths.data_dir.rglob("*")
                   if ".cache" not in p.parts)
    assert after == before  # the scratch folder took the run's files


def test_the_cli_prints_the_report_and_other_methods_are_refused(data_paths, tmp_path):
    folder = kohya_photos(tmp_path / "train")
    config = tmp_path / "run.toml"
    config.write_text(f'model = "tiny-demo"\noutput_name = "x"\ntrain_data_dir = "{folder}"\n'
                      'resolution = 64\nmin_bucket_reso = 32\nbucket_reso_steps = 16\n')
    done = subprocess.run([sys.executable, "-m", "trainers", "lora", "--config", str(config),
                           "--data-dir", str(data_paths.data_dir), "--memory-report"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["method"] == "lora" and report["measured"]["activations"] > 0
    assert set(report["estimate"]) >= {"weights", "activations", "total"}
    assert not (data_paths.lora / "x.safetensors").exists()
    with pytest.raises(ValueError, match="memory report: measured for lora, dreambooth"):
        measure("textual_inversion", None, data_paths)


SETTINGS = [dict(), dict(mixed_precision="bf16"),
            dict(mixed_precision="bf16", gradient_checkpointing=True),
            dict(mixed_precision="bf16", network_train_unet_only=True,
                 cache_text_encoder_outputs=True)]


def _within(report) -> float:
    return abs(report["estimate"]["total"] - report["measured"]["total"]) / \
        report["measured"]["total"]


@pytest.mark.parametrize("resolution", [64, 256])
def test_the_estimate_is_within_15_percent_of_the_measurement_on_the_demo(data_paths, tmp_path,
                                                                          resolution):
    from bench.fixtures import make_dataset
    folder = make_dataset(tmp_path / "photos", resolution)["kohya"]
    for settings in SETTINGS:
        report = measure("lora", lora_config(folder, resolution=resolution,
                                             min_bucket_reso=resolution,
                                             max_bucket_reso=2 * resolution, network_dim=16,
                                             network_alpha=8.0, **settings), data_paths)
        assert _within(report) < 0.15, (settings, report["measured"], report["estimate"])


def test_the_estimate_is_within_15_percent_of_the_measurement_on_sd15(data_paths, tmp_path):
    """The SD1.5-shaped random model (bench.fixtures, ~4 GB, built once and cached outside
    the repo), one LoRA r16 step at 256 px per setting."""
    from bench.fixtures import build_model, make_dataset
    model = str(build_model("sd15"))
    folder = make_dataset(tmp_path / "photos", 256)["kohya"]
    for settings in SETTINGS:
        report = measure("lora", lora_config(folder, model=model, resolution=256,
                                             min_bucket_reso=256, max_bucket_reso=512,
                                             bucket_reso_steps=64,
                                             network_dim=16, network_alpha=8.0, **settings),
                         data_paths)
        assert _within(report) < 0.15, (settings, report["measured"], report["estimate"])


def test_block_swap_is_reported_as_the_weights_the_device_keeps(data_paths, tmp_path):
    """On the CPU the device is the CPU: the report says what a GPU would hold (the blocks not
    swapped, and the one in flight), and that is what the estimate is compared with."""
    from bench.fixtures import make_dataset
    from trainers.block_swap import swappable_blocks
    from trainers.models import load_model
    folder = make_dataset(tmp_path / "photos", 64)["kohya"]
    settings = dict(resolution=64, min_bucket_reso=64, max_bucket_reso=128, network_dim=16,
                    network_alpha=8.0, mixed_precision="bf16")
    plain = measure("lora", lora_config(folder, **settings), data_paths)
    swapped = measure("lora", lora_config(folder, blocks_to_swap=3, **settings), data_paths)
    assert plain["block_swap"] is None
    blocks = swappable_blocks(load_model(data_paths, "tiny-demo", frozen_dtype="bf16").unet)
    sizes = [sum(t.numel() * t.element_size() for t in [*b.parameters(), *b.buffers()])
             for b in blocks[1:]]  # the demo's 4 blocks: the last 3 swapped
    swap = swapped["block_swap"]
    assert (swap["blocks"], swap["of"]) == (3, 4)
    assert swap["parked"] == sum(sizes) and swap["in_flight"] == max(sizes)
    assert swap["resident"] == swap["denoiser"] - sum(sizes) + max(sizes)
    # fewer resident bytes by the swapped blocks' size (less the block that runs)
    assert plain["measured"]["weights"] - swapped["measured"]["weights"] == \
        sum(sizes) - max(sizes)
    assert swapped["weights"] == plain["weights"]  # nothing else changed
    assert swapped["estimate"]["weights"] < plain["estimate"]["weights"]
    assert _within(swapped) < 0.15, (swapped["measured"], swapped["estimate"])


def test_a_full_bf16_dreambooth_step_reports_the_bf16_weights_it_held(data_paths, tmp_path):
    from tests.test_dreambooth import db_config
    from tests.test_full_bf16 import _instance
    report = measure("dreambooth", db_config(_instance(tmp_path), mixed_precision="bf16",
                                             full_bf16=True), data_paths)
    assert set(report["weights"]["unet"]) == {"bfloat16"}
    assert set(report["weights"]["text_encoder"]) <= {"bfloat16", "int64"}
    (tmp_path / "b").mkdir()
    plain = measure("dreambooth", db_config(_instance(tmp_path / "b")), data_paths)
    assert set(plain["weights"]["unet"]) == {"float32"}
    assert report["measured"]["weights"] < 0.6 * plain["measured"]["weights"]
