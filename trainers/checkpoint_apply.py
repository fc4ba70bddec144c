"""How each kind of checkpoint is applied to a loaded base model to render with it (Compare's
grids). Each is a context manager `(spec, paths, model, path, partners)` that yields
(model, set_strength, prompt encoder) and leaves the cached base model as it was; a method's
catalog entry names the one it uses (`Method.apply`)."""
from __future__ import annotations

import contextlib
from pathlib import Path

from core.paths import Paths
from trainers.apt_prompts import negative_name


def _no_strength(strength) -> None:
    return None


@contextlib.contextmanager
def whole_model(spec, paths: Paths, model, path: Path, partners: list[Path]):
    """DreamBooth / fine-tune checkpoints are whole models: load each on its own."""
    from trainers.conditioning import prompt_encoder
    from trainers.models import load_model
    own = load_model(paths, str(path), exclusive=True)  # not cached: one per checkpoint
    yield own, _no_strength, prompt_encoder(own, clip_skip=spec.clip_skip)


@contextlib.contextmanager
def embedding(spec, paths: Paths, model, path: Path, partners: list[Path]):
    from trainers.conditioning import prompt_encoder
    encoder = prompt_encoder(model, {spec.token: _embedding_vectors(path, model)},
                             clip_skip=spec.clip_skip)
    yield model, _no_strength, encoder


@contextlib.contextmanager
def embedding_pair(spec, paths: Paths, model, path: Path, partners: list[Path]):
    """APT: the embedding and its '-neg' partner, for the prompt and the negative prompt."""
    from trainers.conditioning import prompt_encoder
    if len(partners) != 1 or not partners[0].is_file():
        raise FileNotFoundError(f"{path.name}: its '-neg' embedding "
                                f"{partners[0].name if partners else ''} is gone")
    embeddings = {spec.token: _embedding_vectors(path, model),
                  negative_name(spec.token): _embedding_vectors(partners[0], model)}
    yield model, _no_strength, prompt_encoder(model, embeddings, clip_skip=spec.clip_skip)


@contextlib.contextmanager
def xti(spec, paths: Paths, model, path: Path, partners: list[Path]):
    from trainers.conditioning import prompt_encoder
    from trainers.formats.xti import load_xti
    from trainers.xti_layers import XtiEncoder, layer_names, per_layer
    layers = load_xti(path).layers
    from trainers.catalog import require_family
    require_family("xti", model, spec.model)
    expected = layer_names(model.unet)
    if list(layers) != expected:
        raise ValueError(f"{path.name} has layers {', '.join(layers)}; {spec.model} has "
                         f"{', '.join(expected)}")
    encoder = XtiEncoder(prompt_encoder(model, clip_skip=spec.clip_skip), spec.token,
                         {k: v.float().to(model.unet.device) for k, v in layers.items()})
    with per_layer(model.unet):  # as XTI's training previews: each layer its own vectors
        yield model, _no_strength, encoder


@contextlib.contextmanager
def hypernetwork(spec, paths: Paths, model, path: Path, partners: list[Path]):
    from trainers.conditioning import prompt_encoder
    from trainers.formats.hypernetwork import load_hypernetwork
    from trainers.hypernetwork_attention import applied
    net = load_hypernetwork(path).to(model.unet.device)
    net.eval()
    encoder = prompt_encoder(model, clip_skip=spec.clip_skip)
    with applied(model.unet, net, 1.0) as processor:
        yield model, (lambda strength: setattr(processor, "strength", float(strength))), encoder


@contextlib.contextmanager
def lora(spec, paths: Paths, model, path: Path, partners: list[Path]):
    from trainers.conditioning import prompt_encoder
    from trainers.formats.lycoris import algo_of, load_adapter
    from trainers.lora_network import LoraNetwork, find_targets
    from trainers import lycoris_network
    state, _ = load_adapter(path)
    if algo_of(state) is None:
        lora_spec = fitting_spec(state, model.unet, model.spec.hook("lora_layout"))
        network_class = LoraNetwork
    else:  # LoHa / LoKr
        convs = {t.name for t in find_targets(model.unet, "unet", True) if t.conv}
        lora_spec = lycoris_network.spec_from_state(state, convs)
        network_class = lycoris_network.LycorisNetwork
    network = network_class(model.unet if lora_spec.train_unet else None,
                          model.text_encoder if lora_spec.train_text_encoder else None,
                          lora_spec, text_encoder_2=model.text_encoder_2
                          if lora_spec.train_text_encoder else None,
                          layout=model.spec.hook("lora_layout"))
    try:
        network.load_kohya_state_dict(state)
        for parameter in network.parameters():
            parameter.requires_grad_(False)
        yield model, network.set_strength, prompt_encoder(model, _bundled(path, model),
                                                          clip_skip=spec.clip_skip)
    finally:
        network.remove()


