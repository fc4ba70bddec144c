"""Embedding files: round trips, the layouts other programs write, and diffusers loading ours."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from trainers.formats.embedding import (EmbeddingFile, EmbeddingFormatError, embedding_checksum,
                                        load_embedding, save_embedding)
from trainers.formats.optim_sidecar import load_optim, optim_path, save_optim
from trainers.formats.safe_load import safe_torch_load
from tests.test_safe_load import a1111_style_check


def sd1(n: int = 3, dim: int = 768, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def sdxl(n: int = 2) -> dict[str, torch.Tensor]:
    return {"clip_l": sd1(n, 768, 1), "clip_g": sd1(n, 1280, 2)}


def full_embedding(vectors) -> EmbeddingFile:
    return EmbeddingFile(name="my-cat", vectors=vectors, step=1234, sd_checkpoint="a1b2c3d4e5",
                         sd_checkpoint_name="v1-5-pruned")


def assert_same_vectors(actual, expected):
    if isinstance(expected, dict):
        assert set(actual) == {"clip_l", "clip_g"}
        for key in expected:
            assert actual[key].dtype == torch.float32 and actual[key].dim() == 2
            assert torch.equal(actual[key], expected[key])
    else:
        assert actual.dtype == torch.float32 and actual.dim() == 2
        assert torch.equal(actual, expected)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".bin"])
def test_sd1_round_trip_keeps_values_name_step_and_checkpoint(tmp_path, suffix):
    emb = full_embedding(sd1())
    path = tmp_path / f"file-stem{suffix}"
    save_embedding(path, emb)
    loaded = load_embedding(path)
    assert_same_vectors(loaded.vectors, emb.vectors)
    assert (loaded.name, loaded.step) == ("my-cat", 1234)
    assert (loaded.sd_checkpoint, loaded.sd_checkpoint_name) == ("a1b2c3d4e5", "v1-5-pruned")


def test_sdxl_round_trip(tmp_path):
    emb = full_embedding(sdxl())
    save_embedding(tmp_path / "xl.safetensors", emb)
    loaded = load_embedding(tmp_path / "xl.safetensors")
    assert_same_vectors(loaded.vectors, emb.vectors)
    assert (loaded.name, loaded.step, loaded.sd_checkpoint) == ("my-cat", 1234, "a1b2c3d4e5")
    with safetensors.safe_open(tmp_path / "xl.safetensors", "pt") as handle:
        assert set(handle.keys()) == {"clip_l", "clip_g"}

    # A1111 turns every entry of an SDXL dict into a tensor: the .pt holds only the pair.
    save_embedding(tmp_path / "xl.pt", emb)
    raw = torch.load(tmp_path / "xl.pt", weights_only=True)
    assert set(raw) == {"clip_l", "clip_g"}
    loaded = load_embedding(tmp_path / "xl.pt")
    assert_same_vectors(loaded.vectors, emb.vectors)
    assert loaded.name == "xl" and loaded.step is None


def test_pt_is_the_a1111_dict_in_legacy_format(tmp_path):
    path = tmp_path / "a.pt"
    save_embedding(path, full_embedding(sd1(2)))
    assert not zipfile.is_zipfile(path)
    data = path.read_bytes()
    assert b".format_version" not in data and b".storage_alignment" not in data
    raw = torch.load(path, weights_only=True)
    assert raw["string_to_token"] == {"*": 265}
    assert set(raw) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint",
                        "sd_checkpoint_name"}
    tensor = raw["string_to_param"]["*"]
    assert tensor.shape == (2, 768) and tensor.dtype == torch.float32
    assert tensor.device.type == "cpu" and not tensor.requires_grad
    a1111_style_check(path)


def test_safetensors_is_kohya_emb_params_with_string_metadata(tmp_path):
    path = tmp_path / "k.safetensors"
    save_embedding(path, EmbeddingFile(name="k", vectors=sd1(4), step=None))
    with safetensors.safe_open(path, "pt") as handle:
        assert list(handle.keys()) == ["emb_params"]
        assert handle.get_tensor("emb_params").shape == (4, 768)
        assert handle.metadata() == {"name": "k"}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_vectors_are_always_stored_2d_float32(tmp_path, suffix):
    one_d = torch.randn(768, dtype=torch.float16)
    path = tmp_path / f"v{suffix}"
    save_embedding(path, EmbeddingFile(name="v", vectors=torch.nn.Parameter(one_d.clone())))
    raw = safe_torch_load(path)["string_to_param"]["*"] if suffix == ".pt" else \
        safetensors.torch.load_file(path)["emb_params"]
    assert raw.shape == (1, 768) and raw.dtype == torch.float32
    assert torch.equal(raw[0], one_d.float())


def test_reads_layouts_written_by_other_programs(tmp_path):
    vec = sd1(2)
    # diffusers' learned_embeds.bin: one token -> a 1-D tensor
    torch.save({"<cat-toy>": vec[0]}, tmp_path / "learned_embeds.bin")
    loaded = load_embedding(tmp_path / "learned_embeds.bin")
    assert loaded.vectors.shape == (1, 768) and loaded.name == "learned_embeds"
    # diffusers single-key safetensors, kohya .pt
    safetensors.torch.save_file({"<tok>": vec}, tmp_path / "single.safetensors")
    assert_same_vectors(load_embedding(tmp_path / "single.safetensors").vectors, vec)
    torch.save({"emb_params": vec.half()}, tmp_path / "kohya.pt")
    assert_same_vectors(load_embedding(tmp_path / "kohya.pt").vectors, vec.half().float())
    # A1111 itself saves with a plain torch.save (zip format), the step as an int, no hash
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "a1",
                "step": 99, "sd_checkpoint": None, "sd_checkpoint_name": None},
               tmp_path / "a1111.pt")
    loaded = load_embedding(tmp_path / "a1111.pt")
    assert (loaded.name, loaded.step, loaded.sd_checkpoint) == ("a1", 99, None)
    assert_same_vectors(loaded.vectors, vec)


def test_unreadable_files_name_the_file(tmp_path):
    rng = np.random.default_rng(1)
    for name in ["noise.pt", "noise.safetensors"]:
        (tmp_path / name).write_bytes(rng.integers(0, 256, 999, dtype=np.uint8).tobytes())
    torch.save({"model": {"weight": torch.ones(2)}, "epoch": 3}, tmp_path / "unrelated.pt")
    torch.save({"string_to_param": {"*": sd1(), "+": sd1()}}, tmp_path / "two_terms.pt")
    torch.save({"emb_params": torch.ones(1, 2, 3)}, tmp_path / "three_d.pt")
    (tmp_path / "notes.txt").write_text("hello")
    expected = {"noise.pt": "not a readable PyTorch file",
                "noise.safetensors": "not a readable safetensors file",
                "unrelated.pt": "'model', 'epoch'", "two_terms.pt": "exactly one tensor",
                "three_d.pt": "[1, 2, 3]", "notes.txt": "unknown embedding suffix"}
    for name, detail in expected.items():
        with pytest.raises(EmbeddingFormatError) as caught:
            load_embedding(tmp_path / name)
        assert name in str(caught.value) and detail in str(caught.value)
    with pytest.raises(EmbeddingFormatError, match="no such file"):
        load_embedding(tmp_path / "missing.pt")


def test_save_refuses_unknown_suffixes_and_mismatched_sdxl(tmp_path):
    with pytest.raises(ValueError, match="unknown embedding suffix"):
        save_embedding(tmp_path / "x.ckpt", EmbeddingFile("x", sd1()))
    bad = {"clip_l": sd1(2, 768), "clip_g": sd1(3, 1280)}
    with pytest.raises(EmbeddingFormatError, match="clip_l has 2 vectors but clip_g has 3"):
        save_embedding(tmp_path / "x.safetensors", EmbeddingFile("x", bad))
    assert list(tmp_path.iterdir()) == []


def test_checksum_is_a1111s_short_hash():
    vectors = torch.tensor([[0.015, -0.027, 0.5], [1.25, -0.004, 0.3]])
    # A1111: r = (r * 281 ^ int(v) * 997) & 0xFFFFFFFF over vec * 100, shown as 4 hex digits
    assert embedding_checksum(vectors) == "e0a6"
    assert embedding_checksum(vectors.double()) == "e0a6"
    changed = vectors.clone()
    changed[1, 0] += 0.05
    assert embedding_checksum(changed) != "e0a6"
    xl = sdxl()
    assert embedding_checksum(xl) != embedding_checksum({"clip_l": xl["clip_l"],
                                                         "clip_g": xl["clip_g"] * 2})


def test_optim_sidecar_resumes_only_with_the_matching_file(tmp_path):
    vec = torch.nn.Parameter(sd1(2))
    optimizer = torch.optim.AdamW([vec], lr=0.01)
    vec.sum().backward()
    optimizer.step()
    file = tmp_path / "cat.pt"
    save_embedding(file, EmbeddingFile("cat", vec.detach()))
    checksum = embedding_checksum(vec.detach())
    target = save_optim(file, checksum, "AdamW", optimizer.state_dict(), extra={"seed": 5})
    assert target == optim_path(file) == tmp_path / "cat.pt.optim"
    assert not zipfile.is_zipfile(target)
    a1111_style_check(target)

    payload, reason = load_optim(file, checksum)
    assert payload is not None and "AdamW" in reason
    assert payload["hash"] == checksum and payload["danlu"] == {"seed": 5}
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2, 768))], lr=0.01)
    fresh.load_state_dict(payload["optimizer_state_dict"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"],
                       optimizer.state_dict()["state"][0]["exp_avg"])

    payload, reason = load_optim(file, "ffff" if checksum != "ffff" else "0000")
    assert payload is None and "different version" in reason and "cat.pt" in reason
    payload, reason = load_optim(tmp_path / "dog.pt", checksum)
    assert payload is None and "dog.pt.optim not found" in reason
    target.write_bytes(b"garbage")
    payload, reason = load_optim(file, checksum)
    assert payload is None and "unreadable" in reason
    with pytest.raises(TypeError, match="numpy"):
        save_optim(file, checksum, "AdamW", {"state": {}, "lr": np.float64(1.0)})
    assert target.read_bytes() == b"garbage"


@pytest.fixture
def tiny_pipe(tiny_model_dir):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt: str) -> np.ndarray:
    return pipe(prompt, height=64, width=64, num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_diffusers_load_textual_inversion_reads_our_files(tmp_path, tiny_pipe, suffix):
    vectors = sd1(2, 32, seed=3)
    path = tmp_path / f"mine{suffix}"
    save_embedding(path, EmbeddingFile(name="mine", vectors=vectors, step=10))
    before = generate(tiny_pipe, "a photo of <x>")

    tiny_pipe.load_textual_inversion(str(path), token="<x>")

    rows = tiny_pipe.text_encoder.get_input_embeddings().weight
    ids = tiny_pipe.tokenizer.convert_tokens_to_ids(["<x>", "<x>_1"])
    assert torch.equal(rows[ids].detach(), vectors)
    after = generate(tiny_pipe, "a photo of <x>")
    assert np.abs(after - before).max() > 1e-4
