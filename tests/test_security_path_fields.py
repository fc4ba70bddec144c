"""Every config field that names a file or folder is marked as a path (so the one resolver,
`Paths.resolve`, checks it and a shared app confines it); the Aesthetic tab's embedding field,
once unmarked and joined to models/aesthetic_embeddings/ as typed, is confined like the rest."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from core.config import ConfigError, PATH_BASES, path_problems
from core.paths import Paths
from tests.conftest import ROOT

PACKAGES = ("trainers", "preprocess", "core", "webui", "bench")

# The rule: a field names a file or folder when a word of its name (split at '_') is one of
# these, or its help text points at a place on disk.
FILE_WORDS = {"dir", "directory", "path", "file", "folder", "root", "model", "checkpoint",
              "embedding", "hypernetwork", "vae", "lora", "json", "toml", "config", "template",
              "source", "destination", "weights", "name"}
HELP_PLACES = re.compile(r"\bfolder\b|\bdirectory\b|\ba path\b|\bmodels/|\bembeddings/|"
                         r"\btextual_inversion_templates/|\.(pt|ckpt|bin|safetensors|json|toml)\b",
                         re.IGNORECASE)

# Fields the rule picks out that are not paths, each with the reason (checked below where the
# reason is a behaviour).
NOT_PATHS = {
    "name": "a bare file name: check_name refuses path characters, '.' and '..'",
    "output_name": "a bare file name: check_name refuses path characters, '.' and '..'",
    "embedding": "a bare name looked up inside embeddings/ (find_embedding finds nothing for a "
                 "value with a path character)",
    "hypernetwork": "a bare name looked up inside models/hypernetworks/ (find_hypernetwork "
                    "finds nothing for a value with a path character)",
    "template": "a bare file name that must be one of textual_inversion_templates/*.txt "
                "(preflight and read_template refuse anything else)",
    "file_format": "a choice of format (.pt / .safetensors), not a place",
    "save_diffusers_format": "a switch: also write the diffusers format beside the output",
    "save_diffusers": "a switch: also write a diffusers folder beside the output",
    "loras": "bare file names inside models/Lora with weights (MergeLoraConfig.weighted runs "
             "check_name on each, which refuses path characters)",
    "masked_loss": "a switch; the mask folder it reads is conditioning_data_dir, marked path=data",
    "log_with": "a choice of logger ('none' or 'tensorboard'); its events go in the run folder",
}


def config_modules() -> list[str]:
    """Modules of PACKAGES that build config fields with core.config.option."""
    found = []
    for package in PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(file.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module == "core.config" and \
                        any(alias.name == "option" for alias in node.names):
                    found.append(".".join(file.relative_to(ROOT).with_suffix("").parts))
                    break
    return found


def config_classes() -> list[type]:
    classes = []
    for name in config_modules():
        module = importlib.import_module(name)
        classes += [value for value in vars(module).values()
                    if dataclasses.is_dataclass(value) and value.__module__ == module.__name__
                    and any("help" in f.metadata for f in dataclasses.fields(value))]
    return classes


def names_a_place(field: dataclasses.Field) -> bool:
    words = set(field.name.lower().split("_"))
    return bool(words & FILE_WORDS) or bool(HELP_PLACES.search(field.metadata.get("help", "")))


def test_the_walk_finds_every_job_config():
    found = {cls.__name__ for cls in config_classes()}
    assert {"TextualInversionConfig", "LoraConfig", "DreamBoothConfig", "FineTuneConfig",
            "ExtractLoraConfig", "AestheticEmbeddingConfig", "AestheticPreviewConfig",
            "CreateEmbeddingConfig", "CreateHypernetworkConfig", "PreprocessConfig"} <= found


def test_every_field_that_names_a_file_or_folder_is_marked_as_a_path():
    unmarked = []
    for cls in config_classes():
        for field in dataclasses.fields(cls):
            kind = field.metadata.get("path")
            assert kind in (None, *PATH_BASES), f"{cls.__name__}.{field.name}: {kind!r}"
            if kind is None and names_a_place(field) and field.name not in NOT_PATHS:
                unmarked.append(f"{cls.__name__}.{field.name} ({field.metadata.get('help', '')!r})")
    assert not unmarked, ("fields that name a file or folder but are not marked path=... "
                          "(mark them, or add them to NOT_PATHS with the reason): "
                          + "; ".join(unmarked))


def test_the_rule_catches_the_field_that_was_missed():
    """The rule must have caught the aesthetic embedding field before it was marked."""
    from trainers.configs import AestheticPreviewConfig
    field = {f.name: f for f in dataclasses.fields(AestheticPreviewConfig)}["aesthetic_embedding"]
    assert names_a_place(field) and "aesthetic_embedding" not in NOT_PATHS
    assert field.metadata["path"] == "aesthetic"


def test_every_exception_is_still_a_field_the_rule_picks_out():
    """An allow-list entry that no longer matches any field is stale."""
    picked = {f.name for cls in config_classes() for f in dataclasses.fields(cls)
              if names_a_place(f)}
    assert set(NOT_PATHS) <= picked, set(NOT_PATHS) - picked


@pytest.mark.parametrize("typed", ["../../etc/x", "../x", "a/b", "/etc/x", "..", "."])
def test_name_only_exceptions_refuse_path_characters(tmp_path, typed):
    """The exceptions that are names really are: a value with a path in it finds nothing."""
    from trainers.captions import TemplateError, read_template
    from trainers.configs import check_name
    from trainers.embeddings import find_embedding
    from trainers.hypernetworks import find_hypernetwork
    paths = Paths(tmp_path / "data", confine=True).ensure()
    (tmp_path / "etc").mkdir()
    for suffix in (".pt", ".safetensors", ".txt"):
        (tmp_path / "etc" / f"x{suffix}").write_bytes(b"x")
    assert check_name("name", typed)
    assert find_embedding(paths, typed) is None
    assert find_hypernetwork(paths, typed) is None
    with pytest.raises(TemplateError, match="template: "):
        read_template(paths.templates, typed)


def test_every_name_field_refuses_a_path_when_validated():
    checked = 0
    for cls in config_classes():
        for field in dataclasses.fields(cls):
            if field.name in ("name", "output_name") and hasattr(cls, "validate"):
                with pytest.raises(ConfigError) as caught:
                    cls(**{field.name: "../../etc/x"}).validate()
                assert any(p.startswith(f"{field.name}: ") and "path characters" in p
                           for p in caught.value.problems), (cls.__name__, caught.value.problems)
                checked += 1
    assert checked >= 5


# ---------------------------------------------------------------- the aesthetic embedding field

@pytest.fixture
def shared(tmp_path):
    """A shared app's data folder with one aesthetic embedding, and a .pt outside it."""
    paths = Paths(tmp_path / "data", confine=True).ensure()
    paths.aesthetic_embeddings.mkdir(parents=True)
    (paths.aesthetic_embeddings / "look.pt").write_bytes(b"inside")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "x.pt").write_bytes(b"outside")
    return paths, tmp_path / "etc" / "x.pt"


