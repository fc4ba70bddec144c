"""Tiny vision-language models in the folder layouts the VLM captioner reads, with random weights,
built locally in a second or two: for tests and demos without a download.

`build_tiny_vlm(folder, model_type)` for each family of preprocess.captioners.vlm:

- florence2: Florence2ForConditionalGeneration (a one-stage DaViT, a one-layer BART) with its
  Florence2Processor (CLIP image processor, a tokenizer with the <image> token), as
  transformers' conversion saves it;
- qwen2_5_vl / qwen3_vl: the model, the tokenizer, the Qwen2-VL image processor
  (preprocessor_config.json) and chat_template.json with Qwen's vision markers, as the Qwen repos
  ship them;
- llava: JoyCaption's shape, a SigLIP vision tower and a Llama text model, with a LlavaProcessor
  and a chat template that takes plain-text turns and inserts <image> in the first user turn.

Tokenizers are byte-level BPE learnt from a short word list, with each family's special tokens."""
from __future__ import annotations

import json
from pathlib import Path

WORDS = ("a the photo picture of cat dog man woman girl sitting standing on in with red blue "
         "green white black sky grass tree house car table room street water small large two "
         "people looking at and describe this image detail write descriptive caption for "
         "formal tone what is shown").split()

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

LLAMA_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>", "<image>"]
JOYCAPTION_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(seen=false) %}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['role'] == 'user' and not ns.seen %}<image>{% set ns.seen = true %}{% endif %}"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

FLORENCE_SPECIAL = ["<s>", "<pad>", "</s>", "<unk>", "<image>"]

MODEL_TYPES = ("florence2", "qwen2_5_vl", "qwen3_vl", "llava")


def _bpe(special: list[str], vocab_size: int = 360):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=special)
    tokenizer.train_from_iterator([" ".join(WORDS)] * 4, trainer=trainer)
    return tokenizer


def _lively(model):
    """Weights of unit gain (std 1/sqrt(fan-in)) instead of the 0.02 initialisation, so the
    tiny model's greedy output depends on the image and the whole prompt."""
    import torch
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim >= 2:
                parameter.normal_(0.0, parameter.shape[-1] ** -0.5)
    return model.eval()


def _text_config(vocab: int, ids: dict, bos: str, eos: str, pad: str, **extra) -> dict:
    return dict(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=ids[bos], eos_token_id=ids[eos], pad_token_id=ids[pad], **extra)


def _florence(folder: Path) -> None:
    from transformers import (CLIPImageProcessor, Florence2Config,
                              Florence2ForConditionalGeneration, Florence2Processor,
                              PreTrainedTokenizerFast)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(FLORENCE_SPECIAL), bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in FLORENCE_SPECIAL}
    text = dict(model_type="bart", vocab_size=len(tokenizer), max_position_embeddings=128,
                encoder_layers=1, encoder_ffn_dim=64, encoder_attention_heads=2,
                decoder_layers=1, decoder_ffn_dim=64, decoder_attention_heads=2, d_model=32,
                bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
                decoder_start_token_id=ids["</s>"])
    vision = dict(depths=[1], patch_size=[7], patch_stride=[4], patch_padding=[3],
                  patch_prenorm=[False], embed_dim=[32], num_heads=[2], num_groups=[2],
                  window_size=4, projection_dim=32, drop_path_rate=0.0)
    model = Florence2ForConditionalGeneration(Florence2Config(
        text_config=text, vision_config=vision, image_token_id=ids["<image>"]))
    image_processor = CLIPImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False)
    image_processor.image_seq_length = (32 // 4) ** 2 + 1  # the 8x8 grid and the pooled token
    _lively(model).save_pretrained(folder)
    Florence2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def _qwen(folder: Path, model_type: str) -> None:
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig,
                              Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen3VLConfig, Qwen3VLForConditionalGeneration)

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_bpe(QWEN_SPECIAL), eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    markers = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"],
                   vision_end_token_id=ids["<|vision_end|>"])
    vision = dict(depth=2, hidden_size=32, intermediate_size=32, out_hidden_size=32, num_heads=4,
                  spatial_merge_size=2, temporal_patch_size=2)
    ends = ("<|endoftext|>", "<|im_end|>", "<|endoftext|>")
    if model_type == "qwen2_5_vl":
        patch = 14
        text = _text_config(len(tokenizer), ids, *ends,
                            rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]})
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=text, vision_config=dict(vision, patch_size=patch, window_size=28,
                                                 fullatt_block_indexes=[1]), **markers))
    else:
        patch = 16
        text = _text_config(len(tokenizer), ids, *ends, head_dim=8,
                            rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1],
                                          "mrope_interleaved": True})
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(
            text_config=text, vision_config=dict(vision, patch_size=patch,
                                                 num_position_embeddings=16,
                                                 deepstack_visual_indexes=[1]), **markers))
    side = 2 * patch  # one merged patch; images come out 2..3 merged patches a side
    image_processor = Qwen2VLImageProcessor(min_pixels=side * side * 2, max_pixels=side * side * 6,
                                            patch_size=patch, merge_size=2, temporal_patch_size=2)
    _lively(model).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_TEMPLATE}),
                                               encoding="utf-8")


def _llava(folder: Path) -> None:
    from transformers import (LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                              PreTrainedTokenizerFast, SiglipImageProcessor)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(LLAMA_SPECIAL), bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in LLAMA_SPECIAL}
    text = _text_config(len(tokenizer), ids, "<|begin_of_text|>", "<|eot_id|>",
                        "<|finetune_right_pad_id|>", model_type="llama")
    vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                  num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    model = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=ids["<image>"],
        vision_feature_select_strategy="full", vision_feature_layer=-2, image_seq_length=16,
        projector_hidden_act="gelu"))
    processor = LlavaProcessor(image_processor=SiglipImageProcessor(size={"height": 32,
                                                                          "width": 32}),
                               tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="full",
                               chat_template=JOYCAPTION_TEMPLATE)
    _lively(model).save_pretrained(folder)
    processor.save_pretrained(folder)


def build_tiny_vlm(folder: Path, model_type: str, seed: int = 0) -> Path:
    import torch

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type: one of {', '.join(MODEL_TYPES)}, not {model_type!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if model_type == "florence2":
        _florence(folder)
    elif model_type == "llava":
        _llava(folder)
    else:
        _qwen(folder, model_type)
    return folder
