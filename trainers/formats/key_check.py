"""Check a LoRA-family `.safetensors` file against the key maps of A1111's built-in Lora
extension, ComfyUI and diffusers: every key that would not load, and every layer name that maps
to no module of the base family (docs/lora-tools.md, "Check").

The A1111 and ComfyUI rules are re-implemented from their published loaders and need only the
file's header (torch-free):

- A1111 (extensions-builtin/Lora/networks.py): a layer name is turned into the model's module
  name (kohya's diffusers names to LDM names, `lora_unet_` -> `diffusion_model_`, `lora_te1_` ->
  the first SDXL encoder, `_q/_k/_v_proj` onto open_clip's one attention); keys that match no
  module are skipped ("Failed to match keys"); a matched layer whose keys no module type (LoRA,
  LoHa, LoKr, (IA)3, full diff, norm, GLoRA, OFT) accepts makes the whole file fail; the type
  reads its own tensors plus `alpha`, `scale`, `bias` and `dora_scale`; `bundle_emb.*` keys
  are its bundled embeddings. A1111 loads SD 1.x / 2.x / SDXL only.
- ComfyUI (comfy/lora.py `model_lora_keys_unet` / `model_lora_keys_clip`, the weight
  adapters): a key loads when it is `<mapped name>.<an adapter's tensor>`; the map has
  `lora_unet_` + the original (LDM / SGM / BFL) path, for U-Nets also `lora_unet_` + the
  diffusers path, `lora_te_` / `lora_te1_` / `lora_te2_` for the CLIP encoders, and the
  diffusers `transformer.` / `lycoris_` spellings where ComfyUI lists them. Every other key is
  logged "lora key not loaded".
- diffusers: the installed converters themselves (trainers/formats/key_check_diffusers.py).
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from trainers.formats.lora_key_maps import (CLIP_LEAVES, FAMILIES, FamilyModules,
                                            family_modules)

BUNDLE = "bundle_emb."
LORA_PARTS = ("lora_up.weight", "lora_down.weight")
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
# A1111's module types: (what makes the type take a layer, the tensors it reads)
A1111_TYPES = (
    ("LoRA", lambda p: all(k in p for k in LORA_PARTS), {*LORA_PARTS, "lora_mid.weight"}),
    ("LoHa", lambda p: all(k in p for k in LOHA_PARTS), {*LOHA_PARTS, "hada_t1", "hada_t2"}),
    ("(IA)3", lambda p: "weight" in p, {"weight", "on_input"}),
    ("LoKr", lambda p: ("lokr_w1" in p or "lokr_w1_a" in p) and ("lokr_w2" in p or "lokr_w2_a" in p),
     {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
    ("full", lambda p: "diff" in p, {"diff", "diff_b"}),
    ("norm", lambda p: "w_norm" in p and "b_norm" in p, {"w_norm", "b_norm"}),
    ("GLoRA", lambda p: all(f"{k}.weight" in p for k in ("a1", "a2", "b1", "b2")),
     {"a1.weight", "a2.weight", "b1.weight", "b2.weight"}),
    ("OFT", lambda p: "oft_blocks" in p or "oft_diag" in p, {"oft_blocks", "oft_diag"}),
)
A1111_COMMON = {"alpha", "scale", "bias", "dora_scale"}
# The tensors ComfyUI's weight adapters read after a mapped name (and `_lora.up.weight` style)
COMFY_PARTS = ("lora_up.weight", "lora_down.weight", "lora_mid.weight", "lora_B.weight",
               "lora_A.weight", "lora.up.weight", "lora.down.weight",
               "lora_linear_layer.up.weight", "lora_linear_layer.down.weight", "alpha",
               "dora_scale", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1",
               "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
               "lokr_w2_b", "lokr_t2", "a1.weight", "a2.weight", "b1.weight", "b2.weight",
               "w_norm", "b_norm", "diff", "diff_b", "set_weight", "reshape_weight",
               "oft_blocks", "rescale")
KNOWN_PARTS = set(COMFY_PARTS) | A1111_COMMON | {p for _, _, reads in A1111_TYPES for p in reads}
SCALED = {"lora": "lora_down.weight", "loha": "hada_w1_b", "lokr": None}
FAMILY_OF_VERSION = (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1"), ("flux1", "flux1"),
                     ("chroma", "chroma"), ("zimage", "zimage"), ("flux2", "flux2_klein"),
                     ("qwen_image", "qwen_image"))
LOADERS = ("A1111", "ComfyUI", "diffusers")


class KeyCheckError(ValueError):
    """The file cannot be checked (missing, not safetensors, no LoRA keys); names the file."""


@dataclass
class LoaderResult:
    loader: str
    applies: bool = True  # False: this loader does not load the family at all
    not_loaded: dict[str, str] = field(default_factory=dict)  # key -> why
    fatal: str = ""  # the whole file fails to load
    note: str = ""

    @property
    def loads(self) -> bool:
        return self.applies and not self.not_loaded and not self.fatal


@dataclass
class KeyReport:
    path: str
    family: str
    label: str
    layers: int
    embeddings: list[str]
    family_note: str = ""
    demo: str = ""  # the file was trained on this built-in demo model
    problems: list[str] = field(default_factory=list)  # loader-independent: missing alpha, ...
    unmapped: list[str] = field(default_factory=list)  # layer names of no module of the family
    results: list[LoaderResult] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems and not self.unmapped and all(
            r.loads for r in self.results if r.applies)

    @property
    def broken(self) -> bool:
        """What the CLI exits 1 for: keys no loader reads, or layers of no module of the family.
        A loader that takes only part of a well-formed file (ComfyUI and Z-Image's attention)
        is reported but is not a broken file."""
        return bool(self.problems or self.unmapped)

    def summary(self) -> str:
        """One line: "loads in A1111 / ComfyUI / diffusers" or what would not load."""
        ok = [r.loader for r in self.results if r.loads]
        bad = [r for r in self.results if r.applies and not r.loads]
        skipped = [r.loader for r in self.results if not r.applies]
        text = f"Check ({self.label}): "
        if ok:
            text += f"loads in {' / '.join(ok)}"
        for r in bad:
            text += ("; " if text[-2:] != ": " else "") + _loader_line(r)
        if skipped:
            text += f" ({' / '.join(skipped)} does not load {self.label} LoRAs)"
        if self.problems:
            text += f"; {len(self.problems)} problem(s): {_some(self.problems)}"
        if self.demo and not self.clean:
            text += (f" (made for the demo model {self.demo}, whose layers are not all a "
                     f"full-size {self.label}'s)")
        return text

    def text(self) -> str:
        """The whole report, one finding a line."""
        lines = [f"{self.path}: {self.layers} layers, {self.label}"
                 + (f", bundled embeddings {', '.join(self.embeddings)}" if self.embeddings else "")]
        if self.family_note:
            lines.append(self.family_note)
        lines.append(self.summary())
        lines += [f"problem: {p}" for p in self.problems]
        lines += [f"no {self.label} module: {name}" for name in self.unmapped]
        for r in self.results:
            if not r.applies:
                lines.append(f"{r.loader}: {r.note}")
                continue
            if r.fatal:
                lines.append(f"{r.loader}: the file fails to load: {r.fatal}")
            lines += [f"{r.loader} would not load {key}: {why}" for key, why in r.not_loaded.items()]
            if r.note:
                lines.append(f"{r.loader}: {r.note}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"path": self.path, "family": self.family, "clean": self.clean,
                "summary": self.summary(), "problems": self.problems, "unmapped": self.unmapped,
                "loaders": {r.loader: {"applies": r.applies, "loads": r.loads, "fatal": r.fatal,
                                       "not_loaded": r.not_loaded, "note": r.note}
                            for r in self.results}}


def _loader_line(r: LoaderResult) -> str:
    if r.fatal:
        return f"{r.loader} fails to load the file ({r.fatal})"
    keys = list(r.not_loaded)
    return f"{r.loader} would not load {len(keys)} key(s): {_some(keys)}"


def _some(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# ---- reading ------------------------------------------------------------------------------
def read_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """({key: {"dtype", "shape"}}, metadata) from a .safetensors header, without torch."""
    path = Path(path)
    if not path.is_file():
        raise KeyCheckError(f"{path}: no such file")
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, 100 << 20):
                raise ValueError(f"its header length {length} does not fit the file")
            header = json.loads(handle.read(length).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        data_size = size - 8 - length
        for key, entry in header.items():
            start, end = entry["data_offsets"]
            if not (0 <= start <= end <= data_size):
                raise ValueError(f"tensor {key!r} lies outside the file")
            entry["shape"] = [int(n) for n in entry["shape"]]
    except KeyCheckError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError) as error:
        raise KeyCheckError(f"{path}: not a readable safetensors file ({error})") from None
    if not header:
        raise KeyCheckError(f"{path}: the file holds no tensors")
    return header, {str(k): str(v) for k, v in metadata.items()}


def split_layers(keys) -> tuple[dict[str, set[str]], dict[str, list[str]], list[str]]:
    """({kohya layer name: its parts}, {embedding: keys}, keys of neither shape)."""
    layers: dict[str, set[str]] = {}
    embeddings: dict[str, list[str]] = {}
    odd = []
    for key in keys:
        if key.startswith(BUNDLE):
            embeddings.setdefault(key[len(BUNDLE):].split(".", 1)[0], []).append(key)
        elif "." in key:
            name, part = key.split(".", 1)
            layers.setdefault(name, set()).add(part)
        else:
            odd.append(key)
    return layers, embeddings, odd


# ---- family -------------------------------------------------------------------------------
def family_from_metadata(metadata: dict[str, str]) -> str | None:
    version = metadata.get("ss_base_model_version", "")
    for prefix, family in FAMILY_OF_VERSION:
        if version.startswith(prefix):
            return family
    if metadata.get("ss_v2") == "True":
        return "sd2"
    return None


def kohya_names(modules: FamilyModules) -> set[str]:
    """The layer names kohya-style trainers write for this family (Danlu's too)."""
    if modules.sd_unet:
        names = {"lora_unet_" + d.replace(".", "_") for d, _ in modules.denoiser}
    elif modules.name == "zimage":  # musubi-tuner: the diffusers paths
        names = {"lora_unet_" + d.replace(".", "_") for d, _ in modules.denoiser}
    else:  # SGM / BFL paths
        names = {"lora_unet_" + o.replace(".", "_") for _, o in modules.denoiser}
    for prefix, (_, layers, _) in modules.text.items():
        names |= _clip_names(prefix, layers)
    return names


def _clip_names(prefix: str, layers: int) -> set[str]:
    return {f"{prefix}_text_model_encoder_layers_{n}_{leaf.replace('.', '_')}"
            for n in range(layers) for leaf in CLIP_LEAVES}


def guess_family(layers, metadata: dict[str, str]) -> tuple[str, str]:
    """(family, note): the metadata's family, or the one whose names cover most layers; the
    note says when the layers fit another family better than the metadata's."""
    scores = {name: len(set(layers) & kohya_names(family_modules(name))) for name in FAMILIES}
    best = max(FAMILIES, key=lambda name: scores[name])  # the first of equals
    said = family_from_metadata(metadata)
    if said is None:
        return best, f"family: no ss_base_model_version; the layer names are {family_modules(best).label}'s"
    if scores[best] > scores[said]:
        return said, (f"family: the file says {family_modules(said).label} "
                      f"(ss_base_model_version {metadata.get('ss_base_model_version')!r}) but "
                      f"{scores[best]} of its layers are {family_modules(best).label}'s, "
                      f"{scores[said]} {family_modules(said).label}'s")
    return said, ""


# ---- loader-independent -------------------------------------------------------------------
def adapter_kind(parts: set[str]) -> str | None:
    if any(p in parts for p in LORA_PARTS):
        return "lora"
    if any(p.startswith("hada_") for p in parts):
        return "loha"
    if any(p.startswith("lokr_") for p in parts):
        return "lokr"
    return None


def layer_problems(name: str, parts: set[str]) -> list[str]:
    problems = [f"{name}.{p}: unknown key (no loader reads '{p}')"
                for p in sorted(parts - KNOWN_PARTS)]
    kind = adapter_kind(parts)
    if kind == "lora":
        problems += [f"{name}: has {have} but no {want}" for have, want in
                     (("lora_down.weight", "lora_up.weight"), ("lora_up.weight", "lora_down.weight"))
                     if have in parts and want not in parts]
    elif kind == "loha":
        missing = [p for p in LOHA_PARTS if p not in parts]
        if missing:
            problems.append(f"{name}: LoHa without {', '.join(missing)}")
    elif kind == "lokr":
        for w in ("w1", "w2"):
            if f"lokr_{w}" not in parts and not {f"lokr_{w}_a", f"lokr_{w}_b"} <= parts:
                problems.append(f"{name}: LoKr without lokr_{w} (or lokr_{w}_a and lokr_{w}_b)")
    elif parts & KNOWN_PARTS and not parts <= A1111_COMMON:
        pass  # another adapter type (diff, norm, GLoRA, OFT): the loaders' rules decide
    elif parts <= A1111_COMMON:
        problems.append(f"{name}: only {', '.join(sorted(parts))}, no adapter weights")
    factored = kind == "lora" or kind == "loha" or (
        kind == "lokr" and ("lokr_w1_b" in parts or "lokr_w2_b" in parts))
    if factored and "alpha" not in parts:
        problems.append(f"{name}.alpha: missing; A1111, ComfyUI and diffusers then apply the "
                        "layer at scale 1 (alpha = rank)")
    return problems


# ---- A1111 --------------------------------------------------------------------------------
RESNET_A1111 = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
                "conv_shortcut": "skip_connection"}
X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")


def a1111_compvis_name(name: str, is_sd2: bool) -> str:
    """A1111's convert_diffusers_name_to_compvis (3 blocks a level, as in every SD U-Net)."""
    rules = (
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
        (r"lora_unet_time_embedding_linear_(\d+)(.*)",
         lambda m: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_"
                   f"{1 if m[2] == 'attentions' else 0}_{_resnet_leaf(m[2], m[4])}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_"
                   f"{_resnet_leaf(m[1], m[3])}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_"
                   f"{1 if m[2] == 'attentions' else 0}_{_resnet_leaf(m[2], m[4])}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
         lambda m: f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
         lambda m: f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"),
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)",
         lambda m: (f"model_transformer_resblocks_{m[1]}_{_open_clip_leaf(m[2])}" if is_sd2
                    else f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}")),
        (r"lora_te2_text_model_encoder_layers_(\d+)_(.+)",
         lambda m: f"1_model_transformer_resblocks_{m[1]}_{_open_clip_leaf(m[2])}"),
    )
    for pattern, build in rules:
        match = re.match(pattern, name)
        if match:
            return build(match)
    return name


def _resnet_leaf(kind: str, leaf: str) -> str:
    return RESNET_A1111.get(leaf, leaf) if kind == "resnets" else leaf


def _open_clip_leaf(leaf: str) -> str:
    if "mlp_fc1" in leaf:
        return leaf.replace("mlp_fc1", "mlp_c_fc")
    if "mlp_fc2" in leaf:
        return leaf.replace("mlp_fc2", "mlp_c_proj")
    return leaf.replace("self_attn", "attn")


def a1111_module(name: str, modules: FamilyModules) -> str | None:
    """The A1111 module a layer name reaches (networks.py load_network's lookups), or None."""
    known = modules.a1111
    key = a1111_compvis_name(name, modules.name == "sd2")
    if key in known:
        return key
    match = X_PROJ.match(key)
    if match and match.group(1) in known:
        return match.group(1)
    if "lora_unet" in name:
        key = name.replace("lora_unet", "diffusion_model")
        return key if key in known else None
    if "lora_te1_text_model" in name:
        for target in ("0_transformer_text_model", "transformer_text_model"):
            key = name.replace("lora_te1_text_model", target)
            if key in known:
                return key
    return None


def check_a1111(layers: dict[str, set[str]], embeddings: dict[str, list[str]],
                modules: FamilyModules) -> LoaderResult:
    result = LoaderResult("A1111")
    if modules.a1111 is None:
        result.applies = False
        result.note = f"A1111's Lora extension does not load {modules.label} models"
        return result
    mha: dict[str, set[str]] = {}
    for name, parts in layers.items():
        module = a1111_module(name, modules)
        if module is None:
            for part in sorted(parts):
                result.not_loaded[f"{name}.{part}"] = f"no {modules.label} module is named so"
            continue
        projection = X_PROJ.match(a1111_compvis_name(name, modules.name == "sd2"))
        if projection and module == projection.group(1):  # open_clip's one attention module
            mha.setdefault(module, set()).add(name)
        taken = next(((label, reads) for label, accepts, reads in A1111_TYPES if accepts(parts)),
                     None)
        if taken is None:
            result.fatal = (f"no module type accepts the keys of {name} "
                            f"({', '.join(sorted(parts))})")
            continue
        for part in sorted(parts - taken[1] - A1111_COMMON):
            result.not_loaded[f"{name}.{part}"] = f"ignored by A1111's {taken[0]} module"
    for module, names in mha.items():
        if len(names) < 3:  # open_clip's attention takes q, k and v (and out_proj) together
            for name in sorted(names):
                result.not_loaded[f"{name}.*"] = ("A1111 applies open_clip's attention only "
                                                  "with all of q_proj, k_proj and v_proj")
    for emb, keys in embeddings.items():
        subs = {k[len(BUNDLE) + len(emb) + 1:].split(".", 1)[0] for k in keys}
        if not ("string_to_param" in subs or {"clip_l", "clip_g"} <= subs or len(keys) == 1):
            for key in keys:
                result.not_loaded[key] = ("A1111 reads a bundled embedding from "
                                          "string_to_param.* (or clip_l and clip_g for SDXL)")
    return result


# ---- ComfyUI ------------------------------------------------------------------------------
def comfy_names(modules: FamilyModules) -> set[str]:
    """The names comfy/lora.py maps for this family (U-Net / transformer and CLIP)."""
    names = set()
    for diffusers, original in modules.denoiser:
        names.add("lora_unet_" + original.replace(".", "_"))
        names.add("diffusion_model." + original)
        if modules.diffusers_component == "unet":
            names.add("lora_unet_" + diffusers.replace(".", "_"))
            names.add("lycoris_" + diffusers.replace(".", "_"))
            names.add("unet." + diffusers)
        elif modules.name in ("flux1", "zimage"):  # flux_to_diffusers / z_image_to_diffusers
            names.add("transformer." + diffusers)
            names.add("lycoris_" + diffusers.replace(".", "_"))
            if modules.name == "zimage":
                names.add("diffusion_model." + diffusers)
        elif modules.name == "qwen_image":  # its QwenImage map: the bare path, transformer.
            names |= {diffusers, "transformer." + diffusers,
                      "lycoris_" + diffusers.replace(".", "_")}
    for prefix, (component, layers, also) in modules.text.items():
        for p in (prefix, *also):
            names |= _clip_names(p, layers)
        names |= {f"{component}.text_model.encoder.layers.{n}.{leaf}"
                  for n in range(layers) for leaf in CLIP_LEAVES}
    return names


def check_comfy(keys, modules: FamilyModules) -> LoaderResult:
    result = LoaderResult("ComfyUI")
    names = comfy_names(modules)
    for key in keys:
        if key.startswith(BUNDLE):
            result.not_loaded[key] = "ComfyUI does not read bundled embeddings (load the separate embedding)"
            continue
        mapped = any(key == f"{name}.{part}" for part in COMFY_PARTS
                     if key.endswith("." + part) and (name := key[:-len(part) - 1]) in names)
        if mapped:
            continue
        part = key.split(".", 1)[1] if "." in key else key
        result.not_loaded[key] = ("no adapter tensor is named so" if part not in COMFY_PARTS
                                  else f"no {modules.label} module is named so")
    return result


# ---- the check ----------------------------------------------------------------------------
def check_file(path: str | Path, family: str | None = None,
               diffusers: bool = True) -> KeyReport:
    """The report for one file; `family` None reads it from the metadata (or the names).
    KeyCheckError for a file that cannot be read or holds no LoRA-family keys."""
    header, metadata = read_header(path)
    layers, embeddings, odd = split_layers(header)
    if not layers and not embeddings:
        raise KeyCheckError(f"{path}: no LoRA keys (found {_some(sorted(header))})")
    family = (family or "").strip() or None
    note = ""
    if family is None:
        family, note = guess_family(layers, metadata)
    elif family not in FAMILIES:
        raise KeyCheckError(f"family: {family!r} is not one of {', '.join(FAMILIES)}")
    else:
        said = family_from_metadata(metadata)
        if said and said != family:
            note = (f"family: the file says {family_modules(said).label} "
                    f"(ss_base_model_version), checked as {family_modules(family).label}")
    modules = family_modules(family)
    report = KeyReport(str(path), family, modules.label, len(layers), sorted(embeddings),
                       family_note=note)
    from trainers.families import demo_families
    if metadata.get("ss_sd_model_name", "") in demo_families():
        report.demo = metadata["ss_sd_model_name"]
    report.problems += [f"{key}: unknown key (not '<layer>.<tensor>')" for key in odd]
    for name, parts in sorted(layers.items()):
        report.problems += layer_problems(name, parts)
    a1111 = check_a1111(layers, embeddings, modules)
    comfy = check_comfy(list(header), modules)
    canonical = kohya_names(modules)
    report.unmapped = sorted(
        name for name in layers if name not in canonical
        and (not a1111.applies or any(k.startswith(name + ".") for k in a1111.not_loaded))
        and any(k.startswith(name + ".") for k in comfy.not_loaded))
    report.results = [a1111, comfy]
    if diffusers:
        from trainers.formats.key_check_diffusers import check_diffusers
        report.results.append(check_diffusers(Path(path), modules))
    return report


def saved_file_note(path: str | Path, family: str | None = None) -> str:
    """The Check's one line for a file just written (the save messages): never raises, so a
    check that cannot run does not hide the save."""
    if family is not None and family not in FAMILIES:
        return f"Check: no key maps for the {family} family yet"
    try:
        return check_file(path, family).summary()
    except Exception as error:  # noqa: BLE001 - the file is saved whatever the check says
        return f"Check could not run: {error}"
