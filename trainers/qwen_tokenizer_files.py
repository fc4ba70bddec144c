"""A small Qwen3-style tokenizer folder (Z-Image's tokenizer) built offline: byte-level BPE
learnt from a fixed word list, Qwen's special tokens, its pre-tokenizer split and a chat
template that renders a user turn as Qwen3's does, so `AutoTokenizer.from_pretrained(folder)`
loads it and ZImagePipeline's `apply_chat_template(..., enable_thinking=True)` works."""
from __future__ import annotations

import json
from pathlib import Path

# Qwen2/Qwen3's pre-tokenizer pattern (tokenizer.json of Qwen/Qwen3-4B)
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# What Qwen3's template gives for plain user/assistant/system turns; with enable_thinking
# false the generation prompt gets the empty think block, as Qwen3's does.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}")


def write_qwen_tokenizer(folder: Path, vocab_size: int = 600,
                         model_max_length: int = 131072, extra_text: str = "") -> Path:
    """tokenizer.json, tokenizer_config.json (Qwen2Tokenizer, the chat template),
    vocab.json and merges.txt; the same bytes on every run. Ids: the 256 byte symbols and
    the learnt merges, then the special tokens (<|endoftext|> pads, as in Qwen3).
    `extra_text` is learnt too, often enough that each of its words becomes one token (a
    pipeline's fixed prompt template then has as many tokens as with the real tokenizer)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from trainers.tokenizer_files import T5_WORDS

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    corpus = [" ".join(T5_WORDS[i:i + 12]) for i in range(0, len(T5_WORDS), 12)]
    corpus += [extra_text] * (8 if extra_text else 0)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.add_special_tokens(SPECIAL)
    folder.mkdir(parents=True, exist_ok=True)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_max_length=model_max_length, padding_side="right")
    wrapped.save_pretrained(folder)
    state = json.loads(tokenizer.to_str())
    model = state["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False),
                                       encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                       encoding="utf-8")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update({"tokenizer_class": "Qwen2Tokenizer", "chat_template": CHAT_TEMPLATE,
                   "bos_token": None, "errors": "replace", "add_prefix_space": False,
                   "split_special_tokens": False, "clean_up_tokenization_spaces": False})
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder
