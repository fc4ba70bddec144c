from trainers.configs import DreamBoothConfig, LoraConfig, TextualInversionConfig
from trainers.memory_estimate import GB, estimate


def test_options_that_save_memory_lower_the_estimate():
    base = DreamBoothConfig(model="sd15.safetensors", resolution=512)
    full = estimate(base).total
    assert estimate(DreamBoothConfig(model="x", resolution=512, gradient_checkpointing=True)).total < full
    assert estimate(DreamBoothConfig(model="x", resolution=512, optimizer_type="AdamW8bit")).total < full
    assert estimate(DreamBoothConfig(model="x", resolution=512, use_ema=True)).total > full
    assert estimate(LoraConfig(model="x", resolution=512)).total < full
    assert 8 * GB < full < 40 * GB
    assert "GB" in estimate(base).text()


def test_tiny_demo_is_tiny():
    assert estimate(TextualInversionConfig(model="tiny-demo", width=64, height=64)).total < 0.1 * GB
