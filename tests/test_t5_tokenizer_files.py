"""write_t5_tokenizer: Flux's T5 tokenizer folder (tokenizer_2) built offline."""
from __future__ import annotations

import json
import string

import pytest
from transformers import AutoTokenizer, T5TokenizerFast

from trainers.tokenizer_files import write_t5_tokenizer

CAPTION = "a photo of a dog, sitting on grass"


def test_loads_offline_with_t5_special_ids_and_asked_size(tmp_path):
    folder = write_t5_tokenizer(tmp_path / "tokenizer_2")
    assert folder == tmp_path / "tokenizer_2"
    assert sorted(p.name for p in folder.iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    tok = T5TokenizerFast.from_pretrained(folder)
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<pad>", "</s>", "<unk>")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) == 1000
    assert tok.model_max_length == 512
    assert isinstance(AutoTokenizer.from_pretrained(folder), T5TokenizerFast)
    assert len(T5TokenizerFast.from_pretrained(write_t5_tokenizer(tmp_path / "small", 300))) == 300


def test_vocab_size_out_of_range_is_refused(tmp_path):
    for size in (10, 100_000):
        with pytest.raises(ValueError, match="vocab_size"):
            write_t5_tokenizer(tmp_path / "t", size)


def test_caption_encodes_with_eos_and_no_unk_and_decodes_back(tmp_path):
    tok = T5TokenizerFast.from_pretrained(write_t5_tokenizer(tmp_path / "t"))
    ids = tok(CAPTION).input_ids
    assert ids[-1] == 1 and ids.count(1) == 1
    assert 2 not in ids
    assert tok.convert_ids_to_tokens(ids)[:2] == ["▁a", "▁photo"]
    assert tok.decode(ids, skip_special_tokens=True) == CAPTION
    # any printable ASCII text avoids <unk>; extra spaces collapse as in SentencePiece
    text = string.printable.strip().replace(" ", "")
    assert 2 not in tok(f"{text}  Zebra   42").input_ids
    assert tok.decode(tok("A  big   Zebra").input_ids, skip_special_tokens=True) == "A big Zebra"


def test_pads_to_max_length_as_flux_pipeline_calls_it(tmp_path):
    tok = T5TokenizerFast.from_pretrained(write_t5_tokenizer(tmp_path / "t"))
    out = tok(["a cat"], padding="max_length", max_length=16, truncation=True,
              return_length=False, return_overflowing_tokens=False, return_tensors="pt")
    ids = out.input_ids
    assert list(ids.shape) == [1, 16]
    n = int(out.attention_mask.sum())
    assert ids[0, n - 1] == 1 and (ids[0, n:] == 0).all()
    long = tok([" ".join(["dog"] * 40)], padding="max_length", max_length=16, truncation=True,
               return_tensors="pt").input_ids
    assert list(long.shape) == [1, 16] and long[0, -1] == 1


def test_two_writes_are_byte_identical(tmp_path):
    first, second = write_t5_tokenizer(tmp_path / "a"), write_t5_tokenizer(tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_existing_folder_gets_its_files_rewritten_and_keeps_others(tmp_path):
    # as write_clip_tokenizer: parents made, own files replaced, other files left alone
    folder = tmp_path / "deep" / "tokenizer_2"
    folder.mkdir(parents=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Stale"}))
    (folder / "notes.txt").write_text("keep me")
    write_t5_tokenizer(folder)
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] \
        == "T5Tokenizer"
    assert (folder / "notes.txt").read_text() == "keep me"
    reference = write_t5_tokenizer(tmp_path / "fresh")
    assert (folder / "tokenizer.json").read_bytes() == (reference / "tokenizer.json").read_bytes()
    assert len(T5TokenizerFast.from_pretrained(write_t5_tokenizer(folder, 500))) == 500
