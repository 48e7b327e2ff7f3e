"""The shared replica machinery: pool plans that follow the cluster, workers that write, the driver's books."""

import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stampray import checkpoint as ck
from stampray import table as st
from stampray.capacity import Capacity
from stampray.inference import PARTS_DIR, plan_pool, replica_cpus, write_atomic
from stampray.models import create_model
from stampray.score import ERROR, ERRORS_META, RECORD_SCHEMA, Books, Scorer, commit_shard, result_schema


def cap(cpus_now, cpus_max, gpus_now=0.0, gpus_max=0.0, types=None):
    return Capacity(cpus_now, gpus_now, cpus_max, gpus_max, bool(types), types or {})


@pytest.mark.parametrize("cpus, expected", [(1, (1, 0.75)), (2, (2, 0.75)), (4, (4, 0.875)), (16, (16, 0.9688))])
def test_replicas_leave_every_node_its_read_reserve_and_no_room_for_one_more(cpus, expected):
    per_node, per = replica_cpus(cpus)
    assert (per_node, per) == expected
    assert cpus - per_node * per >= 0.25  # the read tasks' quarter CPU
    assert (per_node + 1) * per > cpus  # one more replica never fits


def test_laptop_pool_is_one_replica_per_core():
    plan = plan_pool(False, None, cap(2, 2), [2.0])
    assert (plan.min_size, plan.initial_size, plan.max_size, plan.num_cpus, plan.num_gpus) == (1, 2, 2, 0.75, 0.0)


def test_pool_grows_to_what_the_autoscaler_can_launch_from_zero_worker_nodes():
    types = {"cpu": {"resources": {"CPU": 1}, "min_workers": 0, "max_workers": 3}}
    plan = plan_pool(False, None, cap(0, 3, types=types), [0.0])  # a head of 0 CPUs, no worker up yet
    assert (plan.min_size, plan.initial_size, plan.max_size, plan.num_cpus) == (1, 1, 3, 0.75)
    # a job of 25 blocks asks for the whole pool at once: the autoscaler launches the nodes together
    assert plan_pool(False, None, cap(0, 3, types=types), [0.0], blocks=25).initial_size == 3
    assert plan_pool(False, None, cap(2, 2), [2.0], blocks=25).initial_size == 2  # no autoscaler: what fits
    one_block = plan_pool(False, None, cap(2, 2), [2.0], blocks=1)  # a small job: one replica to start, not two
    assert (one_block.initial_size, one_block.max_size) == (1, 2)
    types = {"cpu": {"resources": {"CPU": 4}, "min_workers": 0, "max_workers": 10}}
    plan = plan_pool(False, None, cap(4, 44, types=types), [0.0, 4.0])  # one of ten 4-CPU nodes up
    assert (plan.initial_size, plan.max_size, plan.num_cpus) == (4, 44, 0.875)
    assert plan_pool(False, 6, cap(4, 44, types=types), [0.0, 4.0]).max_size == 6  # --max-actors caps it
    unbounded = plan_pool(False, None, cap(4, math.inf, types=types), [0.0, 4.0])
    assert unbounded.max_size == 4 + 16 * 4


def test_gpu_pool_is_one_replica_per_gpu_the_cluster_can_have():
    plan = plan_pool(True, None, cap(0, 8, gpus_now=1, gpus_max=4), [0.0, 4.0])
    assert (plan.min_size, plan.initial_size, plan.max_size, plan.num_cpus, plan.num_gpus) == (1, 1, 4, 1.0, 1.0)


def test_books_count_each_row_once_whatever_the_pieces():
    books = Books({"a.parquet": 10, "b.parquet": 4})
    assert books.add("a.parquet", 0, 4) == 4
    assert books.add("a.parquet", 0, 4) == 0  # the same piece again (a block redone)
    assert books.add("a.parquet", 2, 5) == 3  # overlapping: only rows 4..6 are new
    assert not books.complete("a.parquet") and books.incomplete() == {"a.parquet": 7, "b.parquet": 0}
    assert books.add("a.parquet", 7, 3) == 3 and books.complete("a.parquet")
    with pytest.raises(RuntimeError, match="does not score"):
        books.add("c.parquet", 0, 1)


def _piece(rows, errors=()):
    ids = [f"s{r}" for r in rows]
    return pa.table({"stamp_id": ids, "pred": pa.array([r % 2 for r in rows], pa.int64()),
                     "_row": pa.array(rows, pa.int64()),
                     ERROR: pa.array(["nonfinite: 3 non-finite pixels" if r in errors else None for r in rows],
                                     pa.string())})


