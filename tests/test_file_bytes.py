"""Every file format stays byte-identical for the same settings and seed (issue #18).

Each case below is a short run (2 steps, 64 px) of one method on the tiny demo models, in a
fresh data folder; every file the run writes or changes (outside the model cache: weights,
.optim sidecars, periodic copies, PNG embeddings, previews, settings and loss CSVs, kohya's
latent .npz) is hashed with sha256 and compared with tests/golden/file_hashes.json ({case:
{file path relative to the data folder: sha256}}, plus "_about" and, for saying what differs,
"_parts": each file's tensors / metadata values / storages, hashed). A change of any byte
fails here, naming the case and the file, and for a .safetensors file the tensors and metadata
keys that differ (for a .pt the storages, for an .optim the pickle or the optimizer tensors).

Regenerate the golden file deliberately (after a change meant to change bytes, or for a new
case) with

    DANLU_UPDATE_GOLDEN=1 python3 -m pytest tests/test_file_bytes.py

which runs each case twice and pins it only if both runs agree. Without that variable a missing
golden file or case fails.

What makes the runs repeatable:
- the wall clock is frozen (`time.time`) and the time zone is UTC: LoRA metadata's
  ss_training_started_at / ss_training_finished_at / modelspec.date and the dates of the zip
  entries inside kohya's latent .npz files come from it;
- Python's, numpy's and torch's global generators are seeded: kohya's ss_session_id is drawn
  from Python's, and Create hypernetwork draws the new file's weights from torch's;
- `uuid.uuid4` counts from a fixed value: DreamBooth / fine-tuning stamp each save with a
  `danlu.save_id` that pairs the file with its .optim sidecar;
- the run folders' date (outputs/<method>/<date>/<name>/) is written as DATE in the keys;
- the data folder is the working directory and Paths and every config path are relative to it,
  so no temporary path reaches a written file (settings-0.json holds the output's path);
- torch runs on THREADS threads: its CPU reductions split their sums by thread, and one thread
  instead of two changes trained LoRA and DreamBooth weights in their last bits.
Three things cannot be made repeatable from outside the writers and are hashed in a canonical
form that keeps every other byte (CANONICAL says which and why): the storage names (memory
addresses) of torch's legacy .pt format, the order of a .safetensors file's metadata entries,
and a hypernetwork sidecar's copy of its .pt's hash.
The hashes hold for this torch build and CPU kind (its vector instructions round differently):
the golden file records both, and elsewhere the test is skipped, saying why.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import pickletools
import random
import re
import shutil
import struct
import uuid
from pathlib import Path

import pytest

from tests.conftest import RecordingContext, kohya_photos, photo

GOLDEN = Path(__file__).resolve().parent / "golden" / "file_hashes.json"
UPDATE = os.environ.get("DANLU_UPDATE_GOLDEN") == "1"
FROZEN_TIME = 1_700_000_000.0  # 2023-11-14T22:13:20 UTC
SEED = 1234  # Python's, numpy's and torch's global generators
THREADS = 2
SD1, SD2, SDXL = "tiny-demo", "tiny-demo-sd2", "tiny-demo-sdxl"
DATE = re.compile(r"(?<=/)\d{4}-\d{2}-\d{2}(?=/)")


# ------------------------------------------------------------------ the inputs



def _captioned(root: Path, count: int = 2) -> Path:
    root.mkdir(parents=True)
    for i, caption in enumerate(["a woman in a space suit", "a cup of coffee", "a cat"][:count]):
        photo(i).save(root / f"{i:02}-img.png")
        (root / f"{i:02}-img.txt").write_text(caption)
    return root


# ------------------------------------------------------------------ the cases
# Each takes the case's Paths (cwd is its data folder), makes its inputs, yields, then runs
# one method: the files written (or changed) after the yield are what is pinned.

def _embedding(paths, name, model=SD1, fmt="pt"):
    from trainers.configs import CreateEmbeddingConfig
    from trainers.embeddings import create_embedding
    return create_embedding(CreateEmbeddingConfig(name=name, init_text="cat", vectors_per_token=2,
                                                  model=model, file_format=fmt).validate(), paths)


def _ti(paths, model=SD1, fmt="pt"):
    from trainers.configs import TextualInversionConfig
    from trainers.methods.textual_inversion import run
    _embedding(paths, "zxqtok", model, fmt)
    data = _captioned(paths.data_dir / "inputs")
    yield
    run(TextualInversionConfig(
        model=model, embedding="zxqtok", data_root=str(data),
        width=64, height=64, steps=2, save_every=1, preview_every=2, preview_steps=1,
        save_image_with_embedded=True, template="subject_filewords.txt", learn_rate="0.005",
        seed=3).validate(), RecordingContext(paths))


def case_textual_inversion_pt(paths):
    yield from _ti(paths, fmt="pt")


def case_textual_inversion_safetensors(paths):
    yield from _ti(paths, fmt="safetensors")


def case_textual_inversion_sdxl(paths):
    yield from _ti(paths, model=SDXL, fmt="safetensors")


def case_apt(paths):
    from trainers.configs import AptConfig
    from trainers.methods.apt import run
    _embedding(paths, "zxq")
    data = _captioned(paths.data_dir / "inputs", 1)
    yield
    run(AptConfig(model=SD1, embedding="zxq", data_root=str(data),
                  width=64, height=64, steps=2, save_every=1, preview_every=2, preview_steps=1,
                  learn_rate="0.05", seed=1, template="subject_filewords.txt",
                  latent_sampling="deterministic").validate(), RecordingContext(paths))


def case_xti(paths):
    from trainers.configs import XtiConfig
    from trainers.methods.xti import run
    data = _captioned(paths.data_dir / "inputs")
    yield
    run(XtiConfig(model=SD1, output_name="xtok", data_root=str(data),
                  width=64, height=64, steps=2, save_every=1, preview_every=0, learn_rate="0.05",
                  init_text="cat", num_vectors_per_token=2, template="subject_filewords.txt",
                  seed=2).validate(), RecordingContext(paths))


def case_hypernetwork(paths):
    from trainers.configs import CreateHypernetworkConfig, HypernetworkTrainingConfig
    from trainers.hypernetworks import create_hypernetwork
    from trainers.methods.hypernetwork import run
    create_hypernetwork(CreateHypernetworkConfig(
        name="hn", sizes=[32, 64], model=SD1, layer_structure="1, 2, 1", activation_func="relu",
        add_layer_norm=True).validate(), paths)
    data = _captioned(paths.data_dir / "inputs")
    yield
    run(HypernetworkTrainingConfig(
        model=SD1, hypernetwork="hn", data_root=str(data), width=64,
        height=64, steps=2, save_every=1, preview_every=0, learn_rate="0.001",
        seed=5).validate(), RecordingContext(paths))


def _lora(paths, model=SD1, **changes):
    from trainers.configs import LoraConfig
    from trainers.methods.lora import run
    data = kohya_photos(paths.data_dir / "train")
    base = dict(model=model, output_name="mylora", train_data_dir=str(data),
                resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16,
                network_dim=4, network_alpha=2.0, max_train_steps=2, save_every_n_steps=1,
                save_every_n_epochs=0, sample_at_first=False, learning_rate=1e-3, seed=7,
                save_precision="fp32")
    base.update(changes)
    yield
    run(LoraConfig(**base).validate(), RecordingContext(paths))


def case_lora_sd1_locon_fp16(paths):
    """Text encoder and U-Net, 3x3 convs (LoCon), fp16, and the diffusers (peft) copy."""
    yield from _lora(paths, conv_dim=2, conv_alpha=1.0, save_precision="fp16", save_diffusers_format=True)


def case_lora_sd1_fp32(paths):
    yield from _lora(paths, network_train_unet_only=True)


def case_lora_sd2(paths):
    yield from _lora(paths, model=SD2)


def case_lora_sdxl(paths):
    yield from _lora(paths, model=SDXL)


def _dreambooth(paths):
    from trainers.configs import DreamBoothConfig
    from trainers.methods.dreambooth import run
    data = paths.data_dir / "instance"
    data.mkdir()
    for i in range(2):
        photo(i).save(data / f"{i}.png")
    yield
    run(DreamBoothConfig(
        model=SD1, output_name="mydb", train_data_dir=str(data),
        resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16,
        instance_prompt="a photo of zxq dog", max_train_steps=2, learning_rate=1e-3,
        sample_at_first=False, save_precision="fp16", seed=3).validate(), RecordingContext(paths))


def case_dreambooth(paths):
    yield from _dreambooth(paths)


def case_fine_tune(paths):
    from trainers.configs import FineTuneConfig
    from trainers.methods import fine_tune
    images = paths.data_dir / "images"
    images.mkdir()
    for i, (w, h) in enumerate([(64, 64), (96, 64), (64, 96)]):
        photo(i, 96).resize((w, h)).save(images / f"img{i}.png")
    (paths.data_dir / "meta.json").write_text(json.dumps({
        f"img{i}": {"caption": f"qzx painting number {i}", "tags": f"tag{i}, outdoors"}
        for i in range(3)}))
    yield
    fine_tune.run(FineTuneConfig(
        model=SD1, output_name="myft", train_data_dir="images", in_json="meta.json",
        resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16,
        max_train_steps=2, learning_rate=1e-3, sample_at_first=False, save_precision="fp32",
        seed=5).validate(), RecordingContext(paths))


def case_extract_lora(paths):
    """From the DreamBooth case's file (its bytes are pinned there)."""
    from trainers.configs import ExtractLoraConfig
    from trainers.extract_lora import run
    for _ in _dreambooth(paths):
        pass
    yield  # the files written from here on are this case's
    run(ExtractLoraConfig(checkpoint="mydb.safetensors", model=SD1, output_name="fromdb", rank=8,
                          conv_rank=4, save_precision="fp16").validate(), RecordingContext(paths))


