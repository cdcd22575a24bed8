"""Crafted hostile GGUF and safetensors files, written byte by byte so that their declared
sizes, counts, offsets and types can lie about the body (not a test module).

Each builder returns a small body (kilobytes at most) whatever it declares.
"""
from __future__ import annotations

import json
import struct

import numpy as np

GGUF_MAGIC = b"GGUF"
# GGUF value types (gguf.GGUFValueType) and tensor types (gguf.GGMLQuantizationType) used here.
UINT32, STRING, ARRAY = 4, 8, 9
F32, F16, Q4_0, I32 = 0, 1, 2, 26
ALIGNMENT = 32
HUGE = 2**62  # a count or size no body can hold


def gguf_string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def gguf_kv(key: str, value_type: int, value: bytes) -> bytes:
    return gguf_string(key) + struct.pack("<I", value_type) + value


def control_vector_kvs(layer_count: int = 1) -> list[bytes]:
    return [gguf_kv("general.architecture", STRING, gguf_string("controlvector")),
            gguf_kv("controlvector.model_hint", STRING, gguf_string("llama")),
            gguf_kv("controlvector.layer_count", UINT32, struct.pack("<I", layer_count))]


def gguf_tensor_info(name: str, dims: list[int], tensor_type: int = F32, offset: int = 0) -> bytes:
    return (gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
            + struct.pack("<IQ", tensor_type, offset))


def gguf_file(kvs: list[bytes], infos: list[bytes], data: bytes = b"", *, tensor_count: int | None = None,
              kv_count: int | None = None) -> bytes:
    """A GGUF v3 file; ``tensor_count``/``kv_count`` default to the true counts and may lie."""
    head = GGUF_MAGIC + struct.pack("<IQQ", 3, len(infos) if tensor_count is None else tensor_count,
                                    len(kvs) if kv_count is None else kv_count)
    body = head + b"".join(kvs) + b"".join(infos)
    return body + b"\0" * (-len(body) % ALIGNMENT) + data


def control_vector(hidden: int, values: np.ndarray | None = None, index: int = 0) -> bytes:
    """A well-formed control vector with one tensor ``direction.{index}``."""
    values = np.ones(hidden, np.float32) if values is None else values.astype(np.float32)
    return gguf_file(control_vector_kvs(), [gguf_tensor_info(f"direction.{index}", [hidden])], values.tobytes())


def hostile_ggufs(hidden: int, num_layers: int) -> dict[str, tuple[bytes, str]]:
    """Name -> (a GGUF body that must be refused, words its refusal must say)."""
    valid = control_vector(hidden)
    kvs = control_vector_kvs()
    info = gguf_tensor_info("direction.0", [hidden])
    zeros = b"\0" * 4 * hidden
    unreadable = "not a readable GGUF file"
    nested = struct.pack("<IQ", ARRAY, 1) * 2000  # arrays of arrays 2000 deep: deeper than Python recurses
    return {
        "huge tensor dimension": (gguf_file(kvs, [gguf_tensor_info("direction.0", [HUGE])], b"\0" * 64), unreadable),
        "huge 2-d dimensions": (gguf_file(kvs, [gguf_tensor_info("direction.0", [2**32, 2**32])], b"\0" * 64),
                                unreadable),
        "huge dimension count": (gguf_file(kvs, [gguf_string("direction.0") + struct.pack("<I", 2**32 - 1)]),
                                 unreadable),
        "huge tensor count": (gguf_file(kvs, [info], zeros, tensor_count=HUGE), f"declares {HUGE} tensors"),
        "more tensors than layers": (gguf_file(kvs, [gguf_tensor_info("", [])] * 2000),
                                     f"declares 2000 tensors; a control vector for this model has at most "
                                     f"{num_layers}"),
        "huge kv count": (gguf_file(kvs, [info], kv_count=HUGE), f"declares {HUGE} key-value pairs"),
        "huge string length": (gguf_file([struct.pack("<Q", HUGE) + b"general.architecture"], []), unreadable),
        "huge array length": (gguf_file([*kvs, gguf_kv("x.array", ARRAY, struct.pack("<IQ", STRING, HUGE))], []),
                              unreadable),
        "nested arrays": (gguf_file([*kvs, gguf_kv("x.nested", ARRAY, nested)], []), unreadable),
        "larger than any control vector": (gguf_file([*kvs, gguf_kv("x.padding", STRING, gguf_string("x" * 2**17))],
                                                     []), "bytes; a control vector for this model"),
        "huge tensor offset": (gguf_file(kvs, [gguf_tensor_info("direction.0", [hidden], offset=HUGE)], zeros),
                               unreadable),
        "truncated header": (valid[:20], unreadable),
        "truncated key-value pairs": (valid[:60], unreadable),
        "truncated tensor data": (valid[:-8], unreadable),
        "bad magic": (b"GGUX" + valid[4:], "GGUF magic invalid"),
        "unknown version": (valid[:4] + struct.pack("<I", 99) + valid[8:], "version 99"),
        "unknown value type": (gguf_file([gguf_kv("general.architecture", 99, b"")], []), "GGUFValueType"),
        "unknown tensor type": (gguf_file(kvs, [gguf_tensor_info("direction.0", [hidden], tensor_type=9999)], zeros),
                                "GGMLQuantizationType"),
        "float16 tensor": (gguf_file(kvs, [gguf_tensor_info("direction.0", [hidden], F16)], b"\0" * 2 * hidden),
                           f"direction.0: expected float32 [hidden], got F16 [{hidden}]"),
        "int32 tensor": (gguf_file(kvs, [gguf_tensor_info("direction.0", [hidden], I32)], zeros),
                         "expected float32 [hidden], got I32"),
        "quantized tensor": (gguf_file(kvs, [gguf_tensor_info("direction.0", [hidden], Q4_0)], b"\0" * hidden),
                             "expected float32 [hidden], got Q4_0"),
        "2-d tensor": (gguf_file(kvs, [gguf_tensor_info("direction.0", [hidden, 2])], b"\0" * 8 * hidden),
                       f"expected float32 [hidden], got F32 [{hidden}, 2]"),
        "wrong hidden size": (control_vector(hidden + 1, np.ones(hidden + 1)), f"hidden size {hidden + 1}"),
        "NaN values": (control_vector(hidden, np.full(hidden, np.nan)), "NaN or infinite"),
        "infinite values": (control_vector(hidden, np.full(hidden, np.inf)), "NaN or infinite"),
        "layer beyond the model": (control_vector(hidden, index=10_000), "direction.10000 steers the output of block"),
        "not a control vector": (gguf_file([gguf_kv("general.architecture", STRING, gguf_string("llama"))], []),
                                 "not a control vector"),
        "non-UTF-8 tensor name": (gguf_file(kvs, [info[:8] + b"\xff" * 11 + info[19:]], zeros), "utf-8"),
        "no tensors": (gguf_file(kvs, []), "no direction.N tensors"),
    }


