"""A flow family's transformer-only single file (what Civitai, Hugging Face and ComfyUI users
download: `flux1-dev.safetensors`, a Chroma release, a Z-Image fine-tune) loaded into the family's
pipeline. The transformer comes from the file, read in its original layout (the family's
`transformer_file` hook, trainers/formats/transformer_layouts.py); the text encoders, tokenizers, VAE
and scheduler from a diffusers folder of the same family whose transformer has the file's shapes:
the folder a Danlu fine-tune names as its base model, else the first such folder in
models/Stable-diffusion, else the family's built-in demo when the file is demo-shaped."""
from __future__ import annotations

import json
from pathlib import Path

from trainers import families
from trainers.families import FamilyError, folder_family, safetensors_shapes


class TransformerFileError(ValueError):
    pass


def _transformer_class(folder: Path):
    import diffusers
    index = json.loads((folder / "model_index.json").read_text())
    return getattr(diffusers, index["transformer"][1])


def _expected_shapes(folder: Path) -> dict[str, tuple]:
    """The folder's transformer parameter shapes, built on the meta device (no weights read)."""
    import torch
    cls = _transformer_class(folder)
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(folder / "transformer"))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _file_shapes(path: Path, family) -> dict[str, tuple]:
    """The file's tensors as the diffusers transformer names them (from its header alone)."""
    import torch
    from trainers.formats.quantized_weights import without_sidecars
    layout = family.hook("transformer_file")
    header = {k: torch.empty(s, device="meta")
              for k, s in without_sidecars(safetensors_shapes(path)).items()}
    return {k: tuple(v.shape) for k, v in layout.to_diffusers(header).items()}


def _candidates(paths, family_name: str) -> list[Path]:
    root = Path(paths.stable_diffusion)
    folders = []
    if root.is_dir():
        for entry in sorted(root.iterdir(), key=lambda p: p.name.lower()):
            if not (entry / "model_index.json").is_file():
                continue
            try:
                if folder_family(entry) == family_name:
                    folders.append(entry)
            except (FamilyError, OSError, ValueError):
                continue
    return folders


def _base_first(folders: list[Path], path: Path) -> list[Path]:
    """The folder a Danlu fine-tune was trained from (its `danlu.base_model`) before the rest."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as handle:
            base = (handle.metadata() or {}).get("danlu.base_model")
    except Exception:  # an unreadable header is refused by the shape check with its reason
        return folders
    return sorted(folders, key=lambda folder: folder.name != base)


def companion_folder(paths, path: Path, family_name: str) -> Path:
    """The diffusers folder whose text encoders, tokenizers and VAE go with this file."""
    from trainers.tiny_model import build_tiny_model
    family = families.get(family_name)
    if path.suffix.lower() != ".safetensors":
        raise TransformerFileError(f"model: {path.name}: a {family.label} transformer file is read "
                                   "as .safetensors only")
    try:
        wanted = _file_shapes(path, family)
    except (ValueError, KeyError, RuntimeError, OSError) as error:
        raise TransformerFileError(f"model: {path.name} is not a {family.label} transformer in the "
                                   f"original layout: {error}") from error
    tried = []
    for folder in _base_first(_candidates(paths, family_name), path):
        if _expected_shapes(folder) == wanted:
            return folder
        tried.append(folder.name)
    if family.demo is not None:
        demo = build_tiny_model(Path(paths.cache) / family.demo.name, family=family_name)
        if _expected_shapes(demo) == wanted:
            return demo
    checked = f" (checked {', '.join(tried)}: other shapes)" if tried else ""
    raise TransformerFileError(
        f"model: {path.name} holds only a {family.label} transformer; its text encoders, "
        f"tokenizers and VAE come from a diffusers folder of the same model ({family.pipeline} "
        f"layout, e.g. the base model it was trained from) in {paths.stable_diffusion} — none "
        f"has a transformer of this file's shape{checked}")


def load_transformer(path: Path, family_name: str, folder: Path):
    """The family's diffusers transformer holding the file's weights (in fp32, as a diffusers
    folder loads; the frozen-precision step halves it later). fp8 files, scaled or not, are
    read back to full precision (trainers/formats/quantized_weights.py)."""
    import torch
    from safetensors.torch import load_file
    from trainers.formats.quantized_weights import dequantized
    family = families.get(family_name)
    state = family.hook("transformer_file").to_diffusers(dequantized(load_file(str(path))))
    cls = _transformer_class(folder)
    from accelerate import init_empty_weights
    with init_empty_weights():  # parameters on the meta device, buffers (positions) real
        model = cls.from_config(cls.load_config(folder / "transformer"))
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(torch.float32).eval()
