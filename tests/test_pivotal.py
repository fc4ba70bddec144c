"""Pivotal tuning (#21 item 2): a new word's token vectors trained with a LoRA, bundled in the
file as A1111 reads them, written as a separate embedding, used by Compare, resumed exactly."""
from __future__ import annotations

import numpy as np
import pytest
import safetensors
import torch

from core.config import ConfigError
from tests.conftest import RecordingContext, kohya_photos, repeat_with_interruption
from tests.test_lora_training import clear, lora_config
from trainers.formats.bundled_embeddings import read_bundled, split_bundle
from trainers.formats.lora import load_lora, read_lora_metadata
from trainers.loop import TrainingError
from trainers.methods.lora import run

TOKEN = "ohwx"


@pytest.fixture
def folder(tmp_path):
    root = kohya_photos(tmp_path / "train")
    for caption in root.rglob("*.txt"):  # the captions call the new word
        caption.write_text(caption.read_text().replace("zxq", TOKEN))
    return root


def pivotal(folder, **changes):
    base = dict(pivotal_tuning=True, pivotal_token=TOKEN, pivotal_vectors=2,
                pivotal_init_text="a cat", pivotal_lr=5e-2)
    return lora_config(folder, **{**base, **changes})


def a1111_bundles(path) -> dict:
    """The embeddings A1111's Lora extension builds from a file's keys: a key whose part before
    the first dot is `bundle_emb` is `bundle_emb.<name>.<vec_name>`; a vec_name starting with
    `string_to_param.` goes under data['string_to_param'][rest], any other is data[vec_name]."""
    found = {}
    with safetensors.safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            head, _, rest = key.partition(".")
            if head != "bundle_emb":
                continue
            name, vec_name = rest.split(".", 1)
            data = found.setdefault(name, {})
            if vec_name.split(".")[0] == "string_to_param":
                data["string_to_param"] = {vec_name.split(".", 1)[1]: handle.get_tensor(key)}
            else:
                data[vec_name] = handle.get_tensor(key)
    return found