def _bundled(path: Path, model) -> dict:
    """The token vectors a LoRA carries (pivotal tuning), so that prompts with its word render
    as A1111 renders them with the LoRA loaded."""
    from trainers.formats.bundled_embeddings import read_bundled
    found = {}
    for token, vectors in read_bundled(path).items():
        if isinstance(vectors, dict) != bool(model.spec.embedding_halves):
            raise ValueError(f"{path.name}: its token {token!r} was trained for another model "
                             f"family than {model.spec.label}")
        found[token] = ({k: v.float() for k, v in vectors.items()} if isinstance(vectors, dict)
                        else vectors.float())
    return found


def _embedding_vectors(path: Path, model):
    from trainers.formats.embedding import load_embedding
    vectors = load_embedding(path).vectors
    if isinstance(vectors, dict) != bool(model.spec.embedding_halves):
        kind = "a per-encoder (SDXL)" if isinstance(vectors, dict) else "a single-encoder"
        raise ValueError(f"{path.name} is {kind} embedding; the base model is "
                         f"{model.spec.label}")
    return ({k: v.float() for k, v in vectors.items()} if isinstance(vectors, dict)
            else vectors.float())


def fitting_spec(state, denoiser, layout):
    """The LoraSpec of a network that fits a kohya file on this denoiser: its layers' own ranks
    and alphas read after the layout splits fused layers into their modules, the blocks it
    trains (`blocks_in`) and the layer types it leaves out (`type_ranks_in`)."""
    sizes = {}
    for target in layout.denoiser_targets(denoiser, True):
        module = denoiser.get_submodule(target.path)
        sizes[target.name] = getattr(module, "out_features", None) or module.out_channels
    spec = spec_from_state(layout.from_file(state, sizes))
    spec.blocks = layout.blocks_in(state)
    spec.type_ranks = layout.type_ranks_in(state)
    return spec


def spec_from_state(state):
    """The LoraSpec (rank, alpha, conv rank/alpha, parts, DoRA) a kohya state dict was made with.
    Each layer's own rank and alpha go in `ranks` (a file resized per layer has several); the
    smallest linear rank is the default: a layer fused from several modules (Flux's q/k/v)
    may hold their adapters side by side."""
    from trainers.lora_network import LoraSpec
    rank = alpha = conv_rank = conv_alpha = None
    ranks = {}
    for key, tensor in state.items():
        if not key.endswith(".lora_down.weight"):
            continue
        base = key[: -len(".lora_down.weight")]
        value = state.get(f"{base}.alpha")
        value = float(value.float().reshape(())) if value is not None else float(tensor.shape[0])
        ranks[base] = (int(tensor.shape[0]), value)
        if tensor.dim() == 4 and tuple(tensor.shape[2:]) != (1, 1):
            conv_rank, conv_alpha = conv_rank or int(tensor.shape[0]), conv_alpha or value
        elif rank is None or tensor.shape[0] < rank:
            rank, alpha = int(tensor.shape[0]), value
    if rank is None:
        raise ValueError("the LoRA file has no linear adapters")
    scales = [v for k, v in state.items() if k.endswith(".dora_scale")]  # [1, in]: input axis
    return LoraSpec(rank=rank, alpha=alpha, conv_rank=conv_rank or 0,
                    conv_alpha=conv_alpha if conv_alpha is not None else 1.0,
                    train_unet=any(k.startswith("lora_unet_") for k in state),
                    train_text_encoder=any(k.startswith("lora_te") for k in state),
                    ranks=ranks, dora=bool(scales),
                    dora_on_output=not scales or scales[0].shape[0] != 1)
