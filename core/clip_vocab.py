"""CLIP's tokenizer files (vocab.json, merges.txt and configs) written from the BPE table that
ships inside the `openai-clip` package, so a real SD tokenizer exists without a model download:
for tiny demo models (trainers/) and for counting caption tokens (preprocess/dataset_check.py)."""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

N_MERGES = 49152 - 256 - 2


def _bpe_table() -> Path:
    # locate the file without importing `clip` (its __init__ imports torchvision)
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the 'openai-clip' package is needed for the CLIP vocabulary; "
                           "pip install openai-clip")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP use for raw bytes, in byte order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    extra = 0
    mapping = {}
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    ordered = printable + [b for b in range(256) if b not in printable]
    return [mapping[b] for b in ordered]


def write_clip_tokenizer(folder: Path, pad_token: str | None = None) -> Path:
    """vocab.json, merges.txt and the tokenizer configs; `pad_token` "!" for SD2's and SDXL's
    second (OpenCLIP) tokenizer, else the end token pads as in SD1."""
    pad = pad_token or "<|endoftext|>"
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(_bpe_table(), "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:N_MERGES + 1]
    alphabet = _byte_alphabet()
    tokens = alphabet + [a + "</w>" for a in alphabet]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)},
                                                  ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                       encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": pad, "unk_token": "<|endoftext|>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": pad, "unk_token": "<|endoftext|>",
        "do_lower_case": True, "clean_up_tokenization_spaces": True}))
    return folder