CASES = {name[len("case_"):]: fn for name, fn in globals().items() if name.startswith("case_")}


# ------------------------------------------------------------------ running a case

@pytest.fixture(scope="module")
def demo_models(tmp_path_factory) -> dict:
    """The three tiny demo models, built once for the module."""
    from trainers.families import demo_families
    from trainers.tiny_model import build_tiny_model
    root = tmp_path_factory.mktemp("golden-models")
    return {name: build_tiny_model(root / name, family=family)
            for name, family in demo_families().items()}


class _Counter:
    """Stands for uuid.uuid4: UUIDs 1, 2, 3 ... in the order asked for."""

    def __init__(self):
        self.n = 0

    def __call__(self):
        self.n += 1
        return uuid.UUID(int=self.n)


@contextlib.contextmanager
def repeatable(data_dir: Path):
    """The clock, time zone, the global random generators, uuid4, cwd and torch's thread count
    fixed."""
    import time

    import numpy as np
    import torch
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(time, "time", lambda: FROZEN_TIME)
        patch.setattr(time, "time_ns", lambda: int(FROZEN_TIME * 1e9))
        patch.setattr(uuid, "uuid4", _Counter())
        patch.setenv("TZ", "UTC")
        patch.chdir(data_dir)
        time.tzset()
        state, numpy_state = random.getstate(), np.random.get_state()
        random.seed(SEED)
        np.random.seed(SEED)
        torch.set_num_threads(THREADS)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(SEED)  # Create hypernetwork draws its weights from it
                yield
        finally:
            torch.set_num_threads(threads)
            random.setstate(state)
            np.random.set_state(numpy_state)
    time.tzset()


