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


def test_the_demo_models_are_told_in_megabytes():
    import re
    for model in ("tiny-demo", "tiny-demo-sd2", "tiny-demo-sdxl"):
        text = estimate(TextualInversionConfig(model=model, width=64, height=64)).text()
        assert re.match(r"Estimated peak memory: about \d+(\.\d)? MB \(weights \d+(\.\d)? MB", text), text
        assert "0.0" not in text and "()" not in text and "( " not in text and "GB (" not in text


def test_big_models_are_told_in_gigabytes_with_each_part():
    text = estimate(DreamBoothConfig(model="sd15.safetensors", resolution=512)).text()
    # activations: SD 1.x's measured 1341 MB per 256 px image, x4 at 512 px (fp32); weights:
    # the U-Net and text encoder, the VAE waits off the device (the latents are cached)
    assert text.startswith("Estimated peak memory: about 18.5 GB (weights 3.7 GB, gradients 3.2 GB, "
                           "optimizer 6.4 GB, activations 5.2 GB). Needs a 24 GB card"), text


def test_size_text_switches_unit_at_one_gigabyte():
    from trainers.memory_estimate import MB, size_text
    assert [size_text(v) for v in (0, 0.2 * MB, 3.46 * MB, 420 * MB, 1023.9 * MB, GB, 2.34 * GB)] == \
        ["0.0 MB", "0.2 MB", "3.5 MB", "420 MB", "1024 MB", "1.0 GB", "2.3 GB"]
