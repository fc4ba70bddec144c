import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT


def run(args, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, **kw)


def test_print_config_is_complete_commented_toml():
    out = run(["-m", "trainers", "textual_inversion", "--print-config"])
    assert out.returncode == 0, out.stderr
    data = tomllib.loads(out.stdout)
    assert data["learn_rate"] == "0.005" and data["latent_sampling"] == "once"
    assert "# Learning rate or schedule" in out.stdout


def test_cli_reports_bad_settings_by_name(tmp_path):
    out = run(["-m", "trainers", "textual_inversion", "--set", "width=100", "--set", "stepz=1"])
    assert out.returncode == 2
    assert "stepz: unknown setting" in out.stderr


def test_cli_trains_headless(tmp_path, tiny_model_dir, photo_dataset):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(tiny_model_dir, data / ".cache" / "tiny-demo")
    (data / "embeddings").mkdir(parents=True)
    from core.paths import Paths
    from trainers.configs import CreateEmbeddingConfig
    from trainers.embeddings import create_embedding
    create_embedding(CreateEmbeddingConfig(name="clitok", model="tiny-demo").validate(), Paths(data))
    config = tmp_path / "run.toml"
    config.write_text(f'model = "tiny-demo"\nembedding = "clitok"\ndata_root = "{photo_dataset}"\n'
                      'width = 64\nheight = 64\nsteps = 3\npreview_every = 0\nsave_every = 0\n')
    out = run(["-m", "trainers", "textual_inversion", "--config", str(config), "--data-dir", str(data)])
    assert out.returncode == 0, out.stderr
    assert "finished at step 3" in out.stderr
    from trainers.formats.embedding import load_embedding
    assert load_embedding(data / "embeddings" / "clitok.pt").step == 3


def test_app_help_does_not_import_torch():
    code = ("import sys, runpy; sys.argv=['app.py','--help']\n"
            "try:\n runpy.run_path('app.py', run_name='__main__')\n"
            "except SystemExit: pass\n"
            "assert 'torch' not in sys.modules and 'gradio' not in sys.modules, 'heavy import'")
    out = run(["-c", code])
    assert out.returncode == 0, out.stderr
    assert "--share" in out.stdout


def test_share_without_auth_generates_a_login(capsys):
    sys.path.insert(0, str(ROOT))
    import app
    login = app.credentials(app.parse_args(["--share"]))
    assert login is not None and login[0] == "danlu" and len(login[1]) >= 16
    assert login[1] in capsys.readouterr().err
    assert app.credentials(app.parse_args(["--host", "0.0.0.0"])) is not None
    assert app.credentials(app.parse_args([])) is None
    assert app.credentials(app.parse_args(["--auth", "me:secret"])) == ("me", "secret")
    with pytest.raises(SystemExit):
        app.credentials(app.parse_args(["--auth", "nopassword"]))


def test_webui_does_not_import_the_engine_libraries():
    code = ("import sys; sys.path.insert(0,'.')\n"
            "import webui.app, webui.tab_train, webui.tab_create, webui.tab_preprocess\n"
            "bad=[m for m in ('torch','diffusers','transformers','peft') if m in sys.modules]\n"
            "assert not bad, bad")
    out = run(["-c", code])
    assert out.returncode == 0, out.stderr