# torch's legacy format (A1111 .pt embeddings and hypernetworks, every .optim sidecar) names each
# tensor's storage by its memory address (str(storage._cdata)) and writes the storages sorted by
# that name, so two identical runs write different bytes. Nothing outside torch can fix the
# address, so such a file is hashed in a canonical form: every byte as written, but the storage
# names replaced by their order of first use and the storages in that order.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
STORAGE_ITEMSIZE = {"FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "DoubleStorage": 8,
                    "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1,
                    "ByteStorage": 1, "BoolStorage": 1}
# What is hashed in a canonical form rather than as written, and why (nothing else is):
CANONICAL = {
    "legacy torch storage names and order (.pt, .optim)":
        "torch.serialization._legacy_save names each storage str(storage._cdata), its memory "
        "address, and writes them sorted by that name",
    "safetensors __metadata__ entry order (.safetensors)":
        "the safetensors writer (Rust) keeps the metadata in a HashMap, whose order differs "
        "from one map to the next, even in one process; the keys, values, tensor layout and "
        "tensor bytes are all hashed as written",
    "an .optim sidecar's 'hash' when it is A1111's short sha256 of the file beside it (.optim)":
        "a hypernetwork's sidecar is paired with its .pt by the first 10 hex of the .pt's "
        "sha256 (as A1111 does), and the .pt's bytes hold memory addresses (above); the "
        "sidecar is checked to hold exactly that value, then hashed with a fixed word for it",
}
PAIRED_FILE_HASH = "<sha256[:10] of the paired file>"


