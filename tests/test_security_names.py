"""Names typed for models, embeddings and hypernetworks never reach outside the data folder."""
import pytest

from core.paths import PathError, Paths
from trainers.embeddings import find_embedding
from trainers.hypernetworks import find_hypernetwork
from trainers.models import resolve_model


def test_embedding_and_hypernetwork_names_are_names(tmp_path):
    paths = Paths(tmp_path / "data").ensure()
    (tmp_path / "outside.pt").write_bytes(b"x")
    (paths.embeddings / "ok.pt").write_bytes(b"x")
    assert find_embedding(paths, "ok") == paths.embeddings / "ok.pt"
    for name in ("../../outside", str(tmp_path / "outside"), "..", ""):
        assert find_embedding(paths, name) is None
        assert find_hypernetwork(paths, name) is None


def test_a_shared_app_loads_no_model_outside_the_data_folder(tmp_path):
    outside = tmp_path / "evil.safetensors"
    outside.write_bytes(b"x")
    paths = Paths(tmp_path / "data", confine=True).ensure()
    for name in (str(outside), "../../../evil.safetensors"):
        with pytest.raises(PathError, match="outside the data folder"):
            resolve_model(paths, name)
    (paths.stable_diffusion / "mine.safetensors").write_bytes(b"x")
    assert resolve_model(paths, "mine.safetensors")[0] == "file"


def test_dataset_toml_folders_are_confined_when_shared(tmp_path):
    from trainers.configs import LoraConfig
    from trainers.kohya_training import dataset_configs
    outside = tmp_path / "outside"
    outside.mkdir()
    paths = Paths(tmp_path / "data", confine=True).ensure()
    toml = paths.data_dir / "d.toml"
    toml.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{outside}"\n')
    cfg = LoraConfig(model="tiny-demo", output_name="x", dataset_config="d.toml")
    with pytest.raises(PathError, match="outside the data folder"):
        dataset_configs(cfg, paths)
