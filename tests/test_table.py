import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stampray import table as st


def test_encode_decode_round_trip_is_exact():
    spec = st.StampSpec((3, 4, 5), ("a", "b"))
    images = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    col = st.encode_images(images, spec)
    assert col.type == pa.binary(240)
    back = st.decode_images(col, spec.shape)
    assert back.dtype == np.float32 and back.shape == (2, 3, 4, 5)
    np.testing.assert_array_equal(back, images)
    # a slice (non-zero offset) and a chunked column decode to the same rows
    np.testing.assert_array_equal(st.decode_images(col.slice(1), spec.shape), images[1:])
    chunked = pa.chunked_array([col.slice(0, 1), col.slice(1)])
    np.testing.assert_array_equal(st.decode_images(chunked, spec.shape), images)


def test_encode_refuses_the_wrong_shape():
    with pytest.raises(ValueError, match=r"images have shape \(1, 21, 21\), the table holds \(1, 20, 20\)"):
        st.encode_images(np.zeros((2, 1, 21, 21)), st.StampSpec((1, 20, 20)))


def test_schema_metadata_and_columns():
    spec = st.StampSpec((1, 2, 2), ("noise", "source"), "unit test")
    tbl = st.make_table(spec, ["x", "y"], np.zeros((2, 1, 2, 2)), [1, None], {"snr": [3.5, 7.0]})
    assert tbl.schema.names == ["stamp_id", "image", "label", "snr"]
    assert tbl.column("label").to_pylist() == [1, None]
    meta = json.loads(tbl.schema.metadata[b"stampray"])
    assert meta == {"schema_version": 1, "image_shape": [1, 2, 2], "class_names": ["noise", "source"],
                    "source": "unit test"}
    assert st.spec_from_schema(tbl.schema) == spec


def test_writer_shards_manifest_and_plain_pyarrow_read(tmp_path):
    spec = st.StampSpec((1, 3, 3), ("a", "b"))
    w = st.StampWriter(str(tmp_path), spec, rows_per_shard=10)
    for start in (0, 7, 14):
        n = 7 if start < 14 else 11
        ids = [f"s{i}" for i in range(start, start + n)]
        imgs = np.arange(start, start + n, dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 3, 3), np.float32)
        w.write(st.make_table(spec, ids, imgs, [i % 2 for i in range(start, start + n)]))
    w.set_aside("bad", "input.npy", 3, "nonfinite: 1 non-finite pixels")
    m = w.close()
    assert [s["rows"] for s in m.shards] == [10, 10, 5]
    assert m.num_rows == 25 and m.errors == {"nonfinite": 1}
    assert m.label_counts == {"0": 13, "1": 12}
    again = st.read_manifest(str(tmp_path))
    assert again.spec == spec and again.num_rows == 25
    # plain pyarrow reads the directory; the manifest and _errors are ignored by its discovery rules
    plain = pq.read_table(str(tmp_path))
    assert plain.num_rows == 25
    ids = sorted(plain.column("stamp_id").to_pylist(), key=lambda s: int(s[1:]))
    assert ids == [f"s{i}" for i in range(25)]
    col = plain.column("image").combine_chunks()
    images = np.frombuffer(col.buffers()[1], "<f4").reshape(-1, 1, 3, 3)
    order = [int(s[1:]) for s in plain.column("stamp_id").to_pylist()]
    np.testing.assert_array_equal(images[:, 0, 0, 0], np.array(order, np.float32))
    errors = st.read_errors(str(tmp_path))
    assert errors.to_pylist() == [{"stamp_id": "bad", "source": "input.npy", "row": 3,
                                   "reason": "nonfinite: 1 non-finite pixels"}]


def test_rewriting_a_dataset_replaces_old_shards(tmp_path):
    spec = st.StampSpec((1, 2, 2))
    w = st.StampWriter(str(tmp_path), spec, rows_per_shard=1)
    w.write(st.make_table(spec, ["a", "b", "c"], np.zeros((3, 1, 2, 2))))
    w.close()
    w = st.StampWriter(str(tmp_path), spec, rows_per_shard=5)
    w.write(st.make_table(spec, ["d"], np.zeros((1, 1, 2, 2))))
    w.close()
    assert st.read_table(str(tmp_path)).column("stamp_id").to_pylist() == ["d"]
    assert pq.read_table(str(tmp_path)).num_rows == 1


def test_missing_manifest_has_an_actionable_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a stamp dataset .* 'stampray ingest'"):
        st.read_manifest(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"^{tmp_path}/nowhere does not exist; give a stamp table made by "
                                                r"'stampray ingest', 'synth' or 'cutout'$"):
        st.read_manifest(str(tmp_path / "nowhere"))


def test_iter_batches_streams_every_row(tno_small):
    rows = sum(b.num_rows for b in st.iter_batches(tno_small, batch_size=64, columns=["stamp_id"]))
    assert rows == 600


def test_row_groups_are_bounded_in_bytes_not_only_in_rows(tmp_path):
    """A reader holds one row group: 16,384 stamps of 21x21 fit in one, stamps of 150x150 are cut so a
    row group stays within ROW_GROUP_BYTES of decoded data."""
    small = st.StampSpec((1, 21, 21), ("a", "b"))
    t = st.make_table(small, [f"s{i}" for i in range(20000)], np.zeros((20000, 1, 21, 21), np.float32))
    assert st.row_group_rows(t) == 16384
    big = st.StampSpec((1, 150, 150), ("a", "b"))
    t = st.make_table(big, [f"b{i}" for i in range(3000)], np.zeros((3000, 1, 150, 150), np.float32))
    rows = st.row_group_rows(t)
    assert rows * 150 * 150 * 4 <= st.ROW_GROUP_BYTES < (rows + 1) * (150 * 150 * 4 + 8)
    st.write_shard(str(tmp_path / "part-00000.parquet"), t)
    meta = pq.read_metadata(str(tmp_path / "part-00000.parquet"))
    assert meta.num_row_groups == -(-3000 // rows) and meta.row_group(0).num_rows == rows


def test_read_items_of_a_few_rows_each_cover_the_shard_once(tmp_path):
    """Occlusion reads a few rows per work item: the items' rows, in order, are the shard's rows exactly,
    each tagged with its shard and row index."""
    from stampray.data import _read_items, work_items

    spec = st.StampSpec((1, 4, 4), ("a", "b"))
    w = st.StampWriter(str(tmp_path / "d"), spec, rows_per_shard=23)
    images = np.arange(50 * 16, dtype=np.float32).reshape(50, 1, 4, 4)
    w.write(st.make_table(spec, [f"s{i}" for i in range(50)], images, labels=np.arange(50) % 2))
    w.close()
    shards = [s["path"] for s in st.read_manifest(str(tmp_path / "d")).shards]
    items = work_items(str(tmp_path / "d"), shards, rows=5)
    assert [it["length"] for it in items] == [5, 5, 5, 5, 3] * 2 + [4]
    got = [_read_items(pa.Table.from_pylist([it]), str(tmp_path / "d"), [st.ID, st.IMAGE], True) for it in items]
    ids = [i for t in got for i in t.column(st.ID).to_pylist()]
    assert ids == [f"s{i}" for i in range(50)]
    rows = [(t.column("_shard")[k].as_py(), t.column("_row")[k].as_py()) for t in got for k in range(t.num_rows)]
    assert rows == [(shards[i // 23], i % 23) for i in range(50)]
    whole = np.concatenate([st.decode_images(t.column(st.IMAGE), (1, 4, 4)) for t in got])
    assert np.array_equal(whole, images)
