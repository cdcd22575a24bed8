"""What both backends share: checking input, and turning a vector into the bytes they
store (metadata JSON + safetensors tensor bytes) and back, with the integrity check.

A backend only decides where those bytes live and how a write becomes atomic.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, replace

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from vector_store.base import (
    StoredDataDamaged,
    StoredVector,
    VectorMeta,
    VectorNotFound,
    VectorStoreError,
    content_id_of,
    shown,
)

KINDS = ("actadd", "constant")
NAME_RULE = "1-128 characters of A-Z a-z 0-9 . _ -, not starting with 'v-' (reserved for content ids)"
_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
_CONTENT_ID_PATTERN = re.compile(r"v-[0-9a-f]{40}")
_LAYER_KEY = re.compile(r"layer\.(0|[1-9][0-9]*)")
MAX_COMPUTATION_KEY_LENGTH = 256


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and bool(_NAME_PATTERN.fullmatch(name)) and not name.startswith("v-")


def check_name(name: object) -> str:
    if not is_valid_name(name):
        raise VectorStoreError(f"bad vector name {shown(name)}: a name is {NAME_RULE}")
    return name  # type: ignore[return-value]


def is_content_id(content_id: object) -> bool:
    return isinstance(content_id, str) and bool(_CONTENT_ID_PATTERN.fullmatch(content_id))


def check_content_id(content_id: object) -> str:
    """A malformed id can name nothing stored, so it is reported as not found."""
    if not is_content_id(content_id):
        raise VectorNotFound(f"{content_id!r} is not a content id (expected 'v-' and 40 hex digits)")
    return content_id  # type: ignore[return-value]


def check_computation_key(key: object) -> str:
    if not isinstance(key, str) or not 0 < len(key) <= MAX_COMPUTATION_KEY_LENGTH:
        raise VectorStoreError(
            f"bad computation key {key!r}: expected a non-empty string of at most "
            f"{MAX_COMPUTATION_KEY_LENGTH} characters"
        )
    return key


def checked_directions(vector: StoredVector) -> dict[int, torch.Tensor]:
    """The vector's directions as contiguous CPU float32 ``[k, hidden]`` tensors, after
    checking that they agree with its metadata; VectorStoreError names what does not."""
    meta = vector.meta
    if not isinstance(meta, VectorMeta):
        raise VectorStoreError(f"vector.meta must be a VectorMeta, got {type(meta).__name__}")
    if meta.kind not in KINDS:
        raise VectorStoreError(f"meta.kind is {meta.kind!r}; expected one of {KINDS}")
    if isinstance(meta.hidden_size, bool) or not isinstance(meta.hidden_size, int) or meta.hidden_size <= 0:
        raise VectorStoreError(f"meta.hidden_size must be a positive int, got {meta.hidden_size!r}")
    if not isinstance(meta.model_fingerprint, str) or not meta.model_fingerprint:
        raise VectorStoreError("meta.model_fingerprint must be a non-empty string")
    for name in ("source", "stats"):
        value = getattr(meta, name)
        if not isinstance(value, dict):
            raise VectorStoreError(f"meta.{name} must be a dict, got {type(value).__name__}")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise VectorStoreError(f"meta.{name} is not plain JSON: {error}") from None
    if not vector.directions:
        raise VectorStoreError("the vector has no directions (expected at least one layer)")

    directions: dict[int, torch.Tensor] = {}
    rows = None
    for layer, tensor in vector.directions.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise VectorStoreError(f"layer {layer!r}: layers are non-negative ints")
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise VectorStoreError(f"layer {layer}: expected a tensor [k, hidden], got {shape}")
        k, hidden = tensor.shape
        if hidden != meta.hidden_size:
            raise VectorStoreError(f"layer {layer}: hidden size {hidden} != meta.hidden_size {meta.hidden_size}")
        if k == 0:
            raise VectorStoreError(f"layer {layer}: the direction has no rows (k = 0)")
        if meta.kind == "constant" and k != 1:
            raise VectorStoreError(f"layer {layer}: a constant vector has k = 1 row, got k = {k}")
        if rows is not None and k != rows:
            raise VectorStoreError(f"layer {layer}: k = {k} rows, but other layers have k = {rows}")
        rows = k
        as_float32 = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if not torch.isfinite(as_float32).all():
            raise VectorStoreError(f"layer {layer}: the direction holds NaN or infinite values")
        directions[layer] = as_float32
    return directions


@dataclass(frozen=True)
class EncodedVector:
    """One vector as stored: ``tensor_bytes`` is a safetensors file holding ``layer.<L>``
    float32 ``[k, hidden]``; ``meta_json`` is the full VectorMeta (``created`` included)."""

    content_id: str
    meta_json: str
    created: float
    tensor_bytes: bytes
    tensor_sha256: str
    shapes_json: str  # {"<layer>": [k, hidden]}: what a listing shows, kept beside the tensors


def encode(vector: StoredVector) -> EncodedVector:
    """Check and serialize; ``created`` is stamped now if the caller left it at 0."""
    directions = checked_directions(vector)
    meta = vector.meta if vector.meta.created else replace(vector.meta, created=time.time())
    tensor_bytes = save_tensors({f"layer.{layer}": directions[layer] for layer in sorted(directions)})
    return EncodedVector(
        content_id=content_id_of(meta, directions),
        meta_json=json.dumps(asdict(meta), sort_keys=True, allow_nan=False),
        created=meta.created,
        tensor_bytes=tensor_bytes,
        tensor_sha256=hashlib.sha256(tensor_bytes).hexdigest(),
        shapes_json=json.dumps({str(layer): list(directions[layer].shape) for layer in sorted(directions)}),
    )


def decode_meta(content_id: str, meta_json: str | bytes) -> VectorMeta:
    try:
        return VectorMeta(**json.loads(meta_json))
    except (TypeError, ValueError) as error:
        raise StoredDataDamaged(f"stored metadata of {content_id} is unreadable: {error}") from None


def encode_calibration(calibration: dict) -> str:
    try:
        return json.dumps(calibration, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise VectorStoreError(f"a calibration must be plain JSON: {error}") from None


def decode_calibration(content_id: str, body: str | bytes) -> dict:
    try:
        calibration = json.loads(body)
    except ValueError as error:
        raise StoredDataDamaged(f"stored calibration of {content_id} is unreadable: {error}") from None
    if not isinstance(calibration, dict) or not isinstance(calibration.get("version"), int):
        raise StoredDataDamaged(f"stored calibration of {content_id} is unreadable: not an object with a version")
    return calibration


def decode_shapes(content_id: str, shapes_json: str | bytes | None) -> dict[int, list[int]] | None:
    """The stored ``layer -> [k, hidden]``; None for an entry stored before shapes were kept."""
    if shapes_json is None:
        return None
    try:
        return {int(layer): [int(n) for n in shape] for layer, shape in json.loads(shapes_json).items()}
    except (TypeError, ValueError, AttributeError) as error:
        raise StoredDataDamaged(f"stored shapes of {content_id} are unreadable: {error}") from None


def decode(content_id: str, meta_json: str | bytes, tensor_bytes: bytes, tensor_sha256: str) -> StoredVector:
    """Rebuild a stored vector and prove it is still what ``content_id`` names; a
    VectorStoreError naming the id if its bytes changed."""
    if hashlib.sha256(tensor_bytes).hexdigest() != tensor_sha256:
        raise StoredDataDamaged(f"stored tensors of {content_id} are corrupted: their sha256 changed")
    meta = decode_meta(content_id, meta_json)
    try:
        tensors = load_tensors(tensor_bytes)
    except (SafetensorError, ValueError) as error:
        raise StoredDataDamaged(f"stored tensors of {content_id} are unreadable: {error}") from None
    directions = {}
    for key, tensor in tensors.items():
        match = _LAYER_KEY.fullmatch(key)
        if match is None:
            raise StoredDataDamaged(f"stored tensors of {content_id} hold an unexpected tensor {key!r}")
        directions[int(match.group(1))] = tensor
    if content_id_of(meta, directions) != content_id:
        raise StoredDataDamaged(f"stored vector {content_id} is corrupted: its content no longer hashes to its id")
    return StoredVector(meta=meta, directions=directions)