def safetensors_file(header: dict | bytes, data: bytes = b"", *, declared_header_size: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared_header_size is None else declared_header_size) + raw + data


def hostile_safetensors(hidden: int) -> dict[str, tuple[bytes, str]]:
    """Name -> (a safetensors body that must be refused, words its refusal must say)."""
    row = np.ones(hidden, np.float32).tobytes()
    unreadable = "not a readable safetensors file"

    def one(dtype: str = "F32", shape: list[int] | None = None, offsets: list[int] | None = None,
            data: bytes = row, name: str = "layer.1") -> bytes:
        return safetensors_file({name: {"dtype": dtype, "shape": [1, hidden] if shape is None else shape,
                                        "data_offsets": [0, len(data)] if offsets is None else offsets}}, data)

    def wrong_dtype(dtype: str, data: bytes, shape: list[int] | None = None) -> tuple[bytes, str]:
        return one(dtype, shape, data=data), f"dtype {dtype}: expected a floating type"

    return {
        "header claims gigabytes": (safetensors_file(b"{}", declared_header_size=8 * 2**30),
                                    f"header declares {8 * 2**30} bytes"),
        "header claims more than the body": (safetensors_file(b'{"layer.1": {}}', declared_header_size=4096),
                                             "header declares 4096 bytes; the body holds 15"),
        "tensor claims gigabytes": (one(shape=[2**20, 2**20], offsets=[0, 4 * 2**40]), unreadable),
        "shape product overflows": (one(shape=[2**40, 2**40, 2**40], offsets=[0, 4]), "overflow"),
        "offsets past the body": (one(offsets=[0, 4 * hidden + 1024]), unreadable),
        "overlapping offsets": (safetensors_file({
            "layer.1": {"dtype": "F32", "shape": [1, hidden], "data_offsets": [0, 4 * hidden]},
            "layer.2": {"dtype": "F32", "shape": [1, hidden], "data_offsets": [0, 4 * hidden]}}, row),
            "invalid offset"),
        "reversed offsets": (one(offsets=[4 * hidden, 0]), "invalid offset"),
        "shape disagrees with offsets": (one(shape=[2, hidden]), unreadable),
        "wrong hidden size": (one(shape=[1, hidden // 2], data=row[: 2 * hidden]),
                              f"rows have {hidden // 2} values, the served model's hidden size is {hidden}"),
        "3-d tensor": (one(shape=[1, 1, hidden]), f"got shape [1, 1, {hidden}]"),
        "scalar tensor": (one(shape=[], data=row[:4]), "got shape []"),
        "no rows": (one(shape=[0, hidden], data=b""), f"got shape [0, {hidden}]"),
        "int64 tensor": wrong_dtype("I64", np.ones(hidden, np.int64).tobytes()),
        "bool tensor": wrong_dtype("BOOL", b"\1" * hidden),
        "complex tensor": wrong_dtype("C64", np.ones(hidden, np.complex64).tobytes()),
        "float8 tensor": wrong_dtype("F8_E4M3", b"\0" * hidden),
        "float8 e8m0 tensor": wrong_dtype("F8_E8M0", b"\0" * hidden),
        "float4 tensor": wrong_dtype("F4", b"\0" * (hidden // 2)),
        "unknown dtype": (one("F99"), "unknown variant `F99`"),
        "NaN values": (one(data=np.full(hidden, np.nan, np.float32).tobytes()), "NaN or infinite"),
        "infinite values": (one(data=np.full(hidden, -np.inf, np.float32).tobytes()), "NaN or infinite"),
        "float64 beyond float32": (one("F64", data=np.full(hidden, 1e300).tobytes()), "NaN or infinite"),
        "not a layer name": (one(name="../layer.1"), "body['../layer.1']: tensors are named layer.N"),
        "superscript layer digit": (one(name="layer.\u00b2"), "tensors are named layer.N"),
        "layer beyond the model": (one(name="layer.99999999999999999"), "99999999999999999 is outside"),
        "layer of 5000 digits": (one(name="layer." + "9" * 5000), "tensors are named layer.N"),
        "header not JSON": (safetensors_file(b"{not json"), "invalid JSON in header"),
        "header not an object": (safetensors_file(b"[1, 2]"), "invalid JSON in header"),
        "no tensors": (safetensors_file({"__metadata__": {"a": "b"}}), "holds no tensors"),
        "shorter than its length field": (b"\x08", "header too small"),
    }