def test_vectors_train_until_the_stop_step_and_ride_in_the_file_as_a1111_reads_them(
        data_paths, folder):
    from trainers.embeddings import initial_vectors
    from trainers.models import load_model
    model = load_model(data_paths, "tiny-demo")
    start = initial_vectors(model.tokenizer, model.text_encoder, "a cat", 2)
    path = run(pivotal(folder, max_train_steps=6, pivotal_stop_step=3, save_every_n_steps=1,
                       network_train_unet_only=True), RecordingContext(data_paths))
    copies = sorted(next((data_paths.outputs / "lora").glob("*/mylora")).glob("checkpoints/*"),
                    key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    files = copies + [path]
    vectors = [start] + [read_bundled(p)[TOKEN] for p in files]
    loras = [load_lora(p)[0] for p in files]
    moved = [not torch.equal(a, b) for a, b in zip(vectors, vectors[1:])]
    assert moved == [True, True, True, False, False, False]
    assert any(not torch.equal(loras[3][k], loras[5][k]) for k in loras[3])  # the LoRA goes on
    bundles = a1111_bundles(path)
    assert list(bundles) == [TOKEN]
    assert list(bundles[TOKEN]) == ["string_to_param"]
    assert list(bundles[TOKEN]["string_to_param"]) == ["*"]
    assert bundles[TOKEN]["string_to_param"]["*"].shape == (2, 32)
    assert all(k.startswith("lora_unet_") for k in load_lora(path)[0])  # the adapter alone
    meta = read_lora_metadata(path)
    assert '"ohwx": {"vectors": 2' in meta["ss_bundled_embeddings"]


def test_interrupted_and_resumed_across_the_stop_step_repeats_the_run_exactly(data_paths, folder):
    """With the text-encoder LoRA on; stopped at step 2, the vectors freeze at step 3."""
    cfg = pivotal(folder, max_train_steps=5, pivotal_stop_step=3, save_precision="fp16",
                  lr_scheduler="cosine", lr_warmup_steps=1)

    def load(path):
        return {**load_lora(path)[0], "token": read_bundled(path)[TOKEN]}
    repeat_with_interruption(run, cfg, data_paths, load=load, reset=lambda: clear(data_paths.lora))


def test_settings_and_file_that_disagree_on_the_token_are_refused(data_paths, folder):
    run(pivotal(folder, max_train_steps=1), RecordingContext(data_paths))
    with pytest.raises(TrainingError, match="pivotal_token: .*holds 'ohwx', not 'qzxv'"):
        run(pivotal(folder, max_train_steps=2, pivotal_token="qzxv"), RecordingContext(data_paths))
    with pytest.raises(TrainingError, match="pivotal_tuning: .*carries the trained token 'ohwx'"):
        run(lora_config(folder, max_train_steps=2), RecordingContext(data_paths))
    with pytest.raises(TrainingError, match="pivotal_vectors: .*\\[2, 32\\].*\\[3, 32\\]"):
        run(pivotal(folder, max_train_steps=2, pivotal_vectors=3), RecordingContext(data_paths))


def test_bad_settings_are_refused_by_name(data_paths, folder):
    from trainers import families
    cases = {"pivotal_token": dict(pivotal_token=""), "pivotal_token: 'Oh.wx'": dict(
        pivotal_token="Oh.wx"), "pivotal_vectors": dict(pivotal_vectors=0),
        "pivotal_stop_step": dict(pivotal_stop_step=-1),
        "cache_text_encoder_outputs": dict(cache_text_encoder_outputs=True)}
    for field, change in cases.items():
        with pytest.raises(ConfigError, match=field):
            pivotal(folder, **change)
    assert lora_config(folder, pivotal_token="", pivotal_vectors=2)  # off: nothing asked of it
    flux = pivotal(folder).family_problems(families.get("flux1"))
    assert any(p.startswith("pivotal_tuning:") and "flow-matching" in p for p in flux)
    assert not pivotal(folder).family_problems(families.get("sdxl"))
    with pytest.raises(TrainingError, match="pivotal_token: 'dog' is a word of the text encoder"):
        run(pivotal(folder, pivotal_token="dog"), RecordingContext(data_paths))


def test_use_this_checkpoint_writes_an_embedding_diffusers_loads_and_the_word_changes_the_image(
        data_paths, folder):
    from diffusers import StableDiffusionPipeline
    from trainers import checkpoint_use as cu
    from trainers import runs as rn
    run(pivotal(folder, max_train_steps=3), RecordingContext(data_paths))
    lora_run = next(r for r in rn.scan_runs(data_paths) if r.method == "lora")
    final = lora_run.checkpoints[-1]
    targets = cu.use_checkpoint_files(data_paths, lora_run, final, "picked", embeddings=True)
    embedding = data_paths.embeddings / f"{TOKEN}.safetensors"
    assert targets == [data_paths.lora / "picked.safetensors", embedding]
    assert torch.equal(load_file_tensor(embedding), read_bundled(final.path)[TOKEN].float())

    pipe = StableDiffusionPipeline.from_pretrained(data_paths.cache / "tiny-demo",
                                                   safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def image(prompt):
        return pipe(prompt, num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]
    before = image(f"a photo of {TOKEN}")
    pipe.load_textual_inversion(str(embedding), token=TOKEN)
    after = image(f"a photo of {TOKEN}")
    assert not np.allclose(after, before)  # the word now stands for the file's vectors
    assert not np.allclose(after, image("a photo of"))

    # never silently over an existing embedding of that name (any suffix), nor when there is none
    before = embedding.read_bytes()
    with pytest.raises(cu.CheckpointExists, match="embedding ohwx.safetensors already exists"):
        cu.use_checkpoint_files(data_paths, lora_run, final, "other", embeddings=True)
    assert not (data_paths.lora / "other.safetensors").exists()
    assert embedding.read_bytes() == before
    cu.use_checkpoint_files(data_paths, lora_run, final, "other", overwrite=True, embeddings=True)


def load_file_tensor(path):
    with safetensors.safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(next(iter(handle.keys())))


def test_diffusers_refuses_the_bundle_keys_and_loads_the_diffusers_copy_with_its_embedding(
        data_paths, folder):
    from diffusers import StableDiffusionPipeline
    path = run(pivotal(folder, max_train_steps=3, save_diffusers_format=True),
               RecordingContext(data_paths))
    pipe = StableDiffusionPipeline.from_pretrained(data_paths.cache / "tiny-demo",
                                                   safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="all LoRA param names contain"):
        pipe.load_lora_weights(str(path))  # diffusers 0.42: every key must name 'lora'
    folder_out = path.with_name("mylora-diffusers")
    base = pipe(f"{TOKEN} cat", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]
    pipe.load_lora_weights(str(folder_out))
    pipe.load_textual_inversion(str(folder_out / f"{TOKEN}.safetensors"), token=TOKEN)
    after = pipe(f"{TOKEN} cat", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert not np.allclose(base, after)


def test_compare_applies_the_bundled_vectors(data_paths, folder):
    from trainers import catalog
    from trainers.compare import CompareSpec
    from trainers.conditioning import prompt_encoder
    from trainers.models import load_model
    path = run(pivotal(folder, max_train_steps=2), RecordingContext(data_paths))
    model = load_model(data_paths, "tiny-demo")
    spec = CompareSpec(method="lora", model="tiny-demo", token="mylora",
                       checkpoints=[("final", str(path))], prompts=[f"{TOKEN} cat"], seeds=[1])
    with torch.no_grad():
        with catalog.get("lora").applier()(spec, data_paths, model, path, []) as (_, _, encoder):
            with_vectors = encoder.encode([f"{TOKEN} cat"])
            plain = prompt_encoder(model).encode([f"{TOKEN} cat"])
            same_without_word = torch.equal(encoder.encode(["a cat"]),
                                            prompt_encoder(model).encode(["a cat"]))
    assert not torch.allclose(with_vectors, plain) and same_without_word


def test_sdxl_trains_one_vector_set_per_text_encoder(family_paths, folder):
    path = run(pivotal(folder, model="tiny-demo-sdxl", max_train_steps=2,
                       network_train_unet_only=True), RecordingContext(family_paths))
    bundles = a1111_bundles(path)
    assert sorted(bundles[TOKEN]) == ["clip_g", "clip_l"]
    from trainers.models import load_model
    model = load_model(family_paths, "tiny-demo-sdxl")
    widths = [e.get_input_embeddings().weight.shape[1] for e in model.text_encoders]
    assert [bundles[TOKEN][k].shape for k in ("clip_l", "clip_g")] == [(2, w) for w in widths]
    from trainers.embeddings import initial_vectors
    start = initial_vectors(model.tokenizer_2, model.text_encoder_2, "a cat", 2)
    assert not torch.equal(bundles[TOKEN]["clip_g"].float(), start)
    adapter, bundled = split_bundle(load_lora(path)[0] | {"bundle_emb.x.clip_l": start,
                                                          "bundle_emb.x.clip_g": start})
    assert set(bundled) == {"x"} and "bundle_emb.x.clip_l" not in adapter

    # the separate file is {"clip_l", "clip_g"}; diffusers loads each half into its encoder
    from safetensors.torch import load_file
    from tests.test_sdxl import image, sdxl_pipeline
    from trainers.checkpoint_use import write_embeddings
    [written] = write_embeddings(family_paths, read_bundled(path), 2)
    halves = load_file(written)
    assert sorted(halves) == ["clip_g", "clip_l"]
    pipe = sdxl_pipeline(family_paths.cache / "tiny-demo-sdxl")
    before = image(pipe, f"a {TOKEN} cat")
    pipe.load_textual_inversion(halves["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(halves["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    assert not np.allclose(image(pipe, f"a {TOKEN} cat"), before)  # the file's vectors in use


def test_fit_my_gpu_leaves_the_text_encoder_uncached_and_the_estimate_counts_it(data_paths):
    from trainers.configs import LoraConfig
    from trainers.memory_estimate import estimate_for
    from trainers.vram_fit import card_for, fit
    sd15 = dict(model="sd15.safetensors", output_name="x", train_data_dir="d", resolution=1024,
                train_batch_size=4, network_train_unet_only=True)
    plain = LoraConfig(**sd15).validate()
    cfg = LoraConfig(**sd15, pivotal_tuning=True, pivotal_token=TOKEN).validate()
    assert estimate_for(cfg, data_paths).total > estimate_for(plain, data_paths).total
    fitted, said = fit(cfg.__class__(**{**cfg.__dict__, "network_train_unet_only": False}),
                       data_paths, card_for("16 GB (Colab T4)"))
    assert fitted.network_train_unet_only and not fitted.cache_text_encoder_outputs
    assert "its outputs are not cached" in said
    fitted.validate()


def test_resize_keeps_the_token_and_post_hoc_ema_averages_it(data_paths, folder):
    from trainers.configs import LoraEmaConfig, ResizeLoraConfig
    from trainers.lora_ema import run as ema
    from trainers.resize_lora import run as resize
    final = run(pivotal(folder, max_train_steps=4, save_every_n_steps=1, network_dim=4),
                RecordingContext(data_paths))
    resized = resize(ResizeLoraConfig(lora=final.name, output_name="small", rank=2,
                                      save_precision="fp32").validate(),
                     RecordingContext(data_paths))
    assert torch.equal(read_bundled(resized)[TOKEN], read_bundled(final)[TOKEN].float())
    assert {t.shape[0] for k, t in load_lora(resized)[0].items() if k.endswith("down.weight")} \
        == {2}
    assert a1111_bundles(resized)[TOKEN]["string_to_param"]["*"].shape == (2, 32)

    run_dir = next((data_paths.outputs / "lora").glob("*/mylora"))
    copies = sorted(run_dir.glob("checkpoints/*.safetensors"))
    averaged = ema(LoraEmaConfig(run_folder=str(run_dir.relative_to(data_paths.data_dir)),
                                 output_name="smooth", decay=0.5,
                                 save_precision="fp32").validate(), RecordingContext(data_paths))
    vectors = [read_bundled(p)[TOKEN].float() for p in copies + [final]]  # steps 1, 2, 3, 4
    want = sum(w * v for w, v in zip([0.125, 0.125, 0.25, 0.5], vectors))
    torch.testing.assert_close(read_bundled(averaged)[TOKEN], want, atol=1e-6, rtol=1e-5)


def test_lora_files_with_bundles_round_trip_and_a_plain_one_has_no_token_to_write(data_paths,
                                                                                  tmp_path):
    from trainers.checkpoint_use import bundled_embedding_files
    from trainers.formats.bundled_embeddings import bundle_state
    from trainers.formats.lora import save_lora
    adapter = {"lora_unet_x.lora_down.weight": torch.ones(2, 4),
               "lora_unet_x.lora_up.weight": torch.ones(4, 2), "lora_unet_x.alpha": torch.tensor(2.)}
    pair = {"clip_l": torch.ones(3, 8), "clip_g": torch.zeros(3, 16)}
    save_lora(tmp_path / "b.safetensors", {**adapter, **bundle_state({"one": torch.ones(2, 8),
                                                                      "two": pair})})
    assert sorted(load_lora(tmp_path / "b.safetensors")[0]) == sorted(adapter)
    found = read_bundled(tmp_path / "b.safetensors")
    assert torch.equal(found["one"], torch.ones(2, 8)) and sorted(found["two"]) == ["clip_g",
                                                                                     "clip_l"]
    assert sorted(a1111_bundles(tmp_path / "b.safetensors")["two"]) == ["clip_g", "clip_l"]
    save_lora(tmp_path / "plain.safetensors", adapter)
    with pytest.raises(ValueError, match="carries no trained token"):
        bundled_embedding_files(data_paths, tmp_path / "plain.safetensors", overwrite=False)
    with pytest.raises(ValueError, match="without dots"):
        bundle_state({"a.b": torch.ones(1, 8)})


def test_loha_carries_the_token_too(data_paths, folder):
    from trainers.formats.lycoris import algo_of, load_adapter
    path = run(pivotal(folder, max_train_steps=1, network_type="loha"),
               RecordingContext(data_paths))
    state, _ = load_adapter(path)
    assert algo_of(state) == "loha" and not any(k.startswith("bundle_emb") for k in state)
    assert list(a1111_bundles(path)) == [TOKEN]


def test_the_checkpoints_tab_writes_the_token_when_asked(data_paths, folder):
    from core.jobs import JobRunner
    from trainers import runs as rn
    from webui.tab_checkpoints import _Handlers
    run(pivotal(folder, max_train_steps=1), RecordingContext(data_paths))
    lora_run = next(r for r in rn.scan_runs(data_paths) if r.method == "lora")
    runner = JobRunner(data_paths, worker_process=False)
    try:
        handlers = _Handlers(data_paths, runner, page=None)
        key = lora_run.checkpoints[-1].key
        message, _ = handlers.use_checkpoint(lora_run.id, key, "tabcopy", False, True)
        assert "wrote its token as" in message and f"**{TOKEN}**" in message
        assert (data_paths.embeddings / f"{TOKEN}.safetensors").is_file()
        message, _ = handlers.use_checkpoint(lora_run.id, key, "tabcopy2", False, True)
        assert "already exists" in message and not (data_paths.lora / "tabcopy2.safetensors").exists()
    finally:
        runner.shutdown()
