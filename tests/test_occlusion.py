import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stampray.occlusion import OccludeSettings, occlude, occlusion_maps, read_maps


def central_probe(x: np.ndarray) -> np.ndarray:
    """P(class 1) rises with the sum of the central 3x3 pixels: the answer is known."""
    s = torch.from_numpy(x)[:, 0, 9:12, 9:12].sum(dim=(1, 2))
    logits = torch.stack([torch.zeros_like(s), 10.0 * s - 85.0], dim=1)
    return torch.softmax(logits, 1).numpy()


def identity(x):
    return x


@pytest.mark.parametrize("kernel", [3, 4, 5, 6])
def test_heatmap_drops_exactly_where_the_kernel_covers_the_central_pixels(kernel):
    img = np.ones((2, 1, 21, 21), np.float32)
    heat = occlusion_maps(img, np.array([1, 1]), kernel, 1, identity, central_probe)
    assert heat.shape == (2, 21, 21)
    full = central_probe(img)[0, 1]
    before = (kernel - 1) // 2
    expected = np.zeros((21, 21), bool)  # pixel (i, j) stands for the window starting at (i-before, j-before)
    for i in range(before, 21 - kernel // 2):
        for j in range(before, 21 - kernel // 2):
            y, x = i - before, j - before
            expected[i, j] = (y <= 11 and y + kernel - 1 >= 9) and (x <= 11 and x + kernel - 1 >= 9)
    inner = np.zeros((21, 21), bool)
    inner[before:21 - kernel // 2, before:21 - kernel // 2] = True
    assert np.allclose(heat[0][inner & ~expected], full)
    assert (heat[0][inner & expected] < full - 0.1).all()
    # the padding carries the map's minimum, as the notebooks pad
    assert np.allclose(heat[0][~inner], heat[0][inner].min())


@pytest.mark.parametrize("kernel,stride", [(5, 1), (6, 1), (5, 2), (4, 3)])
def test_output_is_stamp_sized(kernel, stride):
    img = np.random.default_rng(0).random((3, 2, 21, 21)).astype(np.float32)
    heat = occlusion_maps(img, np.array([0, 1, 0]), kernel, stride, identity,
                          lambda x: np.full((len(x), 2), 0.5, np.float32))
    assert heat.shape == (3, 21, 21)
    even = occlusion_maps(np.ones((1, 1, 20, 20), np.float32), np.array([0]), kernel, stride, identity,
                          lambda x: np.full((len(x), 2), 0.5, np.float32))
    assert even.shape == (1, 20, 20)


def reference_maps(raw, target, kernel, stride, preprocess, predict):
    """The unchunked computation: every (stamp, window) variant at once."""
    n, c, h, w = raw.shape
    ys, xs = range(0, h - kernel + 1, stride), range(0, w - kernel + 1, stride)
    masks = np.ones((len(ys) * len(xs), 1, h, w), np.float32)
    for p, (y, x) in enumerate((y, x) for y in ys for x in xs):
        masks[p, :, y:y + kernel, x:x + kernel] = 0.0
    variants = (preprocess(raw)[:, None] * masks[None]).reshape(-1, c, h, w)
    probs = predict(preprocess(variants)).reshape(n, len(masks), -1)
    return probs[np.arange(n), :, target].reshape(n, len(ys), len(xs))


@pytest.mark.parametrize("chunk", [1, 7, 100, None])
def test_chunked_maps_equal_the_unchunked_ones_with_a_real_model(chunk):
    from stampray import preprocess as pp
    from stampray.models import create_model

    torch.manual_seed(0)
    model = create_model("cnn", 2, 21, 3).eval()

    def predict(x):
        with torch.no_grad():
            return torch.softmax(model(torch.from_numpy(np.ascontiguousarray(x))), 1).numpy()

    raw = np.random.default_rng(1).normal(size=(3, 2, 21, 21)).astype(np.float32)
    target = np.array([0, 2, 1])
    prep = pp.get("course")
    heat = occlusion_maps(raw, target, 5, 2, prep, predict, chunk)
    ref = reference_maps(raw, target, 5, 2, prep, predict)
    grid = np.repeat(np.repeat(ref, 2, axis=1), 2, axis=2)[:, :17, :17]
    np.testing.assert_allclose(heat[:, 2:19, 2:19], grid, rtol=1e-5, atol=1e-6)


def test_occlusion_memory_does_not_grow_with_stamp_size_or_positions():
    import tracemalloc

    raw = np.random.default_rng(0).random((2, 1, 150, 150)).astype(np.float32)
    calls = []

    def predict(x):
        calls.append(len(x))
        return np.full((len(x), 2), 0.5, np.float32)

    tracemalloc.start()
    heat = occlusion_maps(raw, np.array([0, 1]), 5, 1, identity, predict)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert heat.shape == (2, 150, 150)
    assert sum(calls) == 2 * 146 * 146 and max(calls) == (1 << 20) // (150 * 150)
    # Unchunked, the variants alone were 2 x 21,316 x 150 x 150 float32 = 3.8 GB.
    assert peak < 32 * 2**20


def test_kernel_larger_than_the_stamp_is_refused():
    with pytest.raises(ValueError, match="--kernel 30 does not fit in stamps of 21x21"):
        occlusion_maps(np.ones((1, 1, 21, 21), np.float32), np.array([0]), 30, 1, identity, central_probe)


@pytest.mark.slow
def test_occlude_end_to_end_with_pngs(tno_small, tmp_path, ray_shared, make_checkpoint):
    ckpt = make_checkpoint(tmp_path / "m.pt")
    r = occlude(OccludeSettings(model=ckpt, data=tno_small, out=str(tmp_path / "maps"), limit=4,
                                png=str(tmp_path / "png")))
    assert r.rows == 4
    t = read_maps(str(tmp_path / "maps"))
    first = pq.read_table(os.path.join(tno_small, "part-00000.parquet"), columns=["stamp_id"]).column(0)
    assert t.column("stamp_id").to_pylist() == first.to_pylist()[:4]  # the table's first four
    heat = t.column("heatmap").combine_chunks().to_numpy_ndarray()
    assert heat.shape == (4, 21, 21) and np.isfinite(heat).all() and (heat >= 0).all() and (heat <= 1).all()
    assert sorted(os.listdir(tmp_path / "png")) == sorted(
        [f"{i}.png" for i in t.column("stamp_id").to_pylist()] + ["occlusion_grid.png", "index.csv", "_stampray.json"])
    assert not os.path.exists(tmp_path / "maps" / "_parts") and not os.path.exists(tmp_path / "maps" / "_tmp")
    ids = t.column("stamp_id").to_pylist()[:2]
    r = occlude(OccludeSettings(model=ckpt, data=tno_small, out=str(tmp_path / "maps2"), ids=tuple(ids)))
    assert sorted(read_maps(str(tmp_path / "maps2")).column("stamp_id").to_pylist()) == sorted(ids)


@pytest.mark.slow
@pytest.mark.parametrize("in_process", ["off", "on"])
def test_rows_that_cannot_be_occluded_are_listed_with_their_reason(in_process, tmp_path, ray_shared, caplog,
                                                                   make_checkpoint, write_stamps):
    """Through a pool on the session's Ray, and in this process (--in-process on): the same maps and books."""
    from stampray import table as st

    images = np.random.default_rng(1).normal(size=(6, 1, 21, 21)).astype(np.float32)
    images[1, 0, 5, 5] = np.nan
    images[4, 0, 0, 0] = -np.inf
    data = write_stamps(tmp_path / "d", images, labels=[0, 1] * 3, shard_rows=4)
    r = occlude(OccludeSettings(model=make_checkpoint(tmp_path / "m.pt"), data=data, out=str(tmp_path / "maps"),
                                in_process=in_process))
    assert r.rows == 4 and r.set_aside == 2
    assert (r.nodes == {"local": 4}) == (in_process == "on") and sum(r.nodes.values()) == 4
    assert sorted(read_maps(str(tmp_path / "maps")).column("stamp_id").to_pylist()) == ["s0", "s2", "s3", "s5"]
    errors = sorted(pq.read_table(str(tmp_path / "maps" / "_errors")).to_pylist(), key=lambda e: e["stamp_id"])
    assert pq.read_schema(str(tmp_path / "maps" / "_errors" / "part-00000.parquet")) == st.ERROR_SCHEMA
    assert errors == [  # the same table as score's and ingest's: where each stamp is, and why
        {"stamp_id": "s1", "source": "part-00000.parquet", "row": 1, "reason": "nonfinite: 1 non-finite pixels"},
        {"stamp_id": "s4", "source": "part-00001.parquet", "row": 0, "reason": "nonfinite: 1 non-finite pixels"}]
    assert "2 stamps could not be occluded" in caplog.text
    from stampray.provenance import provenance

    assert json.loads((tmp_path / "maps" / "_maps.json").read_text())["provenance"] == provenance()
    # with --limit, set-aside rows do not count towards the maps asked for
    r = occlude(OccludeSettings(model=make_checkpoint(tmp_path / "m.pt"), data=data, out=str(tmp_path / "maps"),
                                limit=3, in_process=in_process))
    assert r.rows == 3 and read_maps(str(tmp_path / "maps")).column("stamp_id").to_pylist() == ["s0", "s2", "s3"]


def test_png_names_are_unique_per_id_and_indexed(tmp_path):
    from stampray.occlusion import png_name, write_pngs

    ids = ["a/b", "a_b", "plain-1.5+2", "../up"]
    names = [png_name(i) for i in ids]
    assert names[1] == "a_b.png" and names[2] == "plain-1.5+2.png"
    assert len(set(names)) == 4 and all("/" not in n and not n.startswith(".") for n in names)
    n = len(ids)
    flat = np.zeros((n, 21, 21), np.float32)
    table = pa.table({"stamp_id": ids, "label": pa.array([0, 1, None, 0], pa.int64()),
                      "pred": pa.array([0, 0, 1, 1], pa.int64()), "target": pa.array([0, 1, 1, 0], pa.int64()),
                      "base_prob": pa.array([0.5] * n, pa.float32()),
                      "heatmap": _tensor(flat), "stamp": _tensor(flat)})
    paths = write_pngs(table, str(tmp_path / "png"), ["noise", "source"], kernel=5)
    assert len(paths) == 5 and sorted(os.listdir(tmp_path / "png")) == sorted(
        names + ["occlusion_grid.png", "index.csv", "_stampray.json"])
    rows = (tmp_path / "png" / "index.csv").read_text().splitlines()
    assert rows[0] == "stamp_id,file" and len(rows) == 5
    assert dict(r.rsplit(",", 1) for r in rows[1:]) == dict(zip(ids, names))


def _tensor(arr):
    from stampray.occlusion import _tensor_column

    return _tensor_column(arr)


@pytest.mark.slow
def test_compiled_replicas_give_the_eager_maps(tno_small, tmp_path, ray_shared, make_checkpoint):
    """--compile on (one compiled shape: the occlusion chunk, tails padded) draws the maps eager draws, of the
    same stamps: the first three of the table."""
    ckpt = make_checkpoint(tmp_path / "m.pt", preprocess="course_scaled")
    maps = {}
    for mode in ("off", "on"):
        occlude(OccludeSettings(model=ckpt, data=tno_small, out=str(tmp_path / mode), limit=3, compile=mode,
                                actors=2, batch_size=2, progress=False))
        t = read_maps(str(tmp_path / mode))
        maps[mode] = dict(zip(t.column("stamp_id").to_pylist(), t.column("heatmap").combine_chunks().to_numpy_ndarray()))
    first = pq.read_table(os.path.join(tno_small, "part-00000.parquet"), columns=["stamp_id"]).column(0)
    assert list(maps["on"]) == list(maps["off"]) == first.to_pylist()[:3]
    for k in maps["off"]:
        np.testing.assert_allclose(maps["on"][k], maps["off"][k], atol=1e-4)


@pytest.mark.slow
def test_a_limited_job_fed_by_read_tasks_keeps_the_first_stamps(tno_small, tmp_path, ray_shared, make_checkpoint,
                                                                 monkeypatch):
    """The GPU path's feed (read tasks, rows through the object store), here on CPUs: each call is one work
    item, so a record names exactly its rows, and --limit keeps the table's first stamps."""
    from stampray import inference

    run_pool = inference.run_pool
    monkeypatch.setattr(inference, "run_pool", lambda *a, **k: run_pool(*a, **{**k, "read_tasks": True}))
    occlude(OccludeSettings(model=make_checkpoint(tmp_path / "m.pt"), data=tno_small, out=str(tmp_path / "maps"),
                            limit=5, actors=2, batch_size=2, progress=False))
    first = pq.read_table(os.path.join(tno_small, "part-00000.parquet"), columns=["stamp_id"]).column(0)
    assert read_maps(str(tmp_path / "maps")).column("stamp_id").to_pylist() == first.to_pylist()[:5]


def _occlusion_threads() -> list:
    import threading

    from stampray.occlusion import HERE_THREAD

    return [t for t in threading.enumerate() if t.name.startswith(HERE_THREAD)]


def test_in_process_threads_stop_at_the_limit_with_the_tables_first_maps(tno_small, tmp_path, make_checkpoint,
                                                                         monkeypatch, caplog):
    """--in-process on with two threads (each its own replica, made to compile rather than load a package):
    --limit 5 of blocks of 2 keeps the table's first five stamps although the first block finishes after two
    later ones; the job stops quietly (no "stopping" line) with no thread left running, and draws the maps
    one replica draws. Threads are asked for no more than the three blocks that hold the first five stamps."""
    import threading

    from stampray import occlusion as oc

    made, asked = [], []
    init, call = oc.Occluder.__init__, oc.Occluder.__call__
    monkeypatch.setattr(oc.Occluder, "__init__", lambda self, *a, **k: made.append(k["use_package"]) or
                        init(self, *a, **k))
    ckpt = make_checkpoint(tmp_path / "m.pt")
    tables = {}
    for workers in (2, 1):
        later, finished = threading.Event(), []

        def first_block_last(self, batch, w=workers, later=later, finished=finished):
            item = batch.to_pylist()[0]
            start = (item["shard"], int(item["row0"]) + int(item.get("offset") or 0))
            if w == 2 and start == ("part-00000.parquet", 0):
                assert later.wait(60), "the other thread finished no two blocks while the first was held"
                return call(self, batch)
            out = call(self, batch)
            finished.append(1)
            if len(finished) >= 2:
                later.set()
            return out

        monkeypatch.setattr(oc.Occluder, "__call__", first_block_last)
        monkeypatch.setattr(oc, "here_workers",
                            lambda cores, use_gpu, items, w=workers: asked.append(items) or (w, 1))
        out = str(tmp_path / f"maps{workers}")
        r = occlude(OccludeSettings(model=ckpt, data=tno_small, out=out, limit=5, batch_size=2, in_process="on",
                                    progress=False))
        assert (r.rows, r.nodes) == (5, {"local": 5})
        tables[workers] = read_maps(out)
        assert not os.path.exists(os.path.join(out, "_parts")) and _occlusion_threads() == []
    assert made == [False, False, True] and asked == [3, 3]
    assert "stopping" not in caplog.text
    first = pq.read_table(os.path.join(tno_small, "part-00000.parquet"), columns=["stamp_id"]).column(0)
    assert tables[2].column("stamp_id").to_pylist() == tables[1].column("stamp_id").to_pylist() == \
        first.to_pylist()[:5]
    np.testing.assert_array_equal(tables[2].column("heatmap").combine_chunks().to_numpy_ndarray(),
                                  tables[1].column("heatmap").combine_chunks().to_numpy_ndarray())


@pytest.mark.slow
def test_a_small_occlude_from_the_command_line_maps_without_ray(tno_small, tmp_path, make_checkpoint):
    """A few maps (a morning's vetting): --in-process auto maps them in the stampray process, which never
    imports Ray, and says so; the maps and PNGs are those of any run."""
    import subprocess
    import sys

    out, png = str(tmp_path / "maps"), str(tmp_path / "png")
    code = ("import sys; from stampray.cli import main; "
            f"rc = main(['occlude', '--model', {make_checkpoint(tmp_path / 'm.pt')!r}, '--data', {tno_small!r}, "
            f"'--out', {out!r}, '--limit', '3', '--png', {png!r}, '--no-progress']); "
            "print('RESULT', rc, 'ray' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RAY_ADDRESS": ""})
    assert run.stdout.splitlines()[-1] == "RESULT 0 False", run.stdout + run.stderr
    assert "occlude: 867 occluded variants: mapping in this process, without Ray (--in-process off: through Ray)" \
        in run.stderr
    assert not re.search("warn|error|traceback", run.stderr, re.I), run.stderr
    assert re.search(r"^occlude: 3 occlusion maps \(kernel 5, stride 1\) written to .*; 4 PNGs in ", run.stdout, re.M)
    first = pq.read_table(os.path.join(tno_small, "part-00000.parquet"), columns=["stamp_id"]).column(0)
    assert read_maps(out).column("stamp_id").to_pylist() == first.to_pylist()[:3]
    assert len(os.listdir(png)) == 6  # 3 overlays, the grid, index.csv and the _stampray.json that lists them


def test_in_process_auto_maps_small_jobs_here(tno_small, monkeypatch):
    """--in-process auto: jobs of under 200,000 occluded variants (stamps to map x window positions) that
    would start a private Ray of their own map in this process; bigger ones, and any with an address, a GPU
    or a fixed pool, go through Ray. on + --address is refused."""
    import types
    import sys

    from stampray import table as st
    from stampray.inference import IN_PROCESS_FORWARDS, runs_here
    from stampray.occlusion import _plan

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: False))
    manifest = st.read_manifest(tno_small)

    def here(**kw):
        s = OccludeSettings(model="m", data=tno_small, out="o", **kw)
        return runs_here("maps", s.in_process, _plan(s, manifest).variants, s.address, s.use_gpu, s.actors)

    assert _plan(OccludeSettings(model="m", data=tno_small, out="o"), manifest).variants == 600 * 17 * 17
    assert IN_PROCESS_FORWARDS == 200_000 and 600 * 289 < IN_PROCESS_FORWARDS
    assert here() and here(ids=("a", "b")) and here(kernel=1, limit=200_000 // 441)
    # the stamps the job can map: a --limit beyond the table's 600 rows maps no more than they
    assert _plan(OccludeSettings(model="m", data=tno_small, out="o", limit=1000), manifest).variants == 600 * 289
    assert _plan(OccludeSettings(model="m", data=tno_small, out="o", limit=9, ids=("a", "b")), manifest).variants \
        == 2 * 289 and here(limit=1000)
    assert not here(kernel=1, limit=200_000 // 441 + 1) and not here(kernel=1)  # 600 x 441 windows
    assert not here(use_gpu=True) and not here(actors=1) and not here(address="auto")
    assert not here(in_process="off") and here(kernel=1, in_process="on")
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: True))
    assert not here()  # a Ray this process already runs (a notebook's, the demo's): used
    with pytest.raises(ValueError, match="--in-process on maps without Ray; it cannot run on the cluster at "
                                         "--address 10.0.0.1:6379"):
        OccludeSettings(model="m", data="d", out="o", in_process="on", address="10.0.0.1:6379")
    with pytest.raises(ValueError, match="--in-process must be auto, on or off, got 'yes'"):
        OccludeSettings(model="m", data="d", out="o", in_process="yes")