def outside_values(outside: Path) -> list[str]:
    return ["../../etc/x", "../etc/x", str(outside.with_suffix("")), str(outside), "/etc/passwd",
            "~/x"]


def test_the_aesthetic_embedding_field_refuses_paths_outside_the_data_folder(shared):
    from trainers.aesthetic_files import find_aesthetic_embedding
    from trainers.configs import AestheticPreviewConfig
    paths, outside = shared
    for typed in outside_values(outside):
        cfg = AestheticPreviewConfig(model="tiny-demo", aesthetic_embedding=typed,
                                     clip_model="models/CLIP/x")
        problems = path_problems(cfg, paths)
        assert problems and all(p.startswith("aesthetic_embedding: ") for p in problems), typed
        assert "outside the data folder" in problems[0], typed
        with pytest.raises(ValueError, match="^aesthetic_embedding: .*outside the data folder"):
            find_aesthetic_embedding(paths, typed)
    # what the dropdown offers still works, by name or as a path inside the data folder
    assert find_aesthetic_embedding(paths, "look") == paths.aesthetic_embeddings / "look.pt"
    assert find_aesthetic_embedding(paths, "models/aesthetic_embeddings/look.pt") == \
        paths.aesthetic_embeddings / "look.pt"
    with pytest.raises(FileNotFoundError, match="aesthetic_embedding: no gone.pt in"):
        find_aesthetic_embedding(paths, "gone")


def test_the_preview_refuses_them_before_opening_anything(shared, monkeypatch):
    """Through the page's entry point: refused by field name, and no file is read."""
    import trainers.formats.safe_load as safe_load
    from trainers.aesthetic import AestheticError, preview_from_config
    from trainers.configs import AestheticPreviewConfig
    paths, outside = shared
    opened = []
    monkeypatch.setattr(safe_load, "safe_torch_load", lambda path: opened.append(path))
    for typed in outside_values(outside):
        cfg = AestheticPreviewConfig(model="tiny-demo", aesthetic_embedding=typed,
                                     clip_model="models/CLIP/x")
        with pytest.raises((ConfigError, AestheticError), match="aesthetic_embedding: "):
            preview_from_config(cfg, paths)
    assert opened == []


def test_a_private_app_may_still_name_an_embedding_anywhere(shared):
    from trainers.aesthetic_files import find_aesthetic_embedding
    paths, outside = shared
    private = Paths(paths.data_dir, confine=False)
    assert find_aesthetic_embedding(private, str(outside)) == outside
