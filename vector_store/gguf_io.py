"""llama.cpp control vectors in and out: the GGUF files that repeng and llama.cpp's
``cvector-generator`` write and ``llama-cli --control-vector`` reads.

The file: ``general.architecture = "controlvector"``, ``controlvector.model_hint``
(string), ``controlvector.layer_count`` (uint32), and one float32 tensor
``direction.N`` of shape ``[hidden]`` per steered layer.

Layer numbering, as read in the sources (ggml-org/llama.cpp, vgel/repeng):
- llama.cpp ``src/models/*.cpp`` (e.g. ``gpt2.cpp``): at the end of decoder block ``il``
  (0-based), after the FFN's residual add, ``cur = build_cvec(cur, il)``, and
  ``llama_adapter_cvec::apply_to`` (``src/llama-adapter.cpp``) adds ``tensors[il]`` to it.
  So direction N is added to the OUTPUT of block N.
- llama.cpp ``common/common.cpp`` ``common_control_vector_load_one``: tensor
  ``direction.N`` fills layer N; N = 0 is refused ("invalid (zero) direction tensor layer
  index") and then the whole file is skipped; indices need not be consecutive (gaps are
  zero-filled); ``controlvector.layer_count`` is never read. ``llama-adapter.cpp`` only
  has tensors for N = 1 .. n_layer-1 (larger N is silently ignored).
- repeng ``extract.py``: ``direction.{layer}`` comes from ``hidden_states[layer + 1]``, the
  output of block ``layer``: the same convention. repeng and cvector-generator both
  write ``layer_count`` = the number of direction tensors.

Here layer L is the residual stream ENTERING block L (``hidden_states[L]``), which is the
output of block L-1. Hence ``direction.N`` <-> our layer ``N + 1``:
- export writes our layers 2 .. num_layers as ``direction.1 .. direction.{num_layers-1}``;
  layer 0 (the embeddings) has no llama.cpp counterpart and layer 1 would be
  ``direction.0``, which llama.cpp refuses, so both are errors;
- import reads ``direction.N`` as layer N + 1 and accepts N = 0 as repeng means it (the
  output of block 0), though llama.cpp itself would refuse such a file.
Only constant vectors (k = 1, the same addition at every position) exist in llama.cpp.
"""
from __future__ import annotations

import os
import re
import shutil
import struct
import tempfile
import uuid
from pathlib import Path
from typing import BinaryIO

import gguf
import numpy as np
import torch

from vector_store import codec
from vector_store.base import StoredVector, VectorMeta, VectorStoreError

ARCH = "controlvector"
MODEL_HINT_KEY = f"{ARCH}.model_hint"
LAYER_COUNT_KEY = f"{ARCH}.layer_count"
_DIRECTION_NAME = re.compile(r"direction\.([0-9]+)")
# What a control vector may hold besides its tensors: a few short strings in practice. The
# bound keeps the reader's work in proportion to a real file (it builds objects per entry).
MAX_METADATA_BYTES = 64 * 1024
_HEAD_BYTES = 4 + 4 + 8 + 8  # magic, version, tensor count, key-value count
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, dimension count, type, offset
_TENSOR_OVERHEAD_BYTES = 64 + 32  # a direction.N tensor's info, and its alignment padding


def direction_index(layer: int) -> int:
    """Our layer L (entering block L) -> llama.cpp's ``direction.N`` (output of block N)."""
    return layer - 1


def layer_of_direction(index: int) -> int:
    """llama.cpp's ``direction.N`` (output of block N) -> our layer N + 1."""
    return index + 1


