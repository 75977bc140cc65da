"""ollm's fast GGUF metadata reader agrees with ``gguf.GGUFReader`` field for field and tensor
for tensor, and reports truncated files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from ollm.storage.gguf_reader import GGUFMetadata  # noqa: E402


def _write(path: Path) -> None:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_bool("test.flag", True)
    w.add_int64("test.big", -(1 << 40))
    w.add_float64("test.f64", 0.125)
    w.add_array("test.ints", [1, 2, 3])
    w.add_array("test.floats", [0.5, -1.5])
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_token_list(["<unk>", "▁a", "bé", "ü", ""])
    w.add_token_scores([0.0, -1.0, -2.0, -3.0, -4.0])
    w.add_token_types([2, 1, 1, 1, 6])
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((4, 2, 6)).astype(np.float16))
    q8 = gguf.quants.quantize(
        rng.standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0
    )
    w.add_tensor("q8", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("i32", np.arange(7, dtype=np.int32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_same_fields_and_tensors_as_gguf_reader(tmp_path):
    path = tmp_path / "t.gguf"
    _write(path)
    ref, ours = gguf.GGUFReader(str(path)), GGUFMetadata(path)
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]  # GGUFReader's own header keys
    assert keys == list(ours.fields)
    for k in keys:
        want, got = ref.fields[k].contents(), ours.fields[k].contents()
        if k == "test.nested":  # GGUFReader flattens arrays of arrays; ours keeps the nesting
            assert got == [[1, 2], [3]] and want == [1, 2, 3]
            continue
        assert got == want and type(got) is type(want), k
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for r, o in zip(ref.tensors, ours.tensors, strict=True):
        assert o.tensor_type == r.tensor_type and o.shape == tuple(r.shape.tolist())
        assert (o.n_bytes, o.data_offset) == (r.n_bytes, r.data_offset)
        assert o.data.dtype == r.data.dtype and o.data.shape == r.data.shape
        assert np.array_equal(o.data, r.data)
        if o.tensor_type.name != "I32":  # gguf dequantizes float and quantized types only
            np.testing.assert_array_equal(
                gguf.quants.dequantize(o.data, o.tensor_type),
                gguf.quants.dequantize(r.data, r.tensor_type),
            )


@pytest.mark.parametrize("keep", [0, 3, 40, -16])
def test_truncated_files_raise_value_errors(tmp_path, keep):
    import struct

    path = tmp_path / "t.gguf"
    _write(path)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    with pytest.raises((ValueError, struct.error)):
        GGUFMetadata(cut)


@pytest.mark.parametrize("tied", [True, False])
def test_config_from_light_copy_equals_full_file(tmp_path, tied):
    """transformers derives the same config from the metadata copy without vocabulary arrays
    (vocab_size from the token count, tied embeddings from the tensor names)."""
    from transformers import AutoConfig

    from ollm.storage.gguf_reader import write_config_gguf

    full = tmp_path / "full" / "m.gguf"
    full.parent.mkdir()
    w = gguf.GGUFWriter(str(full), "llama")
    w.add_name("tiny")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_bos_token_id(1)
    w.add_token_list([f"t{i}" for i in range(37)])  # no llama.vocab_size: taken from the count
    w.add_token_scores([0.0] * 37)
    w.add_tensor("token_embd.weight", np.zeros((37, 64), np.float32))
    if not tied:
        w.add_tensor("output.weight", np.zeros((37, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    light = tmp_path / "light" / "m.gguf"
    light.parent.mkdir()
    assert write_config_gguf(GGUFMetadata(full), "llama", light)
    assert light.stat().st_size < full.stat().st_size
    a = AutoConfig.from_pretrained(str(light.parent), gguf_file=light.name)
    b = AutoConfig.from_pretrained(str(full.parent), gguf_file=full.name)
    assert a.to_json_string() == b.to_json_string()
    assert b.vocab_size == 37 and b.tie_word_embeddings == tied
