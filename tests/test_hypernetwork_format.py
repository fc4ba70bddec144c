"""A1111 hypernetwork files: exact layout, Sequential indices, legacy files, bad input."""
from __future__ import annotations

import dataclasses
import hashlib
import zipfile

import pytest
import torch

from trainers.formats.hypernetwork import (HypernetworkFormatError, file_shorthash,
                                           hypernetwork_checksum, load_hypernetwork,
                                           save_hypernetwork, to_a1111_dict)
from trainers.formats.safe_load import save_torch_legacy
from trainers.hypernetwork_net import (ACTIVATIONS, Hypernetwork, HypernetworkModule,
                                       HypernetworkSpec, default_dropout_structure, parse_floats)

# The order A1111's Hypernetwork.save writes the keys in, after the int size keys.
A1111_KEYS = ["step", "name", "layer_structure", "activation_func", "is_layer_norm",
              "weight_initialization", "sd_checkpoint", "sd_checkpoint_name", "activate_output",
              "use_dropout", "dropout_structure", "last_layer_dropout", "optional_info"]


def raw(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def spec(**kw) -> HypernetworkSpec:
    kw.setdefault("name", "hn")
    kw.setdefault("sizes", [32, 64])
    return HypernetworkSpec(**kw)


def test_saved_file_has_exactly_a1111_keys(tmp_path):
    net = Hypernetwork(spec(activation_func="relu", add_layer_norm=True, step=12,
                            sd_checkpoint="0123456789", sd_checkpoint_name="tiny",
                            optional_info="made by a test").validate())
    path = tmp_path / "hn.pt"
    save_hypernetwork(path, net)
    assert not zipfile.is_zipfile(path)  # legacy format, which A1111's unpickler accepts
    data = raw(path)
    assert list(data) == [32, 64] + A1111_KEYS
    for size in (32, 64):
        assert type(data[size]) is tuple and len(data[size]) == 2
        assert all(isinstance(part, dict) for part in data[size])
    assert data["layer_structure"] == [1.0, 2.0, 1.0]
    assert data["activation_func"] == "relu" and data["is_layer_norm"] is True
    assert data["activate_output"] is False and data["use_dropout"] is False
    assert data["dropout_structure"] == [0.0, 0.0, 0.0] and data["last_layer_dropout"] is False
    assert data["weight_initialization"] == "Normal"
    assert (data["step"], data["name"], data["sd_checkpoint"], data["sd_checkpoint_name"],
            data["optional_info"]) == (12, "hn", "0123456789", "tiny", "made by a test")


# Hand-written from A1111's HypernetworkModule: per layer Linear, activation (not for
# "linear", not after the last Linear unless activate_output), LayerNorm, Dropout(p>0).
LAYOUTS = [
    (dict(), ["Linear", "Linear"]),
    (dict(activation_func="relu"), ["Linear", "ReLU", "Linear"]),
    (dict(activation_func="relu", activate_output=True), ["Linear", "ReLU", "Linear", "ReLU"]),
    (dict(add_layer_norm=True), ["Linear", "LayerNorm", "Linear", "LayerNorm"]),
    (dict(activation_func="relu", add_layer_norm=True),
     ["Linear", "ReLU", "LayerNorm", "Linear", "LayerNorm"]),
    (dict(activation_func="relu", add_layer_norm=True, activate_output=True),
     ["Linear", "ReLU", "LayerNorm", "Linear", "ReLU", "LayerNorm"]),
    (dict(activation_func="relu", use_dropout=True, dropout_structure=[0, 0.1, 0]),
     ["Linear", "ReLU", "Dropout", "Linear"]),
    # [1, 2, 2, 1] with use_dropout and no explicit structure: 0.3 after the first hidden layer
    (dict(layer_structure=[1, 2, 2, 1], activation_func="relu", use_dropout=True),
     ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Linear"]),
    (dict(layer_structure=[1, 2, 2, 1], activation_func="relu", add_layer_norm=True,
          use_dropout=True, last_layer_dropout=True, activate_output=True),
     ["Linear", "ReLU", "LayerNorm", "Dropout", "Linear", "ReLU", "LayerNorm", "Dropout",
      "Linear", "ReLU", "LayerNorm"]),
    (dict(layer_structure=[1, 0.5, 1], add_layer_norm=True, use_dropout=True,
          dropout_structure=[0, 0.25, 0]),
     ["Linear", "LayerNorm", "Dropout", "Linear", "LayerNorm"]),
    (dict(activation_func="prelu"), ["Linear", "PReLU", "Linear"]),
]
PARAMETRIC = {"Linear", "LayerNorm", "PReLU"}


@pytest.mark.parametrize("settings,layout", LAYOUTS)
def test_state_dict_keys_sit_at_a1111_indices(tmp_path, settings, layout):
    net = Hypernetwork(spec(sizes=[32], **settings).validate())
    assert [type(m).__name__ for m in net.layers[32][0].linear] == layout
    expected = []
    for index, kind in enumerate(layout):
        if kind in PARAMETRIC:
            expected.append(f"linear.{index}.weight")
            if kind != "PReLU":
                expected.append(f"linear.{index}.bias")
    path = tmp_path / "hn.pt"
    save_hypernetwork(path, net)
    data = raw(path)
    for part in data[32]:
        assert list(part) == expected
    # and the file loads back into the same layout
    loaded = load_hypernetwork(path)
    assert [type(m).__name__ for m in loaded.layers[32][1].linear] == layout


def test_explicit_index_lists_for_a_few_combinations():
    def keys(**settings):
        return list(HypernetworkModule(8, spec(**settings)).state_dict())

    assert keys() == ["linear.0.weight", "linear.0.bias", "linear.1.weight", "linear.1.bias"]
    assert keys(activation_func="relu") == \
        ["linear.0.weight", "linear.0.bias", "linear.2.weight", "linear.2.bias"]
    assert keys(activation_func="relu", add_layer_norm=True, activate_output=True) == [
        "linear.0.weight", "linear.0.bias", "linear.2.weight", "linear.2.bias",
        "linear.3.weight", "linear.3.bias", "linear.5.weight", "linear.5.bias"]
    assert keys(activation_func="swish", add_layer_norm=True, use_dropout=True,
                dropout_structure=[0, 0.2, 0]) == [
        "linear.0.weight", "linear.0.bias", "linear.2.weight", "linear.2.bias",
        "linear.4.weight", "linear.4.bias", "linear.5.weight", "linear.5.bias"]


def test_widths_follow_layer_structure():
    module = HypernetworkModule(64, spec(layer_structure=[1, 1.5, 0.5, 1]))
    shapes = [tuple(v.shape) for k, v in module.state_dict().items() if k.endswith("weight")]
    assert shapes == [(96, 64), (32, 96), (64, 32)]


def test_round_trip_keeps_weights_and_settings(tmp_path):
    original = Hypernetwork(spec(layer_structure=[1, 1.5, 1], activation_func="elu",
                                 weight_initialization="KaimingNormal", add_layer_norm=True,
                                 use_dropout=True, dropout_structure=[0, 0.05, 0],
                                 step=300, sd_checkpoint="abcdef0123",
                                 sd_checkpoint_name="base").validate())
    path = tmp_path / "hn.pt"
    save_hypernetwork(path, original)
    loaded = load_hypernetwork(path)
    # last_layer_dropout is written as dropout_structure[-2] != 0, as A1111 writes it
    assert loaded.spec == dataclasses.replace(original.spec, last_layer_dropout=True)
    for size in (32, 64):
        for a, b in zip(original.layers[size], loaded.layers[size]):
            for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
                assert ka == kb and torch.equal(va, vb)
    assert hypernetwork_checksum(loaded) == hypernetwork_checksum(original)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    # saving the loaded one writes the same dict
    again = tmp_path / "again.pt"
    save_hypernetwork(again, loaded)
    first, second = raw(path), raw(again)
    assert list(first) == list(second)
    assert all(first[k] == second[k] for k in A1111_KEYS)


def test_a1111_weight_initialisation():
    torch.manual_seed(0)
    normal = HypernetworkModule(256, spec(add_layer_norm=True))
    linear, norm = normal.linear[0], normal.linear[1]
    assert linear.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.count_nonzero(linear.bias) == 0
    # A1111 gives LayerNorm weights N(0, 0.01) too, not ones
    assert norm.weight.abs().max() < 0.1 and torch.count_nonzero(norm.bias) == 0
    xavier = HypernetworkModule(256, spec(weight_initialization="XavierNormal")).linear[0]
    assert xavier.weight.std().item() == pytest.approx((2 / (256 + 512)) ** 0.5, rel=0.05)
    assert torch.count_nonzero(xavier.bias) == 0
    kaiming = HypernetworkModule(256, spec(weight_initialization="KaimingUniform")).linear[0]
    assert kaiming.weight.abs().max() <= (6 / 256) ** 0.5 + 1e-6
    assert kaiming.weight.std().item() == pytest.approx((2 / 256) ** 0.5, rel=0.05)


def test_activation_names_are_a1111s():
    assert ACTIVATIONS["swish"] is torch.nn.Hardswish
    assert ACTIVATIONS["linear"] is torch.nn.Identity
    for name in ("relu", "leakyrelu", "elu", "tanh", "sigmoid", "gelu", "mish", "silu",
                 "hardswish", "softplus", "prelu"):
        assert name in ACTIVATIONS
    assert "threshold" not in ACTIVATIONS  # needs arguments; A1111 cannot build it either


def test_forward_is_residual_and_strength_only_in_eval():
    module = HypernetworkModule(8, spec(weight_initialization="XavierNormal"))
    x = torch.randn(2, 3, 8)
    delta = module.linear(x)
    module.eval()
    torch.testing.assert_close(module(x, 0.5), x + 0.5 * delta)
    module.multiplier = 0.0
    assert torch.equal(module(x), x)
    module.train()
    torch.testing.assert_close(module(x, 0.0), x + delta)  # training ignores the multiplier


def test_default_dropout_structure_like_a1111():
    assert default_dropout_structure([1, 2, 1], False, True) == [0, 0, 0]
    assert default_dropout_structure([1, 2, 1], True, False) == [0, 0, 0]
    assert default_dropout_structure([1, 2, 1], True, True) == [0, 0.3, 0]
    assert default_dropout_structure([1, 2, 2, 1], True, False) == [0, 0.3, 0, 0]
    assert default_dropout_structure([1, 2, 2, 1], True, True) == [0, 0.3, 0.3, 0]


def _linear_state(dim, hidden, seed):
    generator = torch.Generator().manual_seed(seed)
    return {"linear1.weight": torch.randn(hidden, dim, generator=generator) * 0.1,
            "linear1.bias": torch.randn(hidden, generator=generator) * 0.1,
            "linear2.weight": torch.randn(dim, hidden, generator=generator) * 0.1,
            "linear2.bias": torch.randn(dim, generator=generator) * 0.1}


def test_oldest_files_with_linear1_linear2_load(tmp_path):
    path = tmp_path / "old.pt"
    state_k, state_v = _linear_state(32, 64, 1), _linear_state(32, 64, 2)
    save_torch_legacy({32: (state_k, state_v)}, path)
    net = load_hypernetwork(path)
    assert net.spec.name == "old" and net.spec.layer_structure == [1, 2, 1]
    assert net.spec.activation_func == "linear" and net.spec.activate_output is True
    assert net.spec.step == 0 and net.spec.sd_checkpoint is None
    module = net.layers[32][0]
    x = torch.randn(1, 5, 32)
    expected = x + (x @ state_k["linear1.weight"].T + state_k["linear1.bias"]) \
        @ state_k["linear2.weight"].T + state_k["linear2.bias"]
    torch.testing.assert_close(module(x), expected)
    resaved = tmp_path / "resaved.pt"
    save_hypernetwork(resaved, net)
    assert list(raw(resaved)[32][0]) == ["linear.0.weight", "linear.0.bias", "linear.1.weight",
                                          "linear.1.bias"]


def test_missing_activate_output_means_true(tmp_path):
    # written by an A1111 version before activate_output: the activation follows every layer
    template = Hypernetwork(spec(sizes=[32], activation_func="relu", add_layer_norm=True,
                                 activate_output=True).validate())
    data = to_a1111_dict(template)
    for key in ("activate_output", "dropout_structure", "last_layer_dropout", "optional_info"):
        del data[key]
    path = tmp_path / "no_activate_output.pt"
    save_torch_legacy(data, path)
    net = load_hypernetwork(path)
    assert net.spec.activate_output is True
    assert [type(m).__name__ for m in net.layers[32][0].linear] == \
        ["Linear", "ReLU", "LayerNorm", "Linear", "ReLU", "LayerNorm"]
    assert net.spec.dropout_structure == [0, 0, 0]


def test_missing_dropout_structure_is_derived_like_a1111(tmp_path):
    def old_file(last_layer_dropout):
        # an A1111 file from before dropout_structure: use_dropout + last_layer_dropout only
        net = Hypernetwork(spec(sizes=[32], layer_structure=[1, 2, 2, 1], use_dropout=True,
                                last_layer_dropout=last_layer_dropout).validate())
        data = to_a1111_dict(net)
        del data["dropout_structure"]
        return data

    path = tmp_path / "hn.pt"
    with_last = old_file(True)
    save_torch_legacy(with_last, path)
    net = load_hypernetwork(path)
    assert net.spec.dropout_structure == [0, 0.3, 0.3, 0] and net.spec.use_dropout is True
    assert [type(m).__name__ for m in net.layers[32][0].linear] == \
        ["Linear", "Dropout", "Linear", "Dropout", "Linear"]

    without_last = old_file(False)
    del without_last["last_layer_dropout"]  # missing means False when loading
    save_torch_legacy(without_last, path)
    net = load_hypernetwork(path)
    assert net.spec.dropout_structure == [0, 0.3, 0, 0]
    assert [type(m).__name__ for m in net.layers[32][0].linear] == \
        ["Linear", "Dropout", "Linear", "Linear"]

    del with_last["last_layer_dropout"]  # weights laid out with the second Dropout: no fit
    save_torch_legacy(with_last, path)
    with pytest.raises(HypernetworkFormatError, match="does not match"):
        load_hypernetwork(path)


def test_checksums(tmp_path):
    net = Hypernetwork(spec().validate())
    before = hypernetwork_checksum(net)
    assert len(before) == 10
    with torch.no_grad():
        net.layers[64][1].linear[0].weight[0, 0] += 1
    assert hypernetwork_checksum(net) != before
    path = tmp_path / "hn.pt"
    save_hypernetwork(path, net)
    assert file_shorthash(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:10]


# ---- bad input -------------------------------------------------------------------------------

def test_parse_floats():
    assert parse_floats("1, 2, 1", "layer_structure") == [1.0, 2.0, 1.0]
    assert parse_floats("1,1.5 ,0.5,1", "layer_structure") == [1.0, 1.5, 0.5, 1.0]
    with pytest.raises(ValueError, match=r"layer_structure: 'x' at position 2 is not a number"):
        parse_floats("1, x, 1", "layer_structure")
    with pytest.raises(ValueError, match=r"dropout_structure: enter numbers"):
        parse_floats("  ", "dropout_structure")
    with pytest.raises(ValueError, match=r"layer_structure: .*not a finite"):
        parse_floats("1, nan, 1", "layer_structure")


@pytest.mark.parametrize("settings,message", [
    (dict(layer_structure=[2, 2, 1]), r"layer_structure: must start and end with 1"),
    (dict(layer_structure=[1, 2, 1.5]), r"layer_structure: must start and end with 1"),
    (dict(layer_structure=[1]), r"layer_structure: needs at least 2 values"),
    (dict(layer_structure=[1, "two", 1]), r"layer_structure: must be a list of numbers"),
    (dict(layer_structure=[1, 0, 1]), r"layer_structure: 0 at position 2 must be greater"),
    (dict(layer_structure=[1, 0.01, 1]), r"layer_structure: 0.01 .* 0 units for size 32"),
    (dict(use_dropout=True, dropout_structure=[0, 0.1]),
     r"dropout_structure: needs 3 values, one per layer"),
    (dict(use_dropout=True, dropout_structure=[0, 1.5, 0]),
     r"dropout_structure: 1.5 at position 2 is not a probability"),
    (dict(use_dropout=True, dropout_structure=[0.1, 0.1, 0]),
     r"dropout_structure: must start and end with 0"),
    (dict(use_dropout=False, dropout_structure=[0, 0.1, 0]),
     r"dropout_structure: has non-zero values but use_dropout is off"),
    (dict(activation_func="foo"), r"activation_func: unknown 'foo'; choose from linear, relu"),
    (dict(weight_initialization="Zeros"), r"weight_initialization: unknown 'Zeros'"),
    (dict(sizes=[]), r"sizes: choose at least one"),
    (dict(sizes=[768, "320"]), r"sizes: '320' is not a positive whole number"),
    (dict(name=" "), r"name: must not be empty"),
])
def test_bad_settings_name_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        spec(**settings).validate()
    with pytest.raises(ValueError, match=message):
        Hypernetwork(spec(**settings))


def test_embedding_file_is_not_a_hypernetwork(tmp_path):
    path = tmp_path / "my-embedding.pt"
    save_torch_legacy({"string_to_token": {"*": 265},
                       "string_to_param": {"*": torch.zeros(2, 768)}, "name": "x", "step": 1},
                      path)
    with pytest.raises(HypernetworkFormatError, match=r"my-embedding.pt: .*embedding"):
        load_hypernetwork(path)


def test_random_bytes_are_not_a_hypernetwork(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(HypernetworkFormatError, match=r"noise.pt: not a hypernetwork"):
        load_hypernetwork(path)


def test_other_bad_files(tmp_path):
    with pytest.raises(HypernetworkFormatError, match="missing.pt: no such file"):
        load_hypernetwork(tmp_path / "missing.pt")
    path = tmp_path / "strings.pt"
    save_torch_legacy({"768": ({}, {}), "layer_structure": [1, 2, 1]}, path)
    with pytest.raises(HypernetworkFormatError, match=r"strings.pt: .*size keys are text"):
        load_hypernetwork(path)
    save_torch_legacy([1, 2, 3], path)
    with pytest.raises(HypernetworkFormatError, match=r"strings.pt: .*holds a list"):
        load_hypernetwork(path)
    # weights that do not fit the file's own settings
    data = to_a1111_dict(Hypernetwork(spec(sizes=[32]).validate()))
    data["activation_func"] = "relu"
    data["is_layer_norm"] = True
    save_torch_legacy(data, path)
    with pytest.raises(HypernetworkFormatError, match=r"strings.pt: the key module of size 32 "
                                                      r"does not match"):
        load_hypernetwork(path)
    data = to_a1111_dict(Hypernetwork(spec(sizes=[32]).validate()))
    data["layer_structure"] = [2, 1]
    save_torch_legacy(data, path)
    with pytest.raises(HypernetworkFormatError, match=r"strings.pt: bad hypernetwork settings: "
                                                      r"layer_structure: must start and end"):
        load_hypernetwork(path)


def test_save_wants_pt(tmp_path):
    with pytest.raises(ValueError, match=r"hn.safetensors: save hypernetworks as .pt"):
        save_hypernetwork(tmp_path / "hn.safetensors", Hypernetwork(spec().validate()))


def test_weights_are_saved_as_float32(tmp_path):
    net = Hypernetwork(spec(sizes=[32], add_layer_norm=True).validate()).to(torch.bfloat16)
    path = tmp_path / "hn.pt"
    save_hypernetwork(path, net)
    for part in raw(path)[32]:
        assert all(value.dtype == torch.float32 for value in part.values())