@pytest.mark.parametrize("pixels, windows, chunk, expected", [
    (21 * 21, 17 * 17, None, (2312, 8)),       # 8 whole stamps' windows (2,377 pairs' worth of pixels)
    (20 * 20, 16 * 16, None, (2560, 10)),      # jets: 10 stamps
    (64 * 64, 60 * 60, None, (240, 1)),        # radio: a stamp's 3,600 windows in 15 forwards of 240
    (150 * 150, 146 * 146, None, (46, 1)),     # 21,316 windows in 464 forwards
    (21 * 21, 17 * 17, 100, (100, 1)),         # --chunk as given
    (21 * 21, 17 * 17, 1000, (1000, 3)),
])
def test_forwards_hold_whole_stamps_windows(pixels, windows, chunk, expected):
    from stampray.occlusion import OCCLUDE_PIXELS, forward_shape

    pairs, per = forward_shape(pixels, windows, chunk)
    assert (pairs, per) == expected
    if chunk is None:
        assert pairs * pixels <= OCCLUDE_PIXELS
        assert pairs % windows == 0 if per > 1 else windows / pairs > 1


@pytest.mark.parametrize("pixels, windows, chunk, use_gpu, expected", [
    (21 * 21, 17 * 17, None, False, (4096, 14)),   # scoring's shape: a package built by score is loaded
    (20 * 20, 16 * 16, None, False, (4096, 16)),   # jets too
    (64 * 64, 60 * 60, None, False, (240, 1)),     # radio: 4,096 stamps would be 16 Mi pixels a forward
    (21 * 21, 17 * 17, 1000, False, (1000, 3)),    # --chunk as given
    (21 * 21, 17 * 17, None, True, (2312, 8)),     # GPUs run no packages
])
def test_cpu_occlusion_forwards_take_scorings_shape_where_it_fits(pixels, windows, chunk, use_gpu, expected):
    from stampray.inference import CPU_BATCH
    from stampray.occlusion import SHARED_SHAPE_PIXELS, occlusion_forward

    assert occlusion_forward(pixels, windows, chunk, use_gpu) == expected
    assert CPU_BATCH == 4096 and CPU_BATCH * 21 * 21 <= SHARED_SHAPE_PIXELS < CPU_BATCH * 64 * 64


