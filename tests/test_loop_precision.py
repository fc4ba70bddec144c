"""Mixed-precision paths of the shared loop (fp16 uses loss scaling; bf16 runs on the CPU)."""
import pytest
import torch

from tests.conftest import RecordingContext
from tests.test_textual_inversion import make_embedding, ti_config
from trainers import template_training
from trainers.formats.embedding import load_embedding
from trainers.methods.textual_inversion import run


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_runs_train_and_save(data_paths, photo_dataset, monkeypatch, dtype):
    original = template_training.loop_options
    scalers = []

    def with_autocast(*args, **kwargs):
        opts = original(*args, **kwargs)
        opts.autocast = dtype
        return opts
    monkeypatch.setattr(template_training, "loop_options", with_autocast)
    from trainers import loop
    real = loop.LossScaler  # torch's GradScaler, also unscaling fp16 gradients

    class Recording(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            scalers.append(self)
    monkeypatch.setattr(loop, "LossScaler", Recording)
    path = make_embedding(data_paths)
    before = load_embedding(path).vectors.clone()
    ctx = RecordingContext(data_paths)
    run(ti_config(photo_dataset, steps=3, learn_rate="0.05"), ctx)
    after = load_embedding(path)
    assert after.step == 3
    assert len(scalers) == (1 if dtype == torch.float16 else 0)
    assert not torch.equal(after.vectors, before) or dtype == torch.float16  # fp16 may skip steps
