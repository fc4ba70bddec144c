"""TensorBoard logging (kohya's log_with = "tensorboard"): the run's loss, learning rates,
validation loss, previews and settings read back from the event file with TensorBoard's own
EventAccumulator; without the package the option is refused by name."""
from __future__ import annotations

import importlib.util

import pytest

from core.config import ConfigError
from tests.conftest import RecordingContext, kohya_photos
from trainers.configs import LoraConfig
from trainers.methods.lora import run

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def lora_config(folder, **changes):
    base = dict(model="tiny-demo", output_name="tblora", train_data_dir=str(folder),
                resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16,
                network_dim=4, network_alpha=2.0, max_train_steps=4, save_every_n_epochs=0,
                sample_at_first=False, learning_rate=1e-3, seed=7, save_precision="fp32",
                validation_split=0.34, validate_every_n_steps=2, log_with="tensorboard",
                sample_every_n_steps=4, sample_prompts="zxq cat --w 64 --h 64 --s 2 --d 3")
    base.update(changes)
    return LoraConfig(**base).validate()


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")
def test_event_file_holds_loss_rates_validation_previews_and_settings(data_paths, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    folder = kohya_photos(tmp_path / "train")
    ctx = RecordingContext(data_paths)
    run(lora_config(folder), ctx)
    run_dir = next((data_paths.outputs / "lora").glob("*/tblora"))
    events = EventAccumulator(str(run_dir / "tensorboard"),
                              size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss/current", "loss/average", "lr/group0", "loss/validation"} <= set(tags["scalars"])
    losses = [(e.step, e.value) for e in events.Scalars("loss/current")]
    csv_rows = (run_dir / "loss.csv").read_text().splitlines()[1:]
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    assert [v for _, v in losses] == pytest.approx([float(r.split(",")[3]) for r in csv_rows],
                                                   rel=1e-5)
    assert [e.step for e in events.Scalars("loss/validation")] == [2, 4]
    assert events.Scalars("lr/group0")[0].value == pytest.approx(1e-3)
    assert "preview/0" in tags["images"]
    image = events.Images("preview/0")[0]
    assert image.step == 4 and (image.width, image.height) == (64, 64)
    text = events.Tensors("settings/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"output_name": "tblora"' in text


def test_missing_tensorboard_is_refused_with_how_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match="log_with: TensorBoard is not installed; pip install "
                                          "tensorboard"):
        lora_config(tmp_path)