@pytest.mark.parametrize("base, windows, pairs, expected", [
    (64, 289, 2312, 64),     # whole stamps' windows per forward (8 stamps): whole forwards, as before
    (64, 256, 4096, 64),     # 20x20, kernel 5, scoring's shape: 16 stamps a forward
    (64, 21316, 46, 64),     # 150x150: a stamp's windows in many forwards, one stamp at a time
    (64, 289, 4096, 85),     # forwards spanning stamps: 85 x 289 = 6 forwards less 11 pairs (70: less 250)
    (512, 289, 2312, 512),   # GPUs
])
def test_a_block_fills_its_forwards(base, windows, pairs, expected):
    from stampray.occlusion import block_stamps

    assert block_stamps(base, windows, pairs) == expected


def test_short_blocks_are_queued_two_at_a_time_long_ones_one():
    """A replica gets a second block queued only when a block is short (at most QUEUE_VARIANTS occluded
    variants): 64 stamps of 21x21 (289 windows with kernel 5) are; 64 cutouts of 150x150 (21,316) are not;
    nor are any blocks of a job that stops at --limit (its maps come from the first blocks)."""
    from stampray.occlusion import QUEUE_VARIANTS, blocks_in_flight

    assert blocks_in_flight(64, 289) == 2
    assert blocks_in_flight(64, 146 * 146) == 1
    assert blocks_in_flight(1, QUEUE_VARIANTS) == 2 and blocks_in_flight(1, QUEUE_VARIANTS + 1) == 1
    assert blocks_in_flight(64, 289, limited=True) == 1


