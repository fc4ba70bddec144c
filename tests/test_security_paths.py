"""Typed paths: when the app is reachable by others they stay inside the data folder."""
from __future__ import annotations

import os

import pytest

from core.paths import PathError, Paths


@pytest.fixture
def layout(tmp_path):
    data = tmp_path / "data"
    paths = Paths(data, confine=True).ensure()
    (data / "datasets" / "cats").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "passwords.txt").write_text("hunter2")
    os.symlink(outside, data / "datasets" / "link-out")
    os.symlink(data / "datasets" / "cats", data / "datasets" / "link-in")
    return paths, data, outside


@pytest.mark.parametrize("typed", [
    "datasets/cats", "./datasets/cats", "datasets/../datasets/cats", "datasets/link-in",
    "outputs", "datasets/new-folder/not-yet", ".", " datasets/cats ",
])
def test_paths_inside_the_data_folder_are_allowed(layout, typed):
    paths, data, _ = layout
    resolved = paths.resolve(typed, "data_root")
    assert resolved.is_absolute()
    assert resolved.resolve().is_relative_to(data.resolve())


@pytest.mark.parametrize("typed", [
    "..", "../secret", "datasets/../../secret/passwords.txt", "datasets/cats/../../../secret",
    "datasets/link-out", "datasets/link-out/passwords.txt", "datasets/link-out/../cats/x",
    "/etc/passwd", "/", "~", "~/.ssh", "{outside}", "{outside}/passwords.txt",
    ".cache", ".cache/gradio", "datasets/.hidden", "outputs/../.cache/tiny-demo",
])
def test_paths_leaving_the_data_folder_are_refused(layout, typed):
    paths, _, outside = layout
    typed = typed.format(outside=outside)
    with pytest.raises(PathError) as caught:
        paths.resolve(typed, "data_root")
    assert str(caught.value).startswith("data_root: ")


def test_a_symlink_out_of_the_data_folder_is_refused_by_the_app_code(layout):
    """The same check where the page uses it: the dataset-folder check before training."""
    from trainers.preflight import check_dataset
    paths, _, _ = layout
    problems = check_dataset(paths, "datasets/link-out")
    assert problems and "outside the data folder" in problems[0]


@pytest.mark.parametrize("typed, words", [("", "no path given"), ("   ", "no path given"),
                                          ("a\x00b", "NUL")])
def test_empty_and_nul_paths_are_refused_always(tmp_path, typed, words):
    for confine in (True, False):
        with pytest.raises(PathError, match=words):
            Paths(tmp_path, confine=confine).resolve(typed)


def test_a_private_app_may_use_any_path(layout):
    _, data, outside = layout
    paths = Paths(data, confine=False)
    assert paths.resolve(str(outside)) == outside
    assert paths.resolve("datasets/link-out") == data / "datasets" / "link-out"
    assert paths.resolve("../secret") == data / "../secret"


def test_the_app_confines_whenever_a_login_is_required():
    import app
    assert app.credentials(app.parse_args(["--share"])) is not None
    assert app.credentials(app.parse_args(["--host", "0.0.0.0"])) is not None
    assert app.credentials(app.parse_args(["--host", "192.168.1.5", "--auth", "a:bcdefghijklmn"]))
    assert app.credentials(app.parse_args([])) is None
