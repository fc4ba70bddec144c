"""Write CLIP's tokenizer files (vocab.json, merges.txt) from the BPE table that ships inside
the `openai-clip` package, so a real SD tokenizer exists without a model download; and a
small T5 tokenizer (Flux's tokenizer_2) built from a fixed word list."""
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


# Flux's T5 tokenizer (tokenizer_2) is built here from this word list rather than downloaded:
# common English and caption words, most common first.
T5_WORDS = """
a the of and in on with to is at for by an it its from this that as are be or his her their
photo picture image painting drawing illustration portrait close up view shot render art style
man woman person people boy girl child children baby men women family friend group crowd face
head hair eyes eye nose mouth hand hands arm arms leg legs body smile smiling looking standing
sitting walking running playing holding wearing lying jumping eating riding flying swimming
dog dogs cat cats bird birds horse cow sheep fish bear animal animals pet puppy kitten duck
tree trees flower flowers grass plant leaves forest garden park field mountain mountains hill
river lake sea ocean beach water sand snow rain sky cloud clouds sun moon star stars light
city street road building house room window door wall floor table chair bed car bus train
boat bike plane truck bridge tower church shop market kitchen food plate cup glass bottle
book phone computer clock bag hat shirt dress shoes coat jacket ball toy game sign
red blue green yellow white black brown gray grey orange pink purple gold silver dark bright
big small large little old new young tall long short round square happy sad beautiful pretty
cute night day morning evening sunset sunrise summer winter autumn spring background front
top bottom side left right next near under over behind inside outside between two three one
some many other each very high low open closed empty full wooden metal stone paper
detailed realistic photograph camera lens sharp focus soft blur landscape scene
into out down back around through across against along while there here
has have had was were not but all can will just like see seen made make few more most
""".split()


def _t5_pieces(vocab_size: int) -> list[tuple[str, float]]:
    """T5's special tokens at ids 0-2, then `vocab_size - 3` SentencePiece-style pieces with
    log-probability-like scores: ▁, the words, their most common sub-word parts, then every
    printable ASCII character so nothing ordinary becomes <unk>."""
    import string
    whole = ["▁" + w for w in T5_WORDS]
    counts: dict[str, int] = {}
    for piece in whole:
        for start in range(len(piece)):
            for end in range(start + 2, len(piece) + 1):
                counts[piece[start:end]] = counts.get(piece[start:end], 0) + 1
    taken = set(whole)
    parts = sorted((p for p in counts if p not in taken),
                   key=lambda p: (-counts[p] * (len(p) - 1), p))
    chars = list(string.ascii_lowercase + string.ascii_uppercase + string.digits
                 + string.punctuation)
    fill = whole + parts
    smallest, largest = 3 + 1 + len(chars), 3 + 1 + len(fill) + len(chars)
    if not smallest <= vocab_size <= largest:
        raise ValueError(f"T5 tokenizer vocab_size {vocab_size}: choose {smallest} to {largest}")
    regular = ["▁"] + fill[:vocab_size - smallest] + chars
    # scores all within (-2, -3]: the segmentation with the fewest pieces always wins, ties go
    # to the earlier (more common) pieces
    scores = [(p, -2.0 - i / len(regular)) for i, p in enumerate(regular)]
    return [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + scores


def write_t5_tokenizer(folder: Path, vocab_size: int = 1000) -> Path:
    """A Unigram T5 tokenizer (Flux's tokenizer_2) of `vocab_size` pieces: tokenizer.json,
    tokenizer_config.json and special_tokens_map.json, loadable as T5TokenizerFast; the same
    bytes on every run. Like write_clip_tokenizer, an existing folder gets these files
    rewritten and keeps any others."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    tokenizer = Tokenizer(models.Unigram(_t5_pieces(vocab_size), unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFKC()
    # WhitespaceSplit first collapses runs of spaces as SentencePiece does
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>",
                    pad_token="<pad>", extra_ids=0, model_max_length=512).save_pretrained(folder)
    # transformers 5 no longer writes this file; the real tokenizer_2 folder has it
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}))
    return folder