def test_commit_keeps_each_row_once_and_writes_errors_then_the_result(tmp_path):
    out = str(tmp_path / "scores")
    parts = os.path.join(out, PARTS_DIR, "part-00000")
    os.makedirs(parts)
    pq.write_table(_piece(range(0, 6), errors={3}), os.path.join(parts, "000000000000-6.parquet"))
    pq.write_table(_piece(range(4, 10)), os.path.join(parts, "000000000004-6.parquet"))  # redone, cut otherwise
    doc = commit_shard(out, "part-00000.parquet", 10)
    assert doc == {"shard": "part-00000.parquet", "rows": 9, "errors": {"nonfinite": 1}}
    result = pq.read_table(os.path.join(out, "part-00000.parquet"))
    assert result.column("stamp_id").to_pylist() == [f"s{i}" for i in range(10) if i != 3]
    assert result.schema.names == ["stamp_id", "pred"]
    assert json.loads(pq.read_metadata(os.path.join(out, "part-00000.parquet")).metadata[ERRORS_META]) == {"nonfinite": 1}
    errors = pq.read_table(os.path.join(out, "_errors", "part-00000.parquet")).to_pylist()
    assert errors == [{"stamp_id": "s3", "source": "part-00000.parquet", "row": 3,
                       "reason": "nonfinite: 3 non-finite pixels"}]
    assert not os.path.exists(parts)


def test_commit_of_pieces_in_order_keeps_them_as_they_are_and_dictionaries_only_repeating_columns(tmp_path,
                                                                                                  monkeypatch):
    """Pieces that hold every row once, in order (the common case), are joined as they are, without a take;
    the result file dictionary-encodes only the columns whose values repeat (not the ids, not floating-point
    values, nested ones included; a kept list of strings has its dictionary)."""
    out = str(tmp_path / "scores")
    parts = os.path.join(out, PARTS_DIR, "part-00000")
    os.makedirs(parts)
    for rows in (range(0, 6), range(6, 10)):
        piece = _piece(rows)
        piece = piece.append_column("p_source", pa.array([r / 10 for r in rows], pa.float32()))
        piece = piece.append_column("map", pa.array([[r, r + 0.5] for r in rows], pa.list_(pa.float32(), 2)))
        piece = piece.append_column("tags", pa.array([["a", "b"] for _ in rows], pa.list_(pa.string())))
        write_atomic(piece, os.path.join(parts, f"{rows[0]:012d}-{len(rows)}.parquet"), out)

    def no_sort(*args, **kwargs):
        raise AssertionError("pieces in order need no sort and take")

    monkeypatch.setattr(np, "argsort", no_sort)
    assert commit_shard(out, "part-00000.parquet", 10) == {"shard": "part-00000.parquet", "rows": 10, "errors": {}}
    path = os.path.join(out, "part-00000.parquet")
    result = pq.read_table(path)
    assert result.column("stamp_id").to_pylist() == [f"s{i}" for i in range(10)]
    assert result.column("p_source").to_pylist() == pytest.approx([i / 10 for i in range(10)])
    assert result.column("map").to_pylist()[3] == [3.0, 3.5] and result.column("tags").to_pylist()[9] == ["a", "b"]
    assert not os.path.exists(os.path.join(out, "_errors", "part-00000.parquet"))
    chunks = pq.read_metadata(path).row_group(0)
    dictionary = {chunks.column(i).path_in_schema: any("DICTIONARY" in e for e in chunks.column(i).encodings)
                  for i in range(chunks.num_columns)}
    assert dictionary == {"stamp_id": False, "pred": True, "p_source": False, "map.list.element": False,
                          "tags.list.element": True}


def test_a_retried_commit_of_a_done_shard_returns_it_whatever_pieces_are_left(tmp_path):
    """The committer's node died after the result file was written, part way through removing the pieces:
    the retry returns the shard as written (the result file comes last) and removes the rest."""
    out = str(tmp_path / "scores")
    parts = os.path.join(out, PARTS_DIR, "part-00000")
    os.makedirs(parts)
    pq.write_table(_piece(range(0, 6), errors={3}), os.path.join(parts, "000000000000-6.parquet"))
    pq.write_table(_piece(range(6, 10)), os.path.join(parts, "000000000006-4.parquet"))
    first = commit_shard(out, "part-00000.parquet", 10)
    os.makedirs(parts)
    pq.write_table(_piece(range(6, 10)), os.path.join(parts, "000000000006-4.parquet"))  # one left behind
    assert commit_shard(out, "part-00000.parquet", 10) == first == {
        "shard": "part-00000.parquet", "rows": 9, "errors": {"nonfinite": 1}}
    assert not os.path.exists(parts)
    assert pq.read_table(os.path.join(out, "part-00000.parquet")).num_rows == 9


