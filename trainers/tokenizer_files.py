"""Tokenizer files for tiny demo models: CLIP's (written by core/clip_vocab.py from the BPE table
of the `openai-clip` package, re-exported here) and a small T5 tokenizer (Flux's tokenizer_2)
built from a fixed word list."""
from __future__ import annotations

import json
from pathlib import Path

from core.clip_vocab import N_MERGES, write_clip_tokenizer  # noqa: F401 (importable from here)

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
