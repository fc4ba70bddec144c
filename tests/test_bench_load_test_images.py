"""`python3 -m bench.load_test` (a README command) runs after `pip install -r requirements.txt`
alone: without scikit-image (only requirements-dev.txt installs it) its dataset is drawn with PIL."""
from __future__ import annotations

import sys

import numpy as np
from PIL import Image

from bench import fixtures, load_test


def block_skimage(monkeypatch):
    for name in [n for n in sys.modules if n == "skimage" or n.startswith("skimage.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "skimage", None)  # `import skimage...` raises ImportError


def test_without_skimage_the_load_tests_dataset_is_drawn(monkeypatch, tmp_path):
    block_skimage(monkeypatch)
    name, pictures = load_test.dataset_pictures()
    assert name == "drawn-64" and len(pictures) == 4
    layouts = fixtures.make_dataset(tmp_path / name, 64, pictures)
    images = sorted(layouts["captioned"].glob("*.png"))
    captions = sorted(layouts["captioned"].glob("*.txt"))
    assert len(images) == 4 and len(captions) == 4
    arrays = []
    for path in images:
        with Image.open(path) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
            arrays.append(np.asarray(image, dtype=np.float32))
    assert all(a.std() > 10 for a in arrays)  # pictures, not flat fills
    assert all(np.abs(a - b).mean() > 5 for i, a in enumerate(arrays) for b in arrays[i + 1:])
    assert len(list(layouts["kohya_subset"].glob("*.png"))) == 4
    # the same pictures every time (a cached dataset stays valid)
    again = load_test.drawn_pictures()
    assert all(np.array_equal(np.asarray(a[1]), np.asarray(b[1])) for a, b in zip(pictures, again))


def test_with_skimage_the_load_test_keeps_the_sample_photos():
    import pytest
    pytest.importorskip("skimage")
    assert load_test.dataset_pictures() == ("photos-64", None)