class _Stub(dict):
    """Stands for any object in a legacy pickle while its storages are listed."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state):
        pass


class _StorageLister(pickle.Unpickler):
    def __init__(self, file):
        super().__init__(file)
        self.storages = []  # (name, storage type, number of elements), in order of first use

    def find_class(self, module, name):
        if module == "torch" and name.endswith("Storage"):
            return ("storage type", name)
        return _Stub

    def persistent_load(self, pid):
        _, storage_type, key, _, numel, _ = pid
        if key not in [seen[0] for seen in self.storages]:
            self.storages.append((key, storage_type[1], numel))
        return _Stub()


def _pickle_end(data: bytes, start: int) -> int:
    stream = io.BytesIO(data)
    stream.seek(start)
    for _ in pickletools.genops(stream):
        pass
    return stream.tell()


def _pickled_str(text: str) -> bytes:
    """A str as pickle protocol 2 writes it (BINUNICODE)."""
    encoded = text.encode()
    return b"X" + struct.pack("<I", len(encoded)) + encoded


def legacy_torch_parts(data: bytes, paired_hash: str | None = None) -> dict[str, bytes] | None:
    """The parts of a legacy torch file with its storages named by order of first use:
    {"pickle": header and object pickles, "storage <i>": each storage's bytes}; None when the
    bytes are not a legacy torch file. `paired_hash`, when the pickle holds it as a string, is
    written as PAIRED_FILE_HASH."""
    try:
        magic_end = _pickle_end(data, 0)
        if pickle.loads(data[:magic_end]) != LEGACY_MAGIC:
            return None
        main_start = _pickle_end(data, _pickle_end(data, magic_end))
        main_end = _pickle_end(data, main_start)
        keys_end = _pickle_end(data, main_end)
    except Exception:
        return None
    lister = _StorageLister(io.BytesIO(data[main_start:main_end]))
    lister.load()
    written = pickle.loads(data[main_end:keys_end])  # sorted by name: by address
    sizes = {key: (numel, STORAGE_ITEMSIZE[kind]) for key, kind, numel in lister.storages}
    records, offset = {}, keys_end
    for key in written:
        numel, itemsize = sizes[key]
        end = offset + 8 + numel * itemsize
        records[key] = data[offset:end]
        offset = end
    assert offset == len(data), "bytes after the last storage"
    main = data[main_start:main_end]
    renames = [(key, f"storage{index}") for index, (key, _, _) in enumerate(lister.storages)]
    if paired_hash and main.count(_pickled_str(paired_hash)) == 1:
        renames.append((paired_hash, PAIRED_FILE_HASH))
    for old, new in renames:
        assert main.count(_pickled_str(old)) == 1, f"{old} is not in the pickle once"
        main = main.replace(_pickled_str(old), _pickled_str(new))
    parts = {"pickle": data[:main_start] + main}
    parts.update({f"storage {i}": records[key] for i, (key, _, _) in enumerate(lister.storages)})
    return parts


def _safetensors_header(data: bytes) -> tuple[int, dict] | None:
    if len(data) < 8:
        return None
    size = struct.unpack("<Q", data[:8])[0]
    try:
        return size, json.loads(data[8:8 + size], object_pairs_hook=dict)
    except ValueError:
        return None


def _serialized(header: dict, size: int) -> bytes:
    """The header as the safetensors writer lays it out: compact JSON padded with spaces."""
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return text + b" " * (size - len(text))


def safetensors_canonical(data: bytes) -> bytes:
    """The file with its __metadata__ entries in sorted order, when the header re-serializes to
    exactly its written bytes (else the bytes as written: nothing is hidden)."""
    found = _safetensors_header(data)
    if found is None:
        return data
    size, header = found
    if _serialized(header, size) != data[8:8 + size] or "__metadata__" not in header:
        return data
    ordered = {"__metadata__": dict(sorted(header["__metadata__"].items())),
               **{k: v for k, v in header.items() if k != "__metadata__"}}
    return data[:8] + _serialized(ordered, size) + data[8 + size:]


def safetensors_parts(data: bytes) -> dict[str, bytes] | None:
    """{"header layout": the header with the metadata left out, "metadata <key>": each value,
    "tensor <name>": each tensor's bytes}; None when the bytes are not a safetensors file."""
    found = _safetensors_header(data)
    if found is None:
        return None
    size, header = found
    metadata = header.pop("__metadata__", {}) or {}
    parts = {"header layout": json.dumps(header, sort_keys=True).encode()}
    parts.update({f"metadata {k}": str(v).encode() for k, v in metadata.items()})
    body = data[8 + size:]
    parts.update({f"tensor {name}": body[info["data_offsets"][0]:info["data_offsets"][1]]
                  for name, info in header.items()})
    return parts


def _parts(path: Path, data: bytes) -> dict[str, bytes] | None:
    if path.suffix == ".safetensors":
        return safetensors_parts(data)
    if path.suffix == ".optim":
        paired = path.with_suffix("")
        return legacy_torch_parts(data, hashlib.sha256(paired.read_bytes()).hexdigest()[:10]
                                  if paired.is_file() else None)
    if path.suffix == ".pt":
        return legacy_torch_parts(data)
    return None


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> tuple[str, dict[str, str]]:
    """(sha256 of the file, or of its canonical form (CANONICAL); {part: short sha256} of a
    safetensors or legacy torch file's parts, for saying what differs: each tensor and metadata
    value, the pickle and each storage of a .pt, the pickle and the tensors of an .optim)."""
    data = path.read_bytes()
    parts = _parts(path, data) or {}
    if path.suffix in (".pt", ".optim") and parts:
        whole = _sha(b"".join(_sha(name.encode() + value).encode() for name, value in parts.items()))
    elif path.suffix == ".safetensors":
        whole = _sha(safetensors_canonical(data))
    else:
        whole = _sha(data)
    if path.suffix == ".optim" and parts:  # its storages are numbered, not named: one part
        parts = {"pickle": parts.pop("pickle"), "optimizer tensors": b"".join(parts.values())}
    return whole, {name: _sha(value)[:10] for name, value in parts.items()}


def _files(data_dir: Path) -> dict[str, Path]:
    """Every file under data_dir but the model cache, by relative path (the run folders' date
    written as DATE)."""
    found = {}
    for path in sorted(data_dir.rglob("*")):
        rel = path.relative_to(data_dir).as_posix()
        if path.is_file() and not rel.startswith(".cache/"):
            found[DATE.sub("DATE", rel)] = path
    return found


def run_case(name: str, root: Path, models: dict) -> dict[str, tuple[str, dict[str, str]]]:
    """Run case `name` in <root>/<name> (a fresh data folder with the demo models); return
    {relative path: file_digest} of the files the case wrote."""
    from core.paths import Paths
    from trainers import models as model_cache
    data_dir = root / name
    data_dir.mkdir(parents=True)
    for model, folder in models.items():
        shutil.copytree(folder, data_dir / ".cache" / model)
    model_cache._cache.clear()  # each case loads its models from its own folder
    with repeatable(data_dir):
        paths = Paths(Path(".")).ensure()  # relative: no temporary path reaches a file
        steps = CASES[name](paths)
        next(steps)  # the inputs are ready; what is written from here on is the case's
        before = {rel: file_digest(path) for rel, path in _files(data_dir).items()}
        for _ in steps:
            pass
        after = {rel: file_digest(path) for rel, path in _files(data_dir).items()}
    return {rel: digest for rel, digest in after.items() if before.get(rel) != digest}


# ------------------------------------------------------------------ comparing with the golden file

def environment() -> dict:
    """What the hashes depend on besides the code: torch's build and the CPU kind it computes for."""
    import torch
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": THREADS}


def compare(case: str, golden: dict, got: dict[str, tuple[str, dict[str, str]]]) -> list[str]:
    """What differs between the golden file's record of `case` and `got` (from run_case), one
    line per file, naming the tensors, metadata keys or storages that differ."""
    if case not in golden:
        return [f"{case}: no record in {GOLDEN.name}; run DANLU_UPDATE_GOLDEN=1 python3 -m pytest "
                "tests/test_file_bytes.py to add it deliberately"]
    expected, parts = golden[case], golden.get("_parts", {}).get(case, {})
    problems = [f"{case}: {rel} was written before and is not now"
                for rel in sorted(set(expected) - set(got))]
    problems += [f"{case}: {rel} is written now and was not before"
                 for rel in sorted(set(got) - set(expected))]
    for rel in sorted(set(expected) & set(got)):
        digest, now = got[rel]
        if digest == expected[rel]:
            continue
        before = parts.get(rel, {})
        changed = sorted(name for name in set(before) | set(now) if before.get(name) != now.get(name))
        shown = ", ".join(changed[:12]) + (f" and {len(changed) - 12} more" if len(changed) > 12 else "")
        problems.append(f"{case}: {rel} differs (sha256 {expected[rel][:12]} -> {digest[:12]})"
                        + (f"; parts that differ: {shown}" if changed else ""))
    return problems


def _record(results: dict) -> dict:
    golden = {"_about": {
        "what": "sha256 of every file a short run of each case writes (tests/test_file_bytes.py)",
        "regenerate": "DANLU_UPDATE_GOLDEN=1 python3 -m pytest tests/test_file_bytes.py",
        "canonical": CANONICAL, "environment": environment()}}
    golden.update({case: {rel: digest for rel, (digest, _) in sorted(files.items())}
                   for case, files in sorted(results.items())})
    golden["_parts"] = {case: {rel: parts for rel, (_, parts) in sorted(files.items()) if parts}
                        for case, files in sorted(results.items())
                        if any(parts for _, parts in files.values())}
    return golden


def _golden_text(golden: dict) -> str:
    """JSON with one line per file (each file's parts on its line)."""
    lines = []
    for key, value in golden.items():
        if key == "_parts":
            cases = [f"  {json.dumps(case)}: {{\n" + ",\n".join(
                f"   {json.dumps(rel)}: {json.dumps(parts, separators=(',', ':'))}"
                for rel, parts in files.items()) + "\n  }" for case, files in value.items()]
            lines.append(' "_parts": {\n' + ",\n".join(cases) + "\n }")
        else:
            lines.append(f" {json.dumps(key)}: " + json.dumps(value, indent=1).replace("\n", "\n "))
    return "{\n" + ",\n".join(lines) + "\n}\n"


@pytest.fixture(scope="module")
def golden() -> dict:
    if UPDATE:
        return {}
    if not GOLDEN.is_file():
        pytest.fail(f"{GOLDEN} is missing; make it deliberately with DANLU_UPDATE_GOLDEN=1 "
                    "python3 -m pytest tests/test_file_bytes.py", pytrace=False)
    recorded = json.loads(GOLDEN.read_text())
    made_with = recorded.get("_about", {}).get("environment")
    if made_with != environment():
        pytest.skip(f"{GOLDEN.name} was made with {made_with}, this is {environment()}: another "
                    "torch build or CPU kind rounds differently; regenerate it here from the "
                    "code before the change")
    return recorded


@pytest.fixture(scope="module")
def results(demo_models):
    """{case: run_case result} of the cases run so far; with DANLU_UPDATE_GOLDEN=1 the golden
    file is written from them when the module ends (all cases must have run)."""
    found = {}
    yield found
    if UPDATE:
        missing = sorted(set(CASES) - set(found))
        assert not missing, f"not rewriting {GOLDEN.name}: cases {missing} did not run"
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(_golden_text(_record(found)))


@pytest.mark.parametrize("case", list(CASES))
def test_written_files_are_byte_identical(case, golden, results, demo_models, tmp_path):
    got = run_case(case, tmp_path, demo_models)
    assert got, f"{case} wrote no file"
    if UPDATE:  # pin only what repeats: run it again in this process and compare
        again = run_case(case, tmp_path / "again", demo_models)
        differ = sorted(rel for rel in set(got) | set(again) if got.get(rel) != again.get(rel))
        assert not differ, f"{case}: not repeatable, so not pinned: {differ}"
    results[case] = got
    if not UPDATE:
        problems = compare(case, golden, got)
        assert not problems, "files differ from the golden record:\n  " + "\n  ".join(problems)


def test_a_changed_tensor_metadata_value_or_optimizer_value_is_reported(demo_models, tmp_path):
    """The comparison can fail: one bit of a tensor, one metadata value and one optimizer value
    changed in files a real run wrote are each named, with the case and the file."""
    import safetensors
    import safetensors.torch
    import torch
    case = "lora_sd1_fp32"
    got = run_case(case, tmp_path, demo_models)
    golden = _record({case: got})
    data_dir = tmp_path / case
    files = _files(data_dir)

    def now():
        return {rel: file_digest(files[rel]) for rel in got}
    assert compare(case, golden, now()) == []

    final = "models/Lora/mylora.safetensors"
    raw = bytearray(files[final].read_bytes())
    size, header = _safetensors_header(bytes(raw))
    tensor = sorted(k for k in header if k != "__metadata__")[0]
    raw[8 + size + header[tensor]["data_offsets"][0]] ^= 1
    files[final].write_bytes(bytes(raw))
    copy = "outputs/lora/DATE/mylora/checkpoints/mylora-1.safetensors"
    with safetensors.safe_open(files[copy], "pt") as handle:
        metadata = handle.metadata()
    safetensors.torch.save_file(safetensors.torch.load_file(files[copy]), files[copy],
                                metadata={**metadata, "ss_steps": "9"})
    sidecar = final + ".optim"
    payload = torch.load(files[sidecar], weights_only=True)
    next(iter(payload["optimizer_state_dict"]["state"].values()))["exp_avg"].view(-1)[0] += 1
    torch.save(payload, files[sidecar], _use_new_zipfile_serialization=False)

    problems = compare(case, golden, now())
    assert len(problems) == 3, problems
    by_file = {line.split(": ")[1].split(" differs")[0]: line for line in problems}
    assert set(by_file) == {final, copy, sidecar}
    assert by_file[final].endswith(f"parts that differ: tensor {tensor}")
    assert by_file[copy].endswith("parts that differ: metadata ss_steps")
    assert by_file[sidecar].endswith("parts that differ: optimizer tensors")
    assert all(line.startswith(f"{case}: ") for line in problems)
    assert compare(case, {}, now())[0].startswith(f"{case}: no record")
    del golden[case][copy]
    assert f"{copy} is written now and was not before" in "\n".join(compare(case, golden, now()))