def export_gguf(
    vector: StoredVector,
    path_or_file: str | os.PathLike[str] | BinaryIO,
    model_hint: str,
    *,
    num_layers: int,
) -> None:
    """Write ``vector`` (constant, each layer ``[1, hidden]``) as a llama.cpp control vector:
    ``direction.{L-1}`` float32 ``[hidden]`` for each layer L. ``num_layers`` is the model's
    decoder block count; every layer must lie in 2..num_layers. A path is replaced
    atomically; a binary file object receives the bytes."""
    directions = codec.checked_directions(vector)
    if vector.meta.kind != "constant":
        rows = next(iter(directions.values())).shape[0]
        raise VectorStoreError(
            "only constant vectors (k = 1, added at every position) can be exported to a llama.cpp "
            f"control vector; this is an {vector.meta.kind} sequence of k = {rows} positions"
        )
    for layer in sorted(directions):
        if not 2 <= layer <= num_layers:
            raise VectorStoreError(
                f"layer {layer} cannot be exported: llama.cpp steers the outputs of blocks 1..{num_layers - 1}, "
                f"which are layers 2..{num_layers} here (layer 1 would be direction.0, which llama.cpp refuses)"
            )

    if isinstance(path_or_file, (str, os.PathLike)):
        target = Path(path_or_file)
        # Written beside the target, then renamed: a reader never sees half a file. A plain
        # open (not mkstemp, which makes it 0600) leaves the file with the usual permissions.
        staged = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            _write_control_vector(staged, model_hint, directions)
            os.replace(staged, target)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
    else:
        with tempfile.TemporaryDirectory() as tmp_dir:
            staged_path = Path(tmp_dir) / "vector.gguf"
            _write_control_vector(staged_path, model_hint, directions)
            with staged_path.open("rb") as exported:
                shutil.copyfileobj(exported, path_or_file)


