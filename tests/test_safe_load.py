"""safe_torch_load refuses code-carrying pickles; save_torch_legacy writes what A1111 accepts."""
from __future__ import annotations

import collections
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from trainers.formats.embedding import load_embedding
from trainers.formats.safe_load import (NotATorchFileError, UnsafeFileError, check_plain,
                                        safe_torch_load, save_torch_legacy)


class _CreatesMarker:
    """Unpickling this calls open(marker, "w"), which would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# What A1111 v1.10's modules/safe.py lets a legacy .pt name (module, attribute).
A1111_ALLOWED = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    *(("torch", name) for name in ["FloatStorage", "HalfStorage", "IntStorage", "LongStorage",
                                   "DoubleStorage", "ByteStorage", "float32", "BFloat16Storage"]),
}


def a1111_style_check(path: Path) -> list[tuple[str, str]]:
    """Unpickle the five pickles of a legacy torch file with A1111's allowlist."""
    named: list[tuple[str, str]] = []

    class Restricted(pickle.Unpickler):
        def persistent_load(self, saved_id):
            assert saved_id[0] == "storage"
            return None

        def find_class(self, module, name):
            named.append((module, name))
            if (module, name) not in A1111_ALLOWED:
                raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
            if module == "collections":
                return collections.OrderedDict
            return lambda *args, **kwargs: None

    with open(path, "rb") as handle:
        unpickler = Restricted(handle)
        for _ in range(5):
            unpickler.load()
    return named


@pytest.mark.parametrize("writer", ["pickle", "torch.save", "torch.save-legacy"])
def test_malicious_pickle_is_refused_without_running_it(tmp_path, writer):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    payload = {"string_to_param": {"*": _CreatesMarker(marker)}}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=(writer == "torch.save"))

    with pytest.raises(UnsafeFileError) as caught:
        safe_torch_load(path)
    message = str(caught.value)
    assert message.startswith("evil.pt: refused to load: it contains Python objects other than")
    assert "open" in message
    with pytest.raises(UnsafeFileError):
        load_embedding(path)
    assert not marker.exists()


def test_random_bytes_and_truncated_files_are_not_torch_files(tmp_path):
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    good = tmp_path / "good.pt"
    save_torch_legacy({"x": torch.ones(64)}, good)
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    zipped = tmp_path / "zipped.pt"
    torch.save({"x": torch.ones(64)}, zipped)
    cut_zip = tmp_path / "cutzip.pt"
    cut_zip.write_bytes(zipped.read_bytes()[:200])
    for path in [noise, truncated, cut_zip]:
        with pytest.raises(NotATorchFileError, match=path.name):
            safe_torch_load(path)
    with pytest.raises(FileNotFoundError):
        safe_torch_load(tmp_path / "missing.pt")


def test_legacy_file_is_not_a_zip_and_passes_a1111_and_weights_only(tmp_path):
    path = tmp_path / "state.pt"
    obj = {"w": torch.randn(3, 4), "half": torch.randn(2).half(), "steps": [1, 2.5, True, None],
           "pair": (torch.zeros(1, dtype=torch.int64), "s"), 7: {"nested": torch.ones(2)},
           "od": collections.OrderedDict(a=torch.ones(1))}
    save_torch_legacy(obj, path)

    assert not zipfile.is_zipfile(path)
    assert b".format_version" not in path.read_bytes()
    assert b".storage_alignment" not in path.read_bytes()
    named = a1111_style_check(path)
    assert ("torch", "FloatStorage") in named and ("torch", "HalfStorage") in named
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["w"], obj["w"]) and loaded["half"].dtype == torch.float16
    assert loaded["steps"] == [1, 2.5, True, None] and loaded[7]["nested"].tolist() == [1, 1]
    assert isinstance(loaded["pair"], tuple)


def test_parameters_and_views_are_saved_as_small_plain_tensors(tmp_path):
    big = torch.randn(1000, 256)
    param = torch.nn.Parameter(torch.randn(2, 8))
    path = tmp_path / "small.pt"
    save_torch_legacy({"view": big[:2], "param": param}, path)
    assert path.stat().st_size < 20_000  # not the 1 MB storage behind the view
    loaded = safe_torch_load(path)
    assert torch.equal(loaded["view"], big[:2])
    assert type(loaded["param"]) is torch.Tensor and not loaded["param"].requires_grad
    assert ("torch._utils", "_rebuild_parameter") not in a1111_style_check(path)


@pytest.mark.parametrize("bad, where, kind", [
    ({"lr": np.float64(0.1)}, "value['lr']", "numpy.float64"),
    ({"opt": {"param_groups": [{"betas": (0.9, np.float32(0.99))}]}},
     "value['opt']['param_groups'][0]['betas'][1]", "numpy.float32"),
    ({"when": object()}, "value['when']", "object"),
    ({"path": Path("/x")}, "value['path']", "PosixPath"),
    ({"mask": torch.ones(2, dtype=torch.bool)}, "value['mask']", "torch.bool"),
    ({("tuple", "key"): 1}, "value", "tuple"),
])
def test_non_plain_values_are_refused_with_their_location(tmp_path, bad, where, kind):
    path = tmp_path / "out.pt"
    path.write_bytes(b"previous")
    with pytest.raises(TypeError) as caught:
        save_torch_legacy(bad, path)
    assert where in str(caught.value) and kind in str(caught.value)
    assert path.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["out.pt"]
    with pytest.raises(TypeError):
        check_plain(bad)