def test_commit_refuses_a_shard_with_missing_rows(tmp_path):
    out = str(tmp_path / "scores")
    parts = os.path.join(out, PARTS_DIR, "part-00000")
    os.makedirs(parts)
    pq.write_table(_piece(range(0, 6)), os.path.join(parts, "000000000000-6.parquet"))
    with pytest.raises(RuntimeError, match="hold 6 distinct rows of 10; rerun"):
        commit_shard(out, "part-00000.parquet", 10)
    assert not os.path.exists(os.path.join(out, "part-00000.parquet"))


def test_a_shard_of_no_rows_gets_a_file_of_the_result_columns(tmp_path):
    schema = result_schema(("noise", "source"), [pa.field("snr", pa.float64())], spread=True, feature_width=64)
    assert schema.names == ["stamp_id", "label", "split", "pred", "pred_name", "p_noise", "p_source",
                            "p_noise_std", "p_source_std", "features", "model", "snr"]
    assert schema.field("features").type == pa.list_(pa.float32(), 64)
    out = str(tmp_path / "scores")
    assert commit_shard(out, "part-00003.parquet", 0, schema) == {"shard": "part-00003.parquet", "rows": 0,
                                                                   "errors": {}}
    written = pq.read_table(os.path.join(out, "part-00003.parquet"))
    assert written.num_rows == 0 and written.schema.remove_metadata() == schema


def test_a_replica_writes_pieces_and_returns_only_small_records(tmp_path, ray_shared):
    torch.manual_seed(0)
    model = create_model("cnn", 1, 21, 2)
    ck.save(ck.make_bundle(model, class_names=("noise", "source"), preprocess="course"), str(tmp_path / "m.pt"))
    spec = st.StampSpec((1, 21, 21), ("noise", "source"))
    images = np.random.default_rng(0).normal(size=(7, 1, 21, 21)).astype(np.float32)
    images[2, 0, 0, 0] = np.nan
    batch = st.make_table(spec, [f"s{i}" for i in range(7)], images, [0, 1, 0, 1, 0, 1, 0])
    batch = batch.append_column("_shard", pa.array(["part-00001.parquet"] * 4 + ["part-00002.parquet"] * 3))
    batch = batch.append_column("_row", pa.array([10, 11, 12, 13, 0, 1, 5], pa.int64()))  # b: two runs
    out = str(tmp_path / "scores")
    scorer = Scorer((tmp_path / "m.pt").read_bytes(), out, [], (0.7, 0.15, 0.15), "cnn@x")
    records = scorer(batch)
    assert records.schema == RECORD_SCHEMA
    got = [(r["shard"], r["row0"], r["rows"], r["errors"]) for r in records.to_pylist()]
    assert got == [("part-00001.parquet", 10, 4, 1), ("part-00002.parquet", 0, 2, 0), ("part-00002.parquet", 5, 1, 0)]
    assert {r["node"] for r in records.to_pylist()} == {ray_shared.get_runtime_context().get_node_id()}
    assert sorted(os.listdir(os.path.join(out, PARTS_DIR, "part-00002"))) == [
        "000000000000-2.parquet", "000000000005-1.parquet"]
    piece = pq.read_table(os.path.join(out, PARTS_DIR, "part-00001", "000000000010-4.parquet"))
    assert piece.column("stamp_id").to_pylist() == ["s0", "s1", "s2", "s3"]
    assert piece.column(ERROR).to_pylist()[2].startswith("nonfinite")


@pytest.mark.slow
@pytest.mark.parametrize("read_tasks", [False, True])
def test_the_pool_reads_every_row_once_in_its_replicas_or_in_read_tasks(tmp_path, ray_shared, tno_small, read_tasks):
    """CPU replicas read their own work items; GPU pools (read_tasks) get rows from read tasks: the same
    records, every row of every shard once, either way."""
    from stampray.data import work_items
    from stampray.inference import run_pool

    torch.manual_seed(0)
    ck.save(ck.make_bundle(create_model("cnn", 1, 21, 2), class_names=("noise", "source"), preprocess="course"),
            str(tmp_path / "m.pt"))
    shards = [s["path"] for s in st.read_manifest(tno_small).shards]
    out = str(tmp_path / "scores")
    items = work_items(tno_small, shards)
    records = pa.concat_tables(run_pool(
        Scorer, (tmp_path / "m.pt").read_bytes(), tno_small, shards, [st.ID, st.IMAGE, st.LABEL], items,
        use_gpu=False, max_actors=2, actors=None, batch_size=None, read_tasks=read_tasks,
        replica_kwargs={"out": out, "keep": [], "fractions": (0.7, 0.15, 0.15), "model_tag": "cnn@x"}))
    got = sorted((r["shard"], r["row0"], r["rows"]) for r in records.to_pylist())
    assert got == sorted((i["shard"], i["row0"], m["rows"]) for i, m in zip(items, st.read_manifest(tno_small).shards))
    ids = pa.concat_tables(pq.read_table(os.path.join(out, PARTS_DIR, d)) for d in sorted(os.listdir(
        os.path.join(out, PARTS_DIR)))).column("stamp_id").to_pylist()
    assert ids == st.read_table(tno_small, columns=["stamp_id"]).column("stamp_id").to_pylist()


