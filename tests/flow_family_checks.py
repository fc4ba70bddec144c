"""What the flow families' LoRA tests share: the run settings on a tiny demo, the family's
diffusers pipeline, and a LoRA file applied through Danlu's own network (as Compare applies it)
so its image can be set beside the one the pipeline's `load_lora_weights` gives."""
from __future__ import annotations

from trainers.configs import LoraConfig
from trainers.formats.lora import load_lora


def flow_lora_config(folder, model: str, **changes) -> LoraConfig:
    base = dict(model=model, output_name="flowlora", train_data_dir=str(folder), resolution=64,
                min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16, network_dim=4,
                network_alpha=2.0, max_train_steps=4, save_every_n_epochs=0, learning_rate=5e-3,
                seed=3, save_precision="fp32", network_train_unet_only=True)
    base.update(changes)
    return LoraConfig(**base).validate()


def family_pipeline(folder):
    """The pipeline class the folder's model_index.json names, quiet."""
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def danlu_network(pipe, path, layout, strength=1.0, fit=False):
    """The pipeline's transformer with the LoRA file applied by Danlu's own network (the trained
    modules). `fit`: build each layer at the rank the file gives it (and the text encoder's when
    the file has one), as Compare fits a file; else the file's one rank, which is checked."""
    from trainers.checkpoint_apply import fitting_spec, spec_from_state
    from trainers.lora_network import LoraNetwork
    state, _ = load_lora(path)
    if fit:
        spec = fitting_spec(state, pipe.transformer, layout)
    else:
        spec = spec_from_state(state)  # as Compare reads the file
        assert (spec.rank, spec.alpha, spec.train_unet, spec.train_text_encoder) == \
            (4, 2.0, True, False)
    network = LoraNetwork(pipe.transformer, pipe.text_encoder if spec.train_text_encoder else None,
                          spec, layout=layout)
    network.load_kohya_state_dict(state)
    network.set_strength(strength)
    return network
