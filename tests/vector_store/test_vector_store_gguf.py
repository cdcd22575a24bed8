"""llama.cpp control vectors: export/import, and the layer mapping read back from the file itself.

Mapping under test: our layer L (entering block L) <-> llama.cpp ``direction.{L-1}``
(added to the output of block L-1); see vector_store/gguf_io.py for the sources.
"""
from __future__ import annotations

import io

import gguf
import numpy as np
import pytest
import torch

from vector_store.base import StoredVector, VectorMeta, VectorStoreError
from vector_store.gguf_io import export_gguf, import_gguf

HIDDEN = 16
NUM_LAYERS = 6
FINGERPRINT = "TinyForCausalLM-h16-l6-0123456789abcdef"


def constant_vector(layers=(2, 4, 6)) -> StoredVector:
    generator = torch.Generator().manual_seed(7)
    return StoredVector(
        meta=VectorMeta(model_fingerprint=FINGERPRINT, hidden_size=HIDDEN, kind="constant", method="mean_diff"),
        directions={layer: torch.randn(1, HIDDEN, generator=generator) for layer in layers},
    )


def exported_bytes(vector: StoredVector, model_hint: str = "llama") -> bytes:
    buffer = io.BytesIO()
    export_gguf(vector, buffer, model_hint, num_layers=NUM_LAYERS)
    return buffer.getvalue()


def import_bytes(data: bytes, hidden_size: int = HIDDEN, num_layers: int = NUM_LAYERS) -> StoredVector:
    return import_gguf(data, model_fingerprint=FINGERPRINT, hidden_size=hidden_size, num_layers=num_layers)


def test_round_trip_is_exact(tmp_path):
    vector = constant_vector()
    path = tmp_path / "happy.gguf"
    export_gguf(vector, path, "llama", num_layers=NUM_LAYERS)
    for source in (path, str(path), path.read_bytes()):
        imported = import_gguf(source, model_fingerprint=FINGERPRINT, hidden_size=HIDDEN, num_layers=NUM_LAYERS)
        assert imported.layers == vector.layers
        for layer in vector.layers:
            assert torch.equal(imported.directions[layer], vector.directions[layer])
        assert imported.meta == VectorMeta(
            model_fingerprint=FINGERPRINT, hidden_size=HIDDEN, kind="constant", method="gguf",
            source={"model_hint": "llama"},
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["happy.gguf"]  # no staged file left


def test_the_file_itself_has_the_llama_cpp_layout(tmp_path):
    """Read with gguf's own reader, independent of import_gguf."""
    vector = constant_vector(layers=(2, 5, 6))  # not consecutive: llama.cpp zero-fills the gaps
    path = tmp_path / "v.gguf"
    path.write_bytes(exported_bytes(vector, model_hint="llama"))
    reader = gguf.GGUFReader(path)

    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "llama"
    layer_count = reader.get_field("controlvector.layer_count")
    assert layer_count.types == [gguf.GGUFValueType.UINT32]
    assert layer_count.contents() == 3  # the number of directions, as repeng writes it

    tensors = {tensor.name: tensor for tensor in reader.tensors}
    # our layer L -> direction.{L-1}: the output of block L-1 is the stream entering block L
    assert sorted(tensors) == ["direction.1", "direction.4", "direction.5"]
    for layer in vector.layers:
        tensor = tensors[f"direction.{layer - 1}"]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(tensor.shape) == [HIDDEN]
        np.testing.assert_array_equal(np.asarray(tensor.data), vector.directions[layer][0].numpy())


def test_a_repeng_style_file_imports_at_the_next_layer(tmp_path):
    """A file written the way repeng writes it (direction.{block} for blocks 1..n-1)."""
    path = tmp_path / "repeng.gguf"
    writer = gguf.GGUFWriter(path, "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", NUM_LAYERS - 1)
    for block in range(NUM_LAYERS - 1, 0, -1):  # repeng's default order: last block first
        writer.add_tensor(f"direction.{block}", np.full(HIDDEN, block, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    imported = import_gguf(path, model_fingerprint=FINGERPRINT, hidden_size=HIDDEN, num_layers=NUM_LAYERS)
    assert imported.layers == list(range(2, NUM_LAYERS + 1))
    for layer in imported.layers:
        assert torch.equal(imported.directions[layer], torch.full((1, HIDDEN), float(layer - 1)))


def test_a_truncated_file_is_a_clear_error():
    data = exported_bytes(constant_vector())
    for length in (0, 3, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(VectorStoreError, match="not a readable GGUF file"):
            import_bytes(data[:length])


def test_a_gguf_that_is_not_a_control_vector_is_refused(tmp_path):
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("direction.1", np.zeros(HIDDEN, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(VectorStoreError, match="not a control vector.*'llama'"):
        import_bytes(path.read_bytes())


def test_a_hidden_size_mismatch_is_refused():
    with pytest.raises(VectorStoreError, match="direction.1 has hidden size 16, but the model's hidden size is 32"):
        import_bytes(exported_bytes(constant_vector()), hidden_size=32)


def test_a_direction_beyond_the_model_is_refused():
    # direction.5 (the output of block 5) needs at least 6 blocks
    with pytest.raises(VectorStoreError, match="direction.5 steers the output of block 5"):
        import_bytes(exported_bytes(constant_vector()), num_layers=5)


def test_an_unexpected_tensor_is_refused(tmp_path):
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(path, "controlvector")
    writer.add_tensor("direction.x", np.zeros(HIDDEN, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(VectorStoreError, match="unexpected tensor 'direction.x'"):
        import_bytes(path.read_bytes())


def test_an_actadd_sequence_cannot_be_exported():
    generator = torch.Generator().manual_seed(1)
    sequence = StoredVector(
        meta=VectorMeta(model_fingerprint=FINGERPRINT, hidden_size=HIDDEN, kind="actadd", method="actadd"),
        directions={3: torch.randn(5, HIDDEN, generator=generator)},
    )
    with pytest.raises(VectorStoreError, match="only constant vectors .* actadd sequence of k = 5 positions"):
        exported_bytes(sequence)


@pytest.mark.parametrize("layer", [0, 1, NUM_LAYERS + 1])
def test_layers_llama_cpp_cannot_steer_are_not_exported(tmp_path, layer):
    target = tmp_path / "v.gguf"
    target.write_bytes(b"previous export")
    with pytest.raises(VectorStoreError, match=f"layer {layer} cannot be exported"):
        export_gguf(constant_vector(layers=(3, layer)), target, "llama", num_layers=NUM_LAYERS)
    assert target.read_bytes() == b"previous export"  # a failed export changes nothing