def test_use_gpu_is_refused_at_once_where_no_gpu_can_come(tmp_path, ray_shared):
    from stampray.runtime import ensure_gpus

    with pytest.raises(ValueError, match="0 GPUs and no autoscaler node type that can add one"):
        ensure_gpus("score", 1, wait_s=600)


def test_dropped_stderr_lines_drops_only_the_named_lines(capfd):
    from stampray.inference import RAY_POOL_NOISE, dropped_stderr_lines

    with dropped_stderr_lines(RAY_POOL_NOISE):
        os.write(2, b"kept 1\n[E core_worker.cc] Actor ... has constructor arguments in the object store and "
                    b"max_restarts > 0. If ...\nkept 2\n")
        os.write(2, b"\rscore: 10/20 stamps")  # a progress line redrawn in place: no newline
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "kept 1\nkept 2\n\rscore: 10/20 stamps" + "after\n"


def test_dropped_lines_on_stdout_too(capfd):
    from stampray.inference import dropped_stderr_lines

    with dropped_stderr_lines((b"submit failed",), fd=1):
        os.write(1, b"(raylet) Task MapWorker(MapBatches(Occluder)).submit failed. There are infinite retries\n"
                    b"[3/5] scored\n")
        os.write(2, b"submit failed, on stderr: not filtered\n")
    out = capfd.readouterr()
    assert (out.out, out.err) == ("[3/5] scored\n", "submit failed, on stderr: not filtered\n")


def test_the_private_ray_drops_the_raylets_worker_count_warning(capfd):
    """The raylet's "N PYTHON worker processes have been started" warning (a 2-CPU laptop's private Ray runs
    Train's, Ray Data's and the pool's actors by design) is one of the private Ray's dropped lines."""
    from stampray.inference import RAY_PRIVATE_NOISE, dropped_stderr_lines

    with dropped_stderr_lines(RAY_PRIVATE_NOISE):
        os.write(2, b"(raylet) WARNING: 8 PYTHON worker processes have been started on node: 7b14 with address: "
                    b"127.0.0.1, which is 4x the maximum expected startup concurrency (2).\ntrain: epoch 1\n")
    assert capfd.readouterr().err == "train: epoch 1\n"


def test_a_compiled_replica_runs_small_parts_uncompiled_and_pads_the_rest(tmp_path, make_checkpoint):
    """A compiled replica has one shape (``rows`` stamps): parts of at most rows / EAGER_PART go through the
    uncompiled model, longer ones are padded to that shape; both give the uncompiled model's numbers."""
    from stampray.inference import EAGER_PART, ModelActor

    make_checkpoint(tmp_path / "m.pt")
    actor = ModelActor((tmp_path / "m.pt").read_bytes(), chunk=12)
    assert (actor.rows, EAGER_PART) == (12, 3)
    plain = actor.eager
    calls = []

    def recorded(name, fn):
        def call(x):
            calls.append((name, len(x)))
            return fn(x)
        return call

    actor.compiled, actor.forward, actor.eager = True, recorded("compiled", plain), recorded("eager", plain)
    x = np.random.default_rng(0).normal(size=(30, 1, 21, 21)).astype(np.float32)
    with torch.inference_mode():
        ref = torch.softmax(plain(torch.from_numpy(x))[0], 1).numpy()
    for n, expected in [(4, [("eager", 4)]), (5, [("compiled", 12)]),
                        (30, [("compiled", 12), ("compiled", 12), ("compiled", 12)]),
                        (28, [("compiled", 12), ("compiled", 12), ("eager", 4)])]:
        calls.clear()
        got = actor.probabilities(x[:n])
        assert calls == expected, n
        np.testing.assert_allclose(got, ref[:n], rtol=1e-5, atol=1e-6)
