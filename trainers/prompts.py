"""Encode prompts with the CLIP text encoder, splicing embedding vectors in where an embedding's
name appears (the way A1111 does): the vocabulary and the cached model stay untouched."""
from __future__ import annotations

from contextlib import contextmanager

import torch


def _name_tokens(tokenizer, name: str) -> list[int]:
    return tokenizer(name, add_special_tokens=False).input_ids


class PromptEncoder:
    def __init__(self, tokenizer, text_encoder, embeddings: dict[str, torch.Tensor] | None = None,
                 clip_skip: int = 1):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.embeddings = dict(embeddings or {})
        self.clip_skip = clip_skip  # 2 = the penultimate layer, as A1111 and kohya count
        self.length = tokenizer.model_max_length  # 77 with BOS and EOS

    def tokenize(self, text: str) -> tuple[list[int], list[tuple[int, torch.Tensor]]]:
        """Token ids (padded to 77) and (position, vectors) splices for embeddings in `text`."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        patterns = sorted(((tuple(_name_tokens(self.tokenizer, name)), vectors)
                           for name, vectors in self.embeddings.items()),
                          key=lambda item: -len(item[0]))
        out: list[int] = []
        splices: list[tuple[int, torch.Tensor]] = []
        i = 0
        room = self.length - 2
        while i < len(ids) and len(out) < room:
            for pattern, vectors in patterns:
                if pattern and tuple(ids[i:i + len(pattern)]) == pattern:
                    n = min(vectors.shape[0], room - len(out))
                    splices.append((1 + len(out), vectors[:n]))
                    out.extend([ids[i]] * n)  # placeholder ids; their vectors are replaced
                    i += len(pattern)
                    break
            else:
                out.append(ids[i])
                i += 1
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        full = [bos] + out + [eos]
        full += [pad] * (self.length - len(full))
        return full, splices

    def encode(self, texts: list[str]) -> torch.Tensor:
        """[batch, 77, dim] hidden states; differentiable w.r.t. the embedding vectors."""
        device = self.text_encoder.device
        rows, all_splices = [], []
        for b, text in enumerate(texts):
            ids, splices = self.tokenize(text)
            rows.append(ids)
            all_splices.extend((b, pos, vec) for pos, vec in splices)
        input_ids = torch.tensor(rows, dtype=torch.long, device=device)
        with _spliced(self.text_encoder.get_input_embeddings(), all_splices):
            if self.clip_skip <= 1:
                return self.text_encoder(input_ids)[0]
            out = self.text_encoder(input_ids, output_hidden_states=True)
            return _final_layer_norm(self.text_encoder)(out.hidden_states[-self.clip_skip])


def _final_layer_norm(text_encoder) -> torch.nn.Module:
    inner = getattr(text_encoder, "text_model", text_encoder)  # transformers 4 had this level
    return inner.final_layer_norm


@contextmanager
def _spliced(token_embedding: torch.nn.Module, splices):
    if not splices:
        yield
        return

    def replace(module, inputs, output):
        output = output.clone()
        for b, pos, vectors in splices:
            output[b, pos:pos + vectors.shape[0]] = vectors.to(output.device, output.dtype)
        return output

    handle = token_embedding.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()
