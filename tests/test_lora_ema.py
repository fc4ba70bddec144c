"""Post-hoc EMA of a LoRA run (#21 item 4): musubi-tuner's exponential average and EDM2's
power-function average of a run's copies in step order, one LoRA file diffusers loads;
mismatched copies named; nothing replaced."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.config import ConfigError
from tests.conftest import RecordingContext, demo_images_with_lora, kohya_photos
from tests.test_lora_training import lora_config
from trainers.configs import EQUAL_AVERAGE_SIGMA_REL, LoraEmaConfig
from trainers.formats.lora import load_lora, save_lora
from trainers.lora_ema import ema_betas, ema_weights, post_hoc_ema, run, sigma_rel_to_gamma
from trainers.methods.lora import run as train_lora
from trainers.preflight import check_before_queueing


def copies(count: int) -> list[dict]:
    """Copy k: every factor filled with k + 1, alpha 2 (as a run's copies: same keys)."""
    return [{"l.lora_down.weight": torch.full((2, 3), k + 1.0),
             "l.lora_up.weight": torch.full((4, 2), k + 1.0), "l.alpha": torch.tensor(2.0)}
            for k in range(count)]


def value(state) -> float:
    return float(state["l.lora_down.weight"][0, 0])


def test_the_exponential_average_is_musubis_recurrence():
    states = copies(3)
    assert value(post_hoc_ema(states, ema_betas(3, 0.0))) == 3.0  # decay 0: the last copy
    assert value(post_hoc_ema(states, ema_betas(3, 1.0))) == 1.0  # decay 1: the first
    # ((1 * 0.5 + 2 * 0.5) * 0.5 + 3 * 0.5)
    assert value(post_hoc_ema(states, ema_betas(3, 0.5))) == pytest.approx(2.25)
    assert ema_betas(4, 0.9, 0.5) == pytest.approx([0.9, 0.7, 0.5])  # linear from beta to beta2
    assert ema_betas(2, 0.9, 0.5) == pytest.approx([0.9])
    states = copies(4)
    betas = ema_betas(4, 0.9, 0.5)
    weights = ema_weights(betas)
    assert sum(weights) == pytest.approx(1.0)
    assert value(post_hoc_ema(states, betas)) == pytest.approx(
        sum(w * (k + 1) for k, w in enumerate(weights)))
    assert post_hoc_ema(states, betas)["l.alpha"] == 2.0  # alphas are kept


def test_the_power_function_average_follows_edm2():
    for sigma_rel, gamma in ((0.05, 16.97), (0.10, 6.94)):  # the pairs EDM2 quotes
        assert sigma_rel_to_gamma(sigma_rel) == pytest.approx(gamma, abs=0.01)
        g = sigma_rel_to_gamma(sigma_rel)  # its closed form back (EDM2, eq. 3)
        assert ((g + 1) / ((g + 2) ** 2 * (g + 3))) ** 0.5 == pytest.approx(sigma_rel)
    assert sigma_rel_to_gamma(EQUAL_AVERAGE_SIGMA_REL) == pytest.approx(0.0, abs=1e-6)
    assert sigma_rel_to_gamma(0.2887) == 0.0  # just past it: no positive root, the plain average
    states = copies(5)
    plain = post_hoc_ema(states, ema_betas(5, 0.95, sigma_rel=EQUAL_AVERAGE_SIGMA_REL))
    assert value(plain) == pytest.approx(3.0)  # (1 + 2 + 3 + 4 + 5) / 5
    narrow = ema_weights(ema_betas(5, 0.95, sigma_rel=0.05))
    assert sum(narrow) == pytest.approx(1.0) and narrow == sorted(narrow)  # later copies count more
    assert narrow[0] > 0  # every copy counts (musubi-tuner's t = k would give copy 0 nothing)
    g = sigma_rel_to_gamma(0.05)
    assert ema_weights(ema_betas(3, 0.95, sigma_rel=0.05))[-1] == pytest.approx(
        1 - (1 - 1 / 3) ** (g + 1))


def test_mismatched_copies_are_named():
    a, b = copies(2)
    b["l.alpha"] = torch.tensor(4.0)
    with pytest.raises(ValueError, match="run_folder: b.safetensors does not match a.safetensors: "
                       "l.alpha is 4, not 2"):
        post_hoc_ema([a, b], [0.5], ["a.safetensors", "b.safetensors"])
    b = copies(2)[1]
    b["l.lora_up.weight"] = torch.ones(5, 2)
    with pytest.raises(ValueError, match=r"l.lora_up.weight is \[5, 2\], not \[4, 2\]"):
        post_hoc_ema([a, b], [0.5])
    b = copies(2)[1]
    b["m.lora_up.weight"] = torch.ones(5, 2)
    with pytest.raises(ValueError, match="copy 1 does not match copy 0: 0 keys missing"):
        post_hoc_ema([a, b], [0.5])


def test_a_runs_copies_average_into_a_lora_diffusers_loads(data_paths, tmp_path):
    paths = data_paths
    final = train_lora(lora_config(kohya_photos(tmp_path / "train"), max_train_steps=4,
                                   save_every_n_steps=1, learning_rate=2e-2),
                       RecordingContext(paths))
    run_dir = next((paths.outputs / "lora").glob("*/mylora"))
    saved = sorted((run_dir / "checkpoints").glob("*.safetensors"))
    assert [p.name for p in saved] == [f"mylora-{s}.safetensors" for s in (1, 2, 3)]
    before = {p: p.read_bytes() for p in saved + [final]}
    ctx = RecordingContext(paths)
    folder = str(run_dir.relative_to(paths.data_dir))
    path = run(LoraEmaConfig(run_folder=folder, output_name="smooth", decay=0.5,
                             save_precision="fp32").validate(), ctx)
    assert path == paths.lora / "smooth.safetensors"
    states = [load_lora(p)[0] for p in saved + [final]]  # steps 1, 2, 3 and the final 4
    weights = [0.125, 0.125, 0.25, 0.5]
    averaged, meta = load_lora(path)
    for key, tensor in averaged.items():
        if not key.endswith(".alpha"):
            want = sum(w * s[key].float() for w, s in zip(weights, states))
            torch.testing.assert_close(tensor, want, atol=1e-6, rtol=1e-5, msg=key)
    record = json.loads(meta["danlu.post_hoc_ema"])
    assert record["checkpoints"] == ["mylora-1.safetensors", "mylora-2.safetensors",
                                     "mylora-3.safetensors", "mylora.safetensors"]
    assert record["steps"] == [1, 2, 3, 4] and record["weights"] == weights
    assert record["decay"] == 0.5 and meta["ss_output_name"] == "smooth"
    assert "post-hoc EMA decay 0.5 of mylora-1.safetensors" in meta["ss_training_comment"]
    assert "Averaged 4 copies of mylora (steps 1 to 4" in ctx.events[-1].message
    base, with_lora = demo_images_with_lora(paths, path)
    assert not np.allclose(base, with_lora)
    assert all(p.read_bytes() == data for p, data in before.items())

    # the checkpoints folder itself, a power-function average, later copies only
    path = run(LoraEmaConfig(run_folder=folder + "/checkpoints", output_name="late",
                             sigma_rel=0.1, from_step=2, include_final=False,
                             save_precision="fp32"), RecordingContext(paths))
    record = json.loads(load_lora(path)[1]["danlu.post_hoc_ema"])
    assert record["steps"] == [2, 3] and record["sigma_rel"] == 0.1
    with pytest.raises(ValueError, match="run_folder: found 1 LoRA copies of 'mylora'"):
        run(LoraEmaConfig(run_folder=folder, output_name="one", from_step=3,
                          include_final=False), RecordingContext(paths))

    # nothing is replaced
    taken = (paths.lora / "smooth.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="output_name: smooth.safetensors exists .* 'Overwrite'"):
        check_before_queueing(LoraEmaConfig(run_folder=folder, output_name="smooth"), paths)
    with pytest.raises(FileExistsError, match="smooth.safetensors exists"):
        run(LoraEmaConfig(run_folder=folder, output_name="smooth"), RecordingContext(paths))
    assert (paths.lora / "smooth.safetensors").read_bytes() == taken

    # a copy from another network is named
    odd = run_dir / "checkpoints" / "mylora-5.safetensors"
    save_lora(odd, {"lora_unet_x.lora_down.weight": torch.ones(2, 3),
                    "lora_unet_x.lora_up.weight": torch.ones(3, 2)})
    with pytest.raises(ValueError, match="run_folder: mylora-5.safetensors does not match "
                       "mylora-1.safetensors"):
        run(LoraEmaConfig(run_folder=folder, output_name="odd"), RecordingContext(paths))
    assert not (paths.lora / "odd.safetensors").exists()


def test_bad_settings_are_named(data_paths):
    with pytest.raises(ConfigError, match="run_folder: choose the training run's folder"):
        LoraEmaConfig(output_name="x").validate()
    with pytest.raises(ConfigError, match="decay"):
        LoraEmaConfig(run_folder="outputs", output_name="x", decay=1.5).validate()
    with pytest.raises(ConfigError, match="decay_end: -1 .off. or between 0 and 1"):
        LoraEmaConfig(run_folder="outputs", output_name="x", decay_end=-0.5).validate()
    with pytest.raises(ConfigError, match="run_folder: no folder 'outputs/none'"):
        check_before_queueing(LoraEmaConfig(run_folder="outputs/none", output_name="x"),
                              data_paths)


def test_post_hoc_ema_runs_from_a_toml_file(data_paths, tmp_path, capsys):
    from trainers.__main__ import main
    folder = data_paths.outputs / "lora" / "2026-01-01" / "toy" / "checkpoints"
    folder.mkdir(parents=True)
    for k, state in enumerate(copies(3), start=1):
        save_lora(folder / f"toy-{k * 10}.safetensors", state)
    config = tmp_path / "ema.toml"
    config.write_text('run_folder = "outputs/lora/2026-01-01/toy"\noutput_name = "toy-ema"\n'
                      'decay = 0.5\nsave_precision = "fp32"\n')
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert "lora_ema" in listed and "merge_into_checkpoint" in listed
    assert main(["lora_ema", "--config", str(config), "--data-dir", str(data_paths.data_dir)]) == 0
    state, meta = load_lora(data_paths.lora / "toy-ema.safetensors")
    assert value(state) == pytest.approx(2.25)
    assert json.loads(meta["danlu.post_hoc_ema"])["steps"] == [10, 20, 30]
