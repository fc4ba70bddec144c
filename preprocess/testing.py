"""Tiny captioner models in the real file layouts, with random (or chosen) weights, built
locally in a second: for tests, demos and benchmarks without a download.

- `build_tiny_deepbooru(file, tags)`: a state dict with the real `n_Conv_*` keys, small channel
  counts and a 'tags' list, saved with torch.save like model-resnet_custom_v3.pt.
- `build_tiny_wd14(folder, table)`: model.onnx (input `input_1:0` N x S x S x 3 BGR, output
  `predictions_sigmoid` N x tags, like the v2 models; `v3=True` names them `input` / `output`
  with a `batch_size` axis, as the v3 exports) and selected_tags.csv. The graph takes the
  per-channel mean of the image and applies one linear layer and a sigmoid, so tests can choose
  weights that react to colours (zero weights and bias logit(p) give probability p).
- `build_tiny_blip(folder)`: a BlipForConditionalGeneration with a few-word BERT vocabulary,
  saved with save_pretrained together with its tokenizer."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

BLIP_WORDS = ("a picture of the cat dog man woman girl boy sitting standing on in with red blue "
              "green white black sky grass tree house car table chair room street water "
              "photo small large two people holding looking at next to and his her").split()


def build_tiny_deepbooru(file: Path, tags: Sequence[str], width: int = 4, seed: int = 0,
                         positive: Sequence[str] = (), negative: Sequence[str] = ()) -> Path:
    """Save a random DeepDanbooru state dict. Tags in `positive` get head weights of +1 and
    those in `negative` -1 (features after the last ReLU are >= 0, so they score >= 0.5 and
    <= 0.5); the others keep random weights."""
    import torch
    from preprocess.captioners.deepbooru_model import DeepDanbooruModel

    torch.manual_seed(seed)
    model = DeepDanbooruModel(n_tags=len(tags), width=width)
    head = model.n_Conv_178.weight.data
    for i, tag in enumerate(tags):
        if tag in positive:
            head[i] = 1.0
        elif tag in negative:
            head[i] = -1.0
    state = dict(model.state_dict())
    state["tags"] = list(tags)
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, file)
    return file


def build_tiny_wd14(folder: Path, table: Sequence[tuple[str, str, Sequence[float], float]],
                    size: int = 32, opset: int = 13, v3: bool = False) -> Path:
    """table rows: (name, category, (w_b, w_g, w_r), bias); probability of a tag =
    sigmoid(w . mean_bgr + bias) with the channel means in 0..255."""
    name_in, name_out, batch = ("input", "output", "batch_size") if v3 else \
        ("input_1:0", "predictions_sigmoid", "N")
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = np.array([row[2] for row in table], dtype=np.float32).T  # 3 x T
    bias = np.array([row[3] for row in table], dtype=np.float32)
    n = len(table)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", [name_in], ["mean"], axes=[1, 2], keepdims=0),
         helper.make_node("MatMul", ["mean", "W"], ["logits0"]),
         helper.make_node("Add", ["logits0", "B"], ["logits"]),
         helper.make_node("Sigmoid", ["logits"], [name_out])],
        "tiny_wd14",
        [helper.make_tensor_value_info(name_in, TensorProto.FLOAT, [batch, size, size, 3])],
        [helper.make_tensor_value_info(name_out, TensorProto.FLOAT, [batch, n])],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    with open(folder / "selected_tags.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i, (name, category, _, _) in enumerate(table):
            writer.writerow([1000 + i, name, category, 100 - i])
    return folder


def build_tiny_blip(folder: Path, seed: int = 0, image_size: int = 32) -> Path:
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration,
                              BlipTextConfig, BlipVisionConfig)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = {token: i for i, token in enumerate(specials + list(dict.fromkeys(BLIP_WORDS)))}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]")
    tokenizer.model_max_length = 64
    tokenizer.save_pretrained(folder)

    torch.manual_seed(seed)
    text = BlipTextConfig(vocab_size=len(vocab), hidden_size=32, encoder_hidden_size=32,
                          intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                          max_position_embeddings=64, bos_token_id=vocab["[DEC]"],
                          pad_token_id=vocab["[PAD]"], sep_token_id=vocab["[SEP]"],
                          eos_token_id=vocab["[SEP]"])
    vision = BlipVisionConfig(image_size=image_size, patch_size=8, hidden_size=32,
                              intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    config = BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                        projection_dim=32, image_text_hidden_size=32)
    model = BlipForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    return folder
