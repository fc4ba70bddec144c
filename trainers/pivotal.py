"""Pivotal tuning: a new word's token vectors trained together with a LoRA (OneTrainer's
additional embeddings, diffusers' advanced scripts), with their own learning rate and a step
after which they freeze while the LoRA goes on. The captions' word is replaced by the vectors
the way A1111 splices an embedding in (trainers/prompts.py); SDXL gets one set per text
encoder (clip_l, clip_g), as SDXL textual inversion. The LoRA file carries them as A1111's
bundled embeddings (trainers/formats/bundled_embeddings.py)."""
from __future__ import annotations

import torch

from trainers.conditioning import prompt_encoder
from trainers.embeddings import initial_vectors
from trainers.formats.bundled_embeddings import Vectors, bundle_metadata, bundle_tensors
from trainers.loop import TrainingError


class PivotalTokens:
    """The trained vectors of one word: a Parameter [n, width], or one per SDXL text encoder."""

    def __init__(self, name: str, vectors: dict[str, torch.nn.Parameter], halves: tuple,
                 stop_step: int, info: dict):
        self.name = name
        self.vectors = vectors  # {"": p} for one text encoder, {"clip_l": p, "clip_g": p} SDXL
        self.halves = halves
        self.stop_step = stop_step
        self.info = info  # what the file's metadata says about them

    @classmethod
    def create(cls, cfg, model) -> "PivotalTokens | None":
        """The word's vectors from the config's init text, or None without pivotal tuning.
        TrainingError (naming the field) for a family without CLIP token tables or a word the
        tokenizers already have."""
        if not cfg.pivotal_tuning:
            return None
        if model.spec.prediction == "flow":
            raise TrainingError(f"pivotal_tuning: trains CLIP token vectors (SD 1.x / 2.x / "
                                f"SDXL); {cfg.model} is a {model.spec.label} model")
        name = cfg.pivotal_token
        for tokenizer in model.tokenizers:
            check_new_word(tokenizer, name)
        halves = tuple(model.spec.embedding_halves) or ("",)
        device = model.unet.device
        vectors = {half: torch.nn.Parameter(initial_vectors(
                       tokenizer, encoder, cfg.pivotal_init_text, cfg.pivotal_vectors).to(device))
                   for half, tokenizer, encoder in zip(halves, model.tokenizers,
                                                       model.text_encoders)}
        info = {"vectors": cfg.pivotal_vectors, "init_text": cfg.pivotal_init_text,
                "stop_step": cfg.pivotal_stop_step}
        return cls(name, vectors, halves, cfg.pivotal_stop_step, info)

    # ---- training
    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.vectors[h] for h in self.halves]

    def trains(self, steps_done: int) -> bool:
        return not self.stop_step or steps_done < self.stop_step

    def at_step(self, steps_done: int) -> None:
        """Frozen from the stop step on: no gradient, so no optimizer touches them."""
        for parameter in self.parameters():
            parameter.requires_grad_(self.trains(steps_done))

    @property
    def training(self) -> bool:
        return self.parameters()[0].requires_grad

    def rates(self, rates, steps_done: int):
        """The schedule's rates with this group's (the last) at 0 once the vectors froze."""
        if rates is None or self.trains(steps_done):
            return rates
        return [*rates[:-1], 0.0]

    def encoder(self, cfg, model, trains_text_encoder: bool):
        """(prompt encoder, encode): captions with the word spliced in; gradients reach the
        vectors while they train (through the frozen text encoder when it has no LoRA)."""
        encoder = prompt_encoder(model, {self.name: self.spliced()}, clip_skip=cfg.clip_skip,
                                 max_tokens=cfg.max_token_length, chunking="kohya")

        def encode(texts: list[str]):
            if trains_text_encoder or self.training:
                return encoder.encode(texts)
            with torch.no_grad():
                return encoder.encode(texts)
        return encoder, encode

    def spliced(self):
        """What prompt_encoder splices: the tensor, or SDXL's {clip_l, clip_g}."""
        return self.vectors[""] if self.halves == ("",) else dict(self.vectors)

    # ---- saving and resuming
    def state(self) -> Vectors:
        """fp32 copies on the CPU (the sidecar keeps these for an exact resume)."""
        copies = {h: v.detach().to("cpu", torch.float32).clone() for h, v in self.vectors.items()}
        return copies[""] if self.halves == ("",) else copies

    def bundle(self) -> dict[str, torch.Tensor]:
        return bundle_tensors(self.name, self.state())

    def embedding_file(self, step: int):
        """The vectors as an ordinary embedding named after the word."""
        from trainers.formats.embedding import EmbeddingFile
        return EmbeddingFile(name=self.name, vectors=self.state(), step=step)

    def metadata(self) -> dict[str, str]:
        return bundle_metadata({self.name: self.info})

    def load(self, vectors: Vectors, where: str) -> None:
        """Copy saved vectors in; TrainingError when they do not fit."""
        parts = vectors if isinstance(vectors, dict) else {"": vectors}
        if set(parts) != set(self.halves):
            raise TrainingError(f"pivotal_token: {where} holds {self.name!r} for "
                                f"{', '.join(sorted(parts)) or 'one text encoder'}, this model "
                                f"has {', '.join(h or 'one text encoder' for h in self.halves)}")
        for half, tensor in parts.items():
            target = self.vectors[half]
            if tuple(tensor.shape) != tuple(target.shape):
                raise TrainingError(f"pivotal_vectors: {where} holds {self.name!r} as "
                                    f"{list(tensor.shape)}, the settings make "
                                    f"{list(target.shape)}; set the same vectors per token or "
                                    "tick 'Start over'")
            with torch.no_grad():
                target.copy_(tensor.to(target.device, torch.float32))


def check_new_word(tokenizer, name: str) -> None:
    """A vocabulary entry of its own ('dog', 'cat': common words have one) is refused, as
    diffusers' load_textual_inversion refuses such a token: its vectors would replace that word
    in every prompt. A rare word the vocabulary has only as a word end ('ohwx', 'sks') is the
    usual choice and is kept."""
    if name in tokenizer.get_vocab():
        raise TrainingError(f"pivotal_token: {name!r} is a word of the text encoder's "
                            "vocabulary: its vectors would replace that word in every prompt, "
                            "and diffusers' load_textual_inversion refuses a token its "
                            "tokenizer has; pick a rare string, e.g. 'ohwx'")
