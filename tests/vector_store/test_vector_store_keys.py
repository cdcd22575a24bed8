"""Model fingerprints and computation keys."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from vector_store.base import VectorStoreError
from vector_store.keys import computation_key, model_fingerprint, model_shape


@pytest.fixture
def model_dir(tmp_path):
    directory = tmp_path / "tiny-llama"
    directory.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2}
    (directory / "config.json").write_text(json.dumps(config))
    save_file({"weight": torch.arange(32, dtype=torch.float32)}, directory / "model.safetensors")
    return directory


def test_fingerprint_is_readable_and_stable(model_dir):
    fingerprint = model_fingerprint(model_dir)
    assert fingerprint.startswith("LlamaForCausalLM-h64-l2-")
    assert len(fingerprint.rsplit("-", 1)[1]) == 16
    assert model_fingerprint(model_dir) == fingerprint
    assert model_fingerprint(str(model_dir)) == fingerprint


def test_fingerprint_changes_when_a_weight_byte_changes(model_dir):
    before = model_fingerprint(model_dir)
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    stat = weights.stat()
    weights.write_bytes(bytes(data))
    # Same size; move the mtime on explicitly so the test does not hang on timestamp granularity.
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert model_fingerprint(model_dir) != before


def test_fingerprint_uses_the_sidecar_cache(model_dir):
    fingerprint = model_fingerprint(model_dir)
    sidecar = json.loads((model_dir / ".steer-fingerprint.json").read_text())
    assert set(sidecar["files"]) == {"model.safetensors"}
    # A cached hash is used while size and mtime match: poisoning it shows it was read.
    sidecar["files"]["model.safetensors"]["sha256"] = "0" * 64
    (model_dir / ".steer-fingerprint.json").write_text(json.dumps(sidecar))
    assert model_fingerprint(model_dir) != fingerprint


def test_unwritable_model_dir_caches_under_the_cache_home(model_dir, tmp_path):
    # A directory where the sidecar would go makes writing it fail, even for root.
    (model_dir / ".steer-fingerprint.json").mkdir()
    cache_home = tmp_path / "cache"
    fingerprint = model_fingerprint(model_dir, cache_home=cache_home)
    cached = list((cache_home / "steer-server" / "fingerprints").glob("*.json"))
    assert len(cached) == 1
    assert set(json.loads(cached[0].read_text())["files"]) == {"model.safetensors"}
    assert model_fingerprint(model_dir, cache_home=cache_home) == fingerprint
    # Without a cache home the hashes are recomputed: same fingerprint, nothing written.
    assert model_fingerprint(model_dir) == fingerprint
    assert len(list((cache_home / "steer-server" / "fingerprints").glob("*.json"))) == 1
    assert sorted(p.name for p in model_dir.iterdir()) == [
        ".steer-fingerprint.json", "config.json", "model.safetensors"
    ]


def test_gpt2_config_names_and_bin_weights(tmp_path):
    config = {"architectures": ["GPT2LMHeadModel"], "n_embd": 768, "n_layer": 12}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "pytorch_model.bin").write_bytes(b"weights")
    assert model_shape(tmp_path) == ("GPT2LMHeadModel", 768, 12)
    assert model_fingerprint(tmp_path).startswith("GPT2LMHeadModel-h768-l12-")


def test_missing_pieces_are_clear_errors(tmp_path):
    with pytest.raises(VectorStoreError, match="config.json does not exist"):
        model_fingerprint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}))
    with pytest.raises(VectorStoreError, match="num_hidden_layers or n_layer"):
        model_shape(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2})
    )
    with pytest.raises(VectorStoreError, match="no \\*.safetensors or \\*.bin weight files"):
        model_fingerprint(tmp_path)


def test_computation_key_is_canonical():
    key = computation_key("fp", 3, [[1, 2], [3]], [1, -1], "actadd", None)
    assert key == computation_key("fp", 3, [[1, 2], [3]], [1.0, -1.0], "actadd", None)
    assert len(key) == 64 and int(key, 16) >= 0
    others = [
        computation_key("fp2", 3, [[1, 2], [3]], [1.0, -1.0], "actadd", None),
        computation_key("fp", 4, [[1, 2], [3]], [1.0, -1.0], "actadd", None),
        computation_key("fp", 3, [[1, 2, 3]], [1.0, -1.0], "actadd", None),
        computation_key("fp", 3, [[1, 2], [3]], [1.0, -2.0], "actadd", None),
        computation_key("fp", 3, [[1, 2], [3]], [1.0, -1.0], "mean_diff", None),
        computation_key("fp", 3, [[1, 2], [3]], [1.0, -1.0], "actadd", 0),
        computation_key("fp", [3], [[1, 2], [3]], [1.0, -1.0], "actadd", None),
        computation_key("fp", [3, 4], [[1, 2], [3]], [1.0, -1.0], "actadd", None),
        computation_key("fp", 3, [[1, 2], [3]], [1.0, -1.0], "actadd", None, {"position": "mean"}),
    ]
    assert len({key, *others}) == 1 + len(others)
    # Options enter the key only when given: the keys computed before options existed stay.
    assert key == computation_key("fp", 3, [[1, 2], [3]], [1, -1], "actadd", None, None)


@pytest.mark.parametrize(
    "args",
    [
        ("fp", -1, [[1]], [1.0], "actadd", None),
        ("fp", 1, [["a"]], [1.0], "actadd", None),
        ("fp", 1, [[1]], [float("nan")], "actadd", None),
        ("fp", 1, [[1]], [1.0], "actadd", "pad"),
        ("fp", [], [[1]], [1.0], "actadd", None),
        ("fp", [1, -2], [[1]], [1.0], "actadd", None),
        ("fp", 1, [[1]], [1.0], "actadd", None, {"x": object()}),
    ],
)
def test_computation_key_rejects_bad_input(args):
    with pytest.raises(VectorStoreError):
        computation_key(*args)


def test_layer_outside_is_the_one_range_check():
    from vector_store import layer_outside

    assert [layer_outside(layer, 3) for layer in (0, 3)] == [None, None]  # the embeddings .. after the last block
    assert layer_outside(4, 3) == "4 is outside 0..3"
    assert layer_outside(-1, 3) == "-1 is outside 0..3"
