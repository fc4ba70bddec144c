import torch

from trainers.models import load_model
from trainers.prompts import PromptEncoder


def test_embedding_vectors_are_spliced_where_the_name_appears(data_paths):
    model = load_model(data_paths, "tiny-demo")
    vectors = torch.randn(3, model.text_encoder.config.hidden_size)
    encoder = PromptEncoder(model.tokenizer, model.text_encoder, {"zxqtok": vectors})
    ids, splices = encoder.tokenize("a photo of zxqtok dog")
    assert len(ids) == 77 and ids[0] == model.tokenizer.bos_token_id
    assert [(pos, v.shape[0]) for pos, v in splices] == [(4, 3)]
    # 'a photo of' + 3 vectors + 'dog' + EOS
    assert ids[7] == model.tokenizer("dog", add_special_tokens=False).input_ids[0]
    assert ids[8] == model.tokenizer.eos_token_id

    captured = {}
    handle = model.text_encoder.get_input_embeddings().register_forward_hook(
        lambda m, i, o: captured.setdefault("out", o))
    try:
        plain = PromptEncoder(model.tokenizer, model.text_encoder).encode(["a photo of zxqtok dog"])
    finally:
        handle.remove()
    spliced = encoder.encode(["a photo of zxqtok dog"])
    assert not torch.allclose(plain, spliced)
    assert torch.allclose(plain[:, :4], spliced[:, :4])  # causal: tokens before the splice agree


def test_gradient_reaches_only_the_vectors(data_paths):
    model = load_model(data_paths, "tiny-demo")
    vectors = torch.nn.Parameter(torch.randn(2, model.text_encoder.config.hidden_size))
    encoder = PromptEncoder(model.tokenizer, model.text_encoder, {"zxqtok": vectors})
    encoder.encode(["zxqtok"]).sum().backward()
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.text_encoder.parameters())


def test_long_prompts_are_truncated_to_the_context(data_paths):
    model = load_model(data_paths, "tiny-demo")
    encoder = PromptEncoder(model.tokenizer, model.text_encoder, {"zxqtok": torch.zeros(5, 32)})
    ids, splices = encoder.tokenize("word " * 73 + "zxqtok")
    assert len(ids) == 77 and ids[-1] == model.tokenizer.eos_token_id
    assert splices and splices[0][1].shape[0] == 2  # only the room left


def test_clip_skip_uses_an_earlier_layer_through_the_final_norm(data_paths):
    model = load_model(data_paths, "tiny-demo")
    last = PromptEncoder(model.tokenizer, model.text_encoder).encode(["a dog"])
    skip = PromptEncoder(model.tokenizer, model.text_encoder, clip_skip=2).encode(["a dog"])
    out = model.text_encoder(model.tokenizer(["a dog"], padding="max_length", max_length=77,
                                             return_tensors="pt").input_ids, output_hidden_states=True)
    assert torch.allclose(last, out.last_hidden_state, atol=1e-6)
    assert torch.allclose(skip, model.text_encoder.final_layer_norm(out.hidden_states[-2]), atol=1e-6)
    assert not torch.allclose(last, skip)
