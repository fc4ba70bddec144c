"""Encode prompts with the CLIP text encoder, splicing embedding vectors in where an embedding's
name appears (the way A1111 does): the vocabulary and the cached model stay untouched."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from trainers import prompt_chunks as chunks


def _name_tokens(tokenizer, name: str) -> list[int]:
    return tokenizer(name, add_special_tokens=False).input_ids


class PromptEncoder:
    def __init__(self, tokenizer, text_encoder, embeddings: dict[str, torch.Tensor] | None = None,
                 clip_skip: int = 1, max_tokens: int = 75, chunking: str = "a1111"):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.embeddings = dict(embeddings or {})
        self.clip_skip = clip_skip  # 2 = the penultimate layer, as A1111 and kohya count
        if max_tokens not in chunks.MAX_TOKEN_LENGTHS or chunking not in chunks.STYLES:
            raise ValueError(f"max_tokens must be one of {chunks.MAX_TOKEN_LENGTHS} and chunking "
                             f"one of {chunks.STYLES}, got {max_tokens}, {chunking!r}")
        self.max_tokens = max_tokens  # 75, 150 or 225 prompt tokens (trainers/prompt_chunks.py)
        self.chunking = chunking
        self.length = tokenizer.model_max_length  # 77 with BOS and EOS

    def tokenize(self, text: str) -> tuple[list[int], list[tuple[int, torch.Tensor]]]:
        """Token ids (77 per chunk) and (position, vectors) splices for embeddings in `text`."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        patterns = sorted(((tuple(_name_tokens(self.tokenizer, name)), vectors)
                           for name, vectors in self.embeddings.items()),
                          key=lambda item: -len(item[0]))
        max_chunks = self.max_tokens // chunks.CHUNK
        a1111 = self.chunking == "a1111"
        parts = chunks.split(ids, patterns, max_chunks, comma=self._comma() if a1111 else None,
                             backtrack=chunks.COMMA_BACKTRACK if a1111 else 0)
        if not a1111:  # kohya: always max_token_length / 75 chunks
            parts += [chunks.Chunk() for _ in range(max_chunks - len(parts))]
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        full: list[int] = []
        splices: list[tuple[int, torch.Tensor]] = []
        for part in parts:
            splices += [(len(full) + 1 + offset, vectors) for offset, vectors in part.splices]
            full += chunks.wrap(part, bos, eos, pad)
        return full, splices

    def _comma(self) -> int | None:
        if not hasattr(self, "_comma_id"):
            self._comma_id = self.tokenizer.convert_tokens_to_ids(",</w>")
        return self._comma_id

    def chunk_rows(self, texts: list[str], count: int = 0):
        """(input ids [batch * chunks, 77], splices (row, position, vectors), chunks per prompt):
        every prompt of the batch gets as many chunks as the longest (at least `count`), empty
        ones pad the shorter."""
        tokenized = [self.tokenize(text) for text in texts]
        count = max([count] + [len(ids) // self.length for ids, _ in tokenized])
        empty = self.tokenize("")[0][:self.length]
        rows, all_splices = [], []
        for b, (ids, splices) in enumerate(tokenized):
            ids = ids + empty * (count - len(ids) // self.length)
            rows += [ids[k * self.length:(k + 1) * self.length] for k in range(count)]
            all_splices += [(b * count + pos // self.length, pos % self.length, vec)
                            for pos, vec in splices]
        input_ids = torch.tensor(rows, dtype=torch.long, device=self.text_encoder.device)
        return input_ids, all_splices, count

    def encode(self, texts: list[str]) -> torch.Tensor:
        """[batch, positions, dim] hidden states; differentiable w.r.t. the embedding vectors.
        Prompts of one batch get the same number of chunks (empty ones pad the shorter)."""
        input_ids, all_splices, count = self.chunk_rows(texts)
        with _spliced(self.text_encoder.get_input_embeddings(), all_splices):
            if self.clip_skip <= 1:
                hidden = self.text_encoder(input_ids)[0]
            else:
                out = self.text_encoder(input_ids, output_hidden_states=True)
                hidden = _final_layer_norm(self.text_encoder)(out.hidden_states[-self.clip_skip])
        return chunks.join(hidden.reshape(len(texts), count, self.length, -1), self.chunking)


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
