"""SDXL (base and refiner): a U-Net on two text encoders (CLIP ViT-L and OpenCLIP bigG, 2048-wide
context side by side) with size / crop conditioning (`text_time`)."""
from trainers.families import Family, register


def _is_sdxl_folder(index: dict, unet: dict) -> bool:
    return "XL" in str(index.get("_class_name", "")) or "text_encoder_2" in index \
        or unet.get("addition_embed_type") == "text_time"


FAMILY = register(Family(
    name="sdxl", label="SDXL", context_width=2048, pipeline="StableDiffusionXLPipeline",
    text_key_prefix="conditioner.embedders.",
    unet_key_markers=("model.diffusion_model.label_emb.",), folder_marker=_is_sdxl_folder))
