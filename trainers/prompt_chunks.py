"""Long prompts: captions of up to 150 or 225 tokens as 75-token chunks.

Each chunk is wrapped in BOS/EOS (77 ids), encoded by CLIP on its own, and the chunks' hidden
states are put side by side along the sequence axis. Two conventions exist and both are kept:

- "a1111" (AUTOMATIC1111, what TI and hypernetworks train against): as many chunks as the
  longest prompt of the batch needs, each chunk's 77 states kept whole (77, 154 or 231
  positions); a chunk breaks after the last comma when one is within the last 20 tokens
  (A1111's default `comma_padding_backtrack`), and an embedding never straddles two chunks.
- "kohya" (sd-scripts' `max_token_length`, what LoRA and DreamBooth train against): always
  max_token_length / 75 chunks, and of their states only the first chunk's BOS, the 75 token
  states of every chunk and the last chunk's EOS are kept (77, 152 or 227 positions).

Tokens past the limit are dropped (as both do), and with a limit of 75 both are plain CLIP.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

CHUNK = 75  # prompt tokens per chunk; with BOS and EOS a chunk is CLIP's 77 positions
MAX_TOKEN_LENGTHS = (75, 150, 225)
STYLES = ("a1111", "kohya")
COMMA_BACKTRACK = 20  # A1111's default comma_padding_backtrack


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)  # at most CHUNK prompt tokens
    splices: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (offset, vectors)


def split(ids: list[int], patterns: list[tuple[tuple[int, ...], torch.Tensor]],
          max_chunks: int, comma: int | None = None, backtrack: int = 0) -> list[Chunk]:
    """Prompt token ids -> chunks; `patterns` are (name ids, vectors) of embeddings, longest
    first. Where an embedding's name appears, placeholder ids stand in for its vectors."""
    chunks: list[Chunk] = []
    current = Chunk()
    last_comma = -1

    def close() -> None:
        nonlocal current, last_comma
        chunks.append(current)
        current, last_comma = Chunk(), -1

    def has_next() -> bool:
        return len(chunks) + 1 < max_chunks

    i = 0
    while i < len(ids):
        match = next(((p, v) for p, v in patterns if p and tuple(ids[i:i + len(p)]) == p), None)
        if match is None:
            if ids[i] == comma:
                last_comma = len(current.tokens)
            elif (backtrack and len(current.tokens) == CHUNK and last_comma >= 0
                  and CHUNK - last_comma <= backtrack and has_next()):
                carried = _split_after(current, last_comma + 1)
                close()
                current = carried
            if len(current.tokens) == CHUNK:
                if not has_next():
                    break
                close()
            current.tokens.append(ids[i])
            i += 1
            continue
        pattern, vectors = match
        n = vectors.shape[0]
        if len(current.tokens) + n > CHUNK:
            if has_next() and n <= CHUNK:
                close()
            else:
                n = CHUNK - len(current.tokens)  # the last chunk keeps what fits
        if n <= 0:
            break
        current.splices.append((len(current.tokens), vectors[:n]))
        current.tokens.extend([ids[i]] * n)
        i += len(pattern)
    if current.tokens or not chunks:
        chunks.append(current)
    return chunks


def _split_after(chunk: Chunk, cut: int) -> Chunk:
    """Cut `chunk` at `cut`, returning what follows (A1111 moves text after a comma on)."""
    carried = Chunk(chunk.tokens[cut:], [(o - cut, v) for o, v in chunk.splices if o >= cut])
    chunk.tokens = chunk.tokens[:cut]
    chunk.splices = [(o, v) for o, v in chunk.splices if o < cut]
    return carried


def wrap(chunk: Chunk, bos: int, eos: int, pad: int) -> list[int]:
    """The chunk's CHUNK + 2 ids: BOS, tokens, EOS, then padding."""
    ids = [bos] + chunk.tokens + [eos]
    return ids + [pad] * (CHUNK + 2 - len(ids))


def join(hidden: torch.Tensor, style: str) -> torch.Tensor:
    """[batch, chunks, 77, dim] encoded chunks -> [batch, positions, dim] conditioning."""
    batch, count, length, width = hidden.shape
    if style == "a1111" or count == 1:
        return hidden.reshape(batch, count * length, width)
    if style != "kohya":
        raise ValueError(f"unknown chunk style {style!r}; known: {', '.join(STYLES)}")
    inner = hidden[:, :, 1:length - 1].reshape(batch, count * (length - 2), width)
    return torch.cat([hidden[:, 0, :1], inner, hidden[:, -1, -1:]], dim=1)


def positions(max_token_length: int, style: str) -> int:
    """Context length for a full-length prompt (the U-Net's cross-attention sequence)."""
    count = max_token_length // CHUNK
    return count * (CHUNK + 2) if style == "a1111" else max_token_length + 2