def _write_control_vector(path: Path, model_hint: str, directions: dict[int, torch.Tensor]) -> None:
    writer = gguf.GGUFWriter(path, ARCH)
    writer.add_string(MODEL_HINT_KEY, model_hint)
    writer.add_uint32(LAYER_COUNT_KEY, len(directions))  # as repeng and cvector-generator write it
    for layer in sorted(directions):
        writer.add_tensor(f"direction.{direction_index(layer)}", directions[layer][0].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def import_gguf(
    data: bytes | str | os.PathLike[str],
    *,
    model_fingerprint: str,
    hidden_size: int,
    num_layers: int,
) -> StoredVector:
    """Read a llama.cpp control vector (file bytes or a path) for a model with
    ``hidden_size`` and ``num_layers`` decoder blocks: ``direction.N`` ``[hidden]`` becomes
    our layer N + 1 as ``[1, hidden]``. VectorStoreError says what is wrong with the file."""
    if isinstance(data, (bytes, bytearray)):
        _check_declared(bytes(data[:_HEAD_BYTES]), len(data), hidden_size, num_layers)
        with tempfile.TemporaryDirectory() as tmp_dir:
            tmp_path = Path(tmp_dir) / "upload.gguf"
            tmp_path.write_bytes(data)
            model_hint, directions = _read_control_vector(tmp_path, hidden_size, num_layers)
    else:
        path = Path(data)
        try:
            with path.open("rb") as file:
                _check_declared(file.read(_HEAD_BYTES), path.stat().st_size, hidden_size, num_layers)
        except FileNotFoundError:
            raise VectorStoreError(f"no GGUF file at {path}") from None
        model_hint, directions = _read_control_vector(path, hidden_size, num_layers)
    vector = StoredVector(
        meta=VectorMeta(
            model_fingerprint=model_fingerprint,
            hidden_size=hidden_size,
            kind="constant",
            method="gguf",
            source={"model_hint": model_hint},
        ),
        directions=directions,
    )
    codec.checked_directions(vector)  # e.g. NaN in the file is refused here, not at use
    return vector


def _check_declared(head: bytes, size: int, hidden_size: int, num_layers: int) -> None:
    """Refuse a file larger than any control vector for this model, or whose header declares
    more tensors than the model has layers or more entries than its bytes can hold, before
    gguf's reader walks it (the reader trusts the declared counts)."""
    largest = _HEAD_BYTES + MAX_METADATA_BYTES + num_layers * (_TENSOR_OVERHEAD_BYTES + 4 * hidden_size)
    if size > largest:
        raise VectorStoreError(
            f"the file has {size} bytes; a control vector for this model ({num_layers} directions of "
            f"{hidden_size} float32) has at most {largest}"
        )
    if len(head) < _HEAD_BYTES:
        return  # the reader names what is missing
    big_endian = struct.unpack_from("<I", head, 4)[0] & 0xFFFF == 0  # as the reader detects it
    tensor_count, kv_count = struct.unpack_from(">QQ" if big_endian else "<QQ", head, 8)
    if tensor_count > num_layers:
        raise VectorStoreError(
            f"the file declares {tensor_count} tensors; a control vector for this model has at most "
            f"{num_layers} (direction.0..direction.{num_layers - 1})"
        )
    if kv_count * _MIN_KV_BYTES + tensor_count * _MIN_TENSOR_INFO_BYTES > size - _HEAD_BYTES:
        raise VectorStoreError(
            f"not a readable GGUF file (truncated or damaged?): it declares {kv_count} key-value pairs and "
            f"{tensor_count} tensors, more than its {size} bytes can hold"
        )


def _read_control_vector(path: Path, hidden_size: int, num_layers: int) -> tuple[str | None, dict[int, torch.Tensor]]:
    """(model hint, {our layer: float32 [1, hidden]}), the tensors copied out of the file."""
    try:
        reader = gguf.GGUFReader(path)
    except FileNotFoundError:
        raise VectorStoreError(f"no GGUF file at {path}") from None
    except (ValueError, IndexError, KeyError, OverflowError, RecursionError) as error:
        # The reader fails in these ways on truncated or damaged bytes (RecursionError: arrays
        # of arrays nested deeper than Python recurses).
        raise VectorStoreError(f"not a readable GGUF file (truncated or damaged?): {error}") from None

    arch = _string_field(reader, "general.architecture")
    if arch != ARCH:
        raise VectorStoreError(
            f"this GGUF is not a control vector: its general.architecture is {arch!r}, expected {ARCH!r}"
        )
    model_hint = _string_field(reader, MODEL_HINT_KEY)

    directions: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        match = _DIRECTION_NAME.fullmatch(tensor.name)
        if match is None:
            raise VectorStoreError(
                f"unexpected tensor {tensor.name!r}: a control vector holds only direction.N tensors"
            )
        index = int(match.group(1))
        layer = layer_of_direction(index)
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or len(tensor.shape) != 1:
            raise VectorStoreError(
                f"{tensor.name}: expected float32 [hidden], "
                f"got {tensor.tensor_type.name} {[int(n) for n in tensor.shape]}"
            )
        if tensor.n_elements != hidden_size:
            raise VectorStoreError(
                f"{tensor.name} has hidden size {tensor.n_elements}, but the model's hidden size is {hidden_size}"
            )
        if layer > num_layers:
            raise VectorStoreError(
                f"{tensor.name} steers the output of block {index} (layer {layer} here), "
                f"but the model has blocks 0..{num_layers - 1} (layers 0..{num_layers})"
            )
        if layer in directions:
            raise VectorStoreError(f"{tensor.name}: a second tensor for direction {index}")
        directions[layer] = torch.from_numpy(np.array(tensor.data, dtype=np.float32)).reshape(1, hidden_size)
    if not directions:
        raise VectorStoreError("the control vector holds no direction.N tensors")
    return model_hint, directions


def _string_field(reader: gguf.GGUFReader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    if field.types != [gguf.GGUFValueType.STRING]:
        raise VectorStoreError(f"GGUF field {key} is not a string")
    try:
        return field.contents()
    except UnicodeDecodeError:
        raise VectorStoreError(f"GGUF field {key} is not valid UTF-8") from None
