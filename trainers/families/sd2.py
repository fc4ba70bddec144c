"""Stable Diffusion 2.x: a U-Net on OpenCLIP ViT-H (1024-wide context); 768-v models predict v,
base 512 models the noise (the scheduler config says which)."""
from pathlib import Path

from trainers.families import Family, register

FAMILY = register(Family(
    name="sd2", label="SD 2.x", context_width=1024, pipeline="StableDiffusionPipeline",
    text_activation="gelu", text_key_prefix="cond_stage_model.model."))


def sd2_prediction_type(path: str | Path) -> str | None:
    """SD 2.x 768-v files predict v, SD 2.x base (512) files noise; the keys cannot tell. A1111
    reads a `<name>.yaml` beside the file: `parameterization: "v"` means v, any other yaml
    epsilon. Without a yaml None: the config's own (the shipped SD2 skeleton says v, what SD
    2.0/2.1-768 and diffusers assume)."""
    yaml = Path(path).with_suffix(".yaml")
    if not yaml.is_file():
        return None
    text = yaml.read_text(errors="replace")
    compact = text.replace(" ", "").replace("'", '"')
    return "v_prediction" if 'parameterization:"v"' in compact else "epsilon"
