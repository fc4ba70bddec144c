"""Paging out idle weights: the memory-mapped pages leave the process, the values stay."""
from __future__ import annotations

import sys

import pytest
import safetensors.torch
import torch

from trainers.resident import page_out


def rss_file_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's madvise")
def test_mapped_weights_leave_the_resident_set_and_read_back_the_same(tmp_path):
    generator = torch.Generator().manual_seed(0)
    values = {"weight": torch.randn(4096, 2048, generator=generator),  # 32 MiB
              "bias": torch.randn(4096, generator=generator)}
    path = tmp_path / "layer.safetensors"
    safetensors.torch.save_file(values, str(path))
    layer = torch.nn.Linear(2048, 4096)
    layer.load_state_dict(safetensors.torch.load_file(str(path)), assign=True)
    assert torch.equal(layer.weight, values["weight"])  # every page read: resident now
    before = rss_file_mib()
    asked = page_out(layer, None, "not a module")
    if asked == 0:
        pytest.skip("this kernel has no MADV_PAGEOUT or the weights are not file-backed")
    assert asked >= 31 * 2**20
    assert rss_file_mib() < before - 16  # most of the 32 MiB left the process
    assert torch.equal(layer.weight, values["weight"])  # read back from the file, unchanged
    assert torch.equal(layer.bias, values["bias"])

    # a weight written since it was mapped keeps what was written (a private copy, not the file)
    with torch.no_grad():
        layer.weight[0, :1024] = 7.0
        layer.weight[2000, 5] = -3.0
    page_out(layer)
    expected = values["weight"].clone()
    expected[0, :1024], expected[2000, 5] = 7.0, -3.0
    assert torch.equal(layer.weight, expected)


def test_anonymous_and_odd_tensors_are_left_alone():
    layer = torch.nn.Linear(300, 200)
    layer.weight.data = layer.weight.data.t().contiguous().t()  # not contiguous: skipped
    before = [t.clone() for t in layer.parameters()]
    page_out(layer, torch.nn.Identity())
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))


def test_only_file_pages_and_untouched_pages_may_be_dropped():
    from trainers.resident import _droppable
    present, swapped, file_page = 1 << 63, 1 << 62, 1 << 61
    assert _droppable(present | file_page | 1234)
    assert _droppable(0)  # never touched: reads back as zeros either way
    assert not _droppable(present | 1234)  # a private (written or anonymous) page
    assert not _droppable(swapped | 77)  # swapped out: perhaps the only copy of the data
    assert not _droppable(swapped | file_page)
