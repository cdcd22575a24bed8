"""Identities: which model a vector belongs to, and which computation made it.

A vector only makes sense for the exact weights it was computed on, so the model
fingerprint hashes the weight files themselves, not just the model's name.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

from vector_store.base import VectorStoreError

_SIDECAR_NAME = ".steer-fingerprint.json"
_HASH_CHUNK_BYTES = 1 << 20


def model_shape(model_dir: str | os.PathLike[str]) -> tuple[str, int, int]:
    """(architecture, hidden size, decoder layer count) from ``model_dir/config.json``."""
    config_path = Path(model_dir) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise VectorStoreError(
            f"{config_path} does not exist: is {model_dir} a Hugging Face model directory?"
        ) from None
    except (OSError, ValueError) as error:
        raise VectorStoreError(f"cannot read {config_path}: {error}") from None
    if not isinstance(config, dict):
        raise VectorStoreError(f"{config_path} is not a JSON object")
    # Multimodal configs keep the language model's sizes under text_config.
    text_config = config.get("text_config") or {}

    def first_int(*fields: str) -> int:
        for scope in (config, text_config):
            for field in fields:
                value = scope.get(field)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
        raise VectorStoreError(f"{config_path} has no positive int {' or '.join(fields)}")

    architectures = config.get("architectures")
    if not isinstance(architectures, list) or not architectures or not isinstance(architectures[0], str):
        raise VectorStoreError(f"{config_path} has no architectures list")
    return (
        architectures[0],
        first_int("hidden_size", "n_embd"),  # n_embd, n_layer: GPT-2's names
        first_int("num_hidden_layers", "n_layer"),
    )


def model_fingerprint(model_dir: str | os.PathLike[str], *, cache_home: str | os.PathLike[str] | None = None) -> str:
    """``<architecture>-h<hidden>-l<layers>-<16 hex of the weights' sha256>``.

    Weight files are ``*.safetensors`` (else ``*.bin``) directly in ``model_dir``. Each
    file's sha256 is cached by (name, size, mtime_ns) in a sidecar, so only changed files
    are hashed again: beside the weights, else (a read-only model directory) under
    ``cache_home`` (the user's cache directory, ``EngineSettings.cache_home``), else nowhere.
    """
    architecture, hidden_size, num_layers = model_shape(model_dir)
    model_path = Path(model_dir).resolve()
    weight_files = sorted(model_path.glob("*.safetensors")) or sorted(model_path.glob("*.bin"))
    if not weight_files:
        raise VectorStoreError(f"{model_dir} holds no *.safetensors or *.bin weight files")

    sidecars = _sidecar_paths(model_path, cache_home)
    known = _read_sidecars(sidecars)
    digest = hashlib.sha256()
    hashes: dict[str, dict] = {}
    for weight_file in weight_files:
        stat = weight_file.stat()
        entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        entry["sha256"] = _cached_sha256(known, weight_file.name, entry) or _file_sha256(weight_file)
        hashes[weight_file.name] = entry
        digest.update(f"{weight_file.name}\0{entry['sha256']}\n".encode())
    if all(known_files != hashes for known_files in known):
        _write_sidecar(sidecars, hashes)
    return f"{architecture}-h{hidden_size}-l{num_layers}-{digest.hexdigest()[:16]}"


def computation_key(
    model_fingerprint: str,
    layer: int | list[int],
    token_ids: list[list[int]],
    coeffs: list[float],
    method: str,
    pad_token_id: int | None,
    options: dict | None = None,
) -> str:
    """sha256 (hex) of the canonical JSON of everything that determines a contrast-pair
    computation's result: the same inputs always give the same key. ``layer`` is one layer or
    the list of layers one computation makes; ``options`` (plain JSON) holds any other input
    that changes the result, and enters the key only when given, so the keys of computations
    without options are the ones they always were."""
    layers = layer if isinstance(layer, list) else [layer]
    if not layers or not all(isinstance(one, int) and not isinstance(one, bool) and one >= 0 for one in layers):
        raise VectorStoreError(f"layer must be a non-negative int or a non-empty list of them, got {layer!r}")
    if not all(
        isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        for prompt in token_ids
    ):
        raise VectorStoreError("token_ids must be a list of lists of ints")
    if pad_token_id is not None and (isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int)):
        raise VectorStoreError(f"pad_token_id must be an int or None, got {pad_token_id!r}")
    # float(): 1 and 1.0 are the same coefficient and must give the same key.
    float_coeffs = [float(coeff) for coeff in coeffs]
    if not all(math.isfinite(coeff) for coeff in float_coeffs):
        raise VectorStoreError(f"coeffs must be finite numbers, got {coeffs!r}")
    inputs = {
        "model_fingerprint": model_fingerprint,
        "layer": layer,
        "token_ids": token_ids,
        "coeffs": float_coeffs,
        "method": method,
        "pad_token_id": pad_token_id,
    }
    if options is not None:
        inputs["options"] = options
    try:
        canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise VectorStoreError(f"options must be plain JSON: {error}") from None
    return hashlib.sha256(canonical.encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _sidecar_paths(model_path: Path, cache_home: str | os.PathLike[str] | None) -> list[Path]:
    """Where the hash cache may live, preferred first: beside the weights, else (a
    read-only model directory) in the user's cache, one file per model directory."""
    beside = model_path / _SIDECAR_NAME
    if cache_home is None:
        return [beside]
    path_digest = hashlib.sha256(str(model_path).encode()).hexdigest()[:24]
    return [beside, Path(cache_home) / "steer-server" / "fingerprints" / f"{path_digest}.json"]


def _cached_sha256(caches: list[dict[str, dict]], file_name: str, stat_entry: dict) -> str | None:
    """A cached hash is trusted only while the file's size and mtime_ns still match it."""
    for files in caches:
        entry = files.get(file_name, {})
        unchanged = all(entry.get(field) == value for field, value in stat_entry.items())
        if unchanged and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
    return None


def _read_sidecars(sidecars: list[Path]) -> list[dict[str, dict]]:
    """Every readable cache, each {file name: {size, mtime_ns, sha256}}."""
    caches = []
    for sidecar in sidecars:
        try:
            files = json.loads(sidecar.read_text()).get("files")
        except (OSError, ValueError, AttributeError):
            continue  # absent or damaged: the hashes are simply recomputed
        if isinstance(files, dict) and all(isinstance(entry, dict) for entry in files.values()):
            caches.append(files)
    return caches


def _write_sidecar(sidecars: list[Path], files: dict[str, dict]) -> None:
    """Atomic replace, so a concurrent reader never sees half a file; a cache that
    cannot be written anywhere only costs a rehash next time."""
    for sidecar in sidecars:
        tmp_path = None
        try:
            sidecar.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_path = tempfile.mkstemp(dir=sidecar.parent, prefix=sidecar.name + ".")
            with os.fdopen(fd, "w") as tmp:
                json.dump({"files": files}, tmp)
            os.replace(tmp_path, sidecar)
            return
        except OSError:
            if tmp_path is not None:
                Path(tmp_path).unlink(missing_ok=True)