def _block(shard, row, length, maps, node="n1"):
    piece = f"{shard}-{row}" if maps else None
    return {"piece": piece, "rows": maps, "errors": 0, "node": node, "shard": shard, "row": row, "length": length}


def test_limited_occlusion_keeps_the_first_maps_in_table_order_whichever_block_finishes_first():
    """A later block that finishes first is held until every block before it is in: with --limit 3 the maps
    kept are those of the table's first blocks, not of the fastest replica."""
    from stampray.occlusion import BlocksInOrder

    items = [{"shard": "a", "row_group": 0, "row0": 0, "offset": 0, "length": 2},
             {"shard": "a", "row_group": 0, "row0": 0, "offset": 2, "length": 2},
             {"shard": "a", "row_group": 1, "row0": 4, "offset": 0, "length": 1},
             {"shard": "b", "row_group": 0, "row0": 0, "offset": 0, "length": 2}]
    books = BlocksInOrder(items, limit=4)
    books.add(_block("b", 0, 2, 2, node="n2"))  # the last block first
    books.add(_block("a", 2, 2, 2))
    assert (books.mapped, books.pieces()) == (0, [])  # the first block is not in: nothing counts yet
    books.add(_block("a", 0, 2, 1))  # one of its two stamps selected
    assert (books.mapped, books.pieces()) == (3, ["a-0", "a-2"])
    books.add(_block("a", 2, 2, 2))  # a block redone: counted once
    books.add(_block("a", 4, 1, 0))  # nothing selected in it: no piece, but it is in
    assert (books.mapped, books.pieces()) == (5, ["a-0", "a-2", "b-0"])
    assert books.pieces(complete=True) == ["a-0", "a-2", "b-0"]
    assert books.nodes == {"n1": 3, "n2": 1}  # the maps the commit keeps: 4 (--limit) of 5


def test_a_job_read_to_its_end_commits_its_pieces_in_table_order():
    from stampray.occlusion import BlocksInOrder

    items = [{"shard": s, "row_group": 0, "row0": 0, "offset": k, "length": 1} for s in ("x", "y") for k in (0, 1)]
    books = BlocksInOrder(items)
    for shard, row in [("y", 1), ("x", 1), ("y", 0), ("x", 0)]:
        books.add(_block(shard, row, 1, 1))
    assert books.pieces(complete=True) == books.pieces() == ["x-0", "x-1", "y-0", "y-1"]
