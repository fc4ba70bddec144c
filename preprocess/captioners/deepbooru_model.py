"""The DeepDanbooru ResNet tagger as a PyTorch module whose state dict matches the weights
A1111 downloads (`model-resnet_custom_v3.pt`): 179 convolutions named `n_Conv_0` ...
`n_Conv_178`, batch norm folded into their biases, the last one (the tag head) without bias.

The network is a bottleneck ResNet with TensorFlow "same" padding written out explicitly:

    stem     7x7/2 conv (pad 2,3) -> ReLU -> 3x3/2 max-pool (pad 0,1 with -inf)
    stage 1  3 blocks, bottleneck w,    out 4w, stride 1
    stage 2  8 blocks, bottleneck 2w,   out 8w, stride 2
    stage 3  20 blocks, bottleneck 4w,  out 16w, stride 2
    stage 4  20 blocks, bottleneck 4w,  out 16w, stride 2
    stage 5  3 blocks, bottleneck 8w,   out 32w, stride 2
    stage 6  3 blocks, bottleneck 16w,  out 64w, stride 2
    head     1x1 conv to n_tags (no bias) -> global average -> sigmoid

with w = 64 in the published model (9176 tags). Each block is 1x1 -> ReLU -> 3x3 -> ReLU -> 1x1,
added to the input (or to a 1x1 projection of it in a stage's first block) and ReLU-ed. A
stage's first block strides in its 3x3 conv (padded 0,1) and its projection. Convolutions are
numbered in the order of the original graph, where the projection of stage 4 comes after its
block's three convolutions and every other projection before them.

`width` and `n_tags` scale the same layout down, so a tiny random model with the real key names
can be built and run in tests; `from_state_dict` reads both from the weights' shapes."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

N_TAGS = 9176
WIDTH = 64
# (blocks, bottleneck multiple of width, first-block stride, projection numbered first)
STAGES = ((3, 1, 1, True), (8, 2, 2, True), (20, 4, 2, True), (20, 4, 2, False),
          (3, 8, 2, True), (3, 16, 2, True))
EXPANSION = 4


def conv_layout(width: int = WIDTH, n_tags: int = N_TAGS) -> list[dict]:
    """Every convolution in index order: in/out channels, kernel, stride, bias, and its role."""
    layers = [dict(index=0, cin=3, cout=width, k=7, stride=2, bias=True, role="stem")]
    channels = width

    def add(cin, cout, k, stride, role):
        layers.append(dict(index=len(layers), cin=cin, cout=cout, k=k, stride=stride,
                           bias=True, role=role))

    for stage, (blocks, mult, stride, projection_first) in enumerate(STAGES, start=1):
        mid, out = width * mult, width * mult * EXPANSION
        for block in range(blocks):
            first = block == 0
            s = stride if first else 1
            if first and projection_first:
                add(channels, out, 1, stride, f"s{stage}b0.proj")
            add(channels, mid, 1, 1, f"s{stage}b{block}.reduce")
            add(mid, mid, 3, s, f"s{stage}b{block}.conv")
            add(mid, out, 1, 1, f"s{stage}b{block}.expand")
            if first and not projection_first:
                add(channels, out, 1, stride, f"s{stage}b0.proj")
            channels = out
    layers.append(dict(index=len(layers), cin=channels, cout=n_tags, k=1, stride=1, bias=False,
                       role="head"))
    return layers


class DeepDanbooruModel(nn.Module):
    def __init__(self, n_tags: int = N_TAGS, width: int = WIDTH, tags: list[str] | None = None):
        super().__init__()
        self.tags = list(tags or [])
        self.n_tags, self.width = n_tags, width
        self.layout = conv_layout(width, n_tags)
        for spec in self.layout:
            setattr(self, f"n_Conv_{spec['index']}", nn.Conv2d(
                spec["cin"], spec["cout"], kernel_size=spec["k"], stride=spec["stride"],
                bias=spec["bias"]))
        self._blocks = self._plan_blocks()

    def _conv(self, index: int) -> nn.Conv2d:
        return getattr(self, f"n_Conv_{index}")

    def _plan_blocks(self) -> list[tuple[int, int, int, int | None, int]]:
        """(reduce, conv, expand, projection or None, stride) per residual block."""
        blocks, by_role = [], {spec["role"]: spec["index"] for spec in self.layout}
        for stage, (count, _, stride, _) in enumerate(STAGES, start=1):
            for block in range(count):
                prefix = f"s{stage}b{block}"
                blocks.append((by_role[f"{prefix}.reduce"], by_role[f"{prefix}.conv"],
                               by_role[f"{prefix}.expand"], by_role.get(f"{prefix}.proj"),
                               stride if block == 0 else 1))
        return blocks

    @classmethod
    def from_state_dict(cls, state_dict: dict) -> "DeepDanbooruModel":
        """Build a model shaped like the weights (tags taken from a 'tags' entry) and load them."""
        weights = {k: v for k, v in state_dict.items() if k != "tags"}
        width = int(weights["n_Conv_0.weight"].shape[0])
        n_tags = int(weights["n_Conv_178.weight"].shape[0])
        model = cls(n_tags=n_tags, width=width, tags=state_dict.get("tags"))
        model.load_state_dict(weights)
        return model

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Accepts the published file as is: its 'tags' list becomes `self.tags`."""
        if "tags" in state_dict:
            self.tags = list(state_dict["tags"])
            state_dict = {k: v for k, v in state_dict.items() if k != "tags"}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: N x H x W x 3 floats in [0, 1] (channels last, as the original graph);
        returns N x n_tags probabilities."""
        x = images.permute(0, 3, 1, 2)
        x = F.relu(self.n_Conv_0(F.pad(x, [2, 3, 2, 3])))
        x = F.max_pool2d(F.pad(x, [0, 1, 0, 1], value=float("-inf")), kernel_size=3, stride=2)
        for reduce, conv, expand, projection, stride in self._blocks:
            shortcut = self._conv(projection)(x) if projection is not None else x
            y = F.relu(self._conv(reduce)(x))
            y = F.pad(y, [0, 1, 0, 1] if stride == 2 else [1, 1, 1, 1])
            y = F.relu(self._conv(conv)(y))
            x = F.relu(self._conv(expand)(y) + shortcut)
        logits = self._conv(len(self.layout) - 1)(x)
        return torch.sigmoid(logits.mean(dim=(2, 3)))
