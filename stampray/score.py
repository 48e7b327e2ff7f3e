"""Bulk scoring with Ray Data: ``stampray score``.

Stamp shards stream through an actor pool of model replicas (each loads the checkpoint once) and the
results land as one Parquet file per input shard, so a job is exactly once and resumable:

* the driver collects each shard's (small) result rows, de-duplicates them by ``stamp_id`` (a task
  retried after a node loss may deliver rows twice) and writes the shard's file only when every one of
  its rows is accounted for, atomically (temporary name, then rename);
* a rerun of the same command skips every shard whose result file exists, so a job whose driver was
  killed at any moment finishes with every input stamp exactly once; rerunning a finished job does no work.

Rows that cannot be scored (non-finite pixels, an image of the wrong shape) go to ``SCORES/_errors/``
with their reason and are counted; the job goes on.

Actor pool sizing: with GPUs, one actor per GPU (one CPU each) and large batches; on CPU, one actor per
CPU, each asking for ``(CPUs - 1) / actors`` CPUs, so Ray Data's half-CPU read tasks always find room
(a 2-CPU laptop runs two single-thread actors of 0.5 CPU each).
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import sys
import time
import uuid
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import checkpoint as ck
from . import preprocess as pp
from . import splits
from . import table as st

JOB_FILE = "_job.json"
SCORE_MANIFEST = "_manifest.json"
ERROR = "_error"
COMPILE_ROWS = 200_000  # --compile auto compiles the model for jobs of at least this many stamps


@dataclass(frozen=True)
class ScoreSettings:
    """Settings of ``stampray score``; see ``stampray score --help``."""

    model: str
    data: str
    out: str
    keep: tuple[str, ...] = ()
    batch_size: int | None = None
    use_gpu: bool = False
    actors: int | None = None
    fractions: tuple[float, float, float] = splits.DEFAULT_FRACTIONS
    overwrite: bool = False
    compile: str = "auto"
    progress: bool = True
    address: str | None = None

    def __post_init__(self):
        if self.batch_size is not None and int(self.batch_size) <= 0:
            msg = f"--batch-size must be a positive integer, got {self.batch_size!r}"
            raise ValueError(msg)
        if self.compile not in ("auto", "on", "off"):
            msg = f"--compile must be auto, on or off, got {self.compile!r}"
            raise ValueError(msg)
        if self.actors is not None and int(self.actors) <= 0:
            msg = f"--actors must be a positive integer, got {self.actors!r}"
            raise ValueError(msg)


def prob_column(name: str) -> str:
    """Column name of a class probability: ``p_`` plus the class name made identifier-safe."""
    return "p_" + re.sub(r"\W", "_", str(name))


def check_compatible(bundle: dict, manifest: st.Manifest, data: str) -> None:
    """Catch a model/data mismatch before any work starts."""
    c, h, w = manifest.spec.shape
    if bundle["in_channels"] != c:
        msg = (f"the model takes {bundle['in_channels']}-channel stamps, {data} holds {c}-channel stamps "
               f"{manifest.spec.shape}; score it with a model trained on this kind of data")
        raise ValueError(msg)
    if list(bundle["image_size"]) != [h, w]:
        msg = (f"the model was trained on {bundle['image_size'][0]}x{bundle['image_size'][1]} stamps, "
               f"{data} holds {h}x{w} stamps")
        raise ValueError(msg)
    k = int(bundle["num_classes"])
    labels = [int(x) for x in manifest.label_counts]
    if labels and max(labels) >= k:
        msg = (f"{data} has labels up to {max(labels)} ({manifest.spec.num_classes} classes: "
               f"{', '.join(manifest.spec.class_names)}) but the model predicts {k} classes "
               f"({', '.join(bundle['class_names'])})")
        raise ValueError(msg)
    if manifest.spec.num_classes and manifest.spec.num_classes != k:
        msg = (f"{data} declares {manifest.spec.num_classes} classes ({', '.join(manifest.spec.class_names)}) "
               f"but the model predicts {k} ({', '.join(bundle['class_names'])})")
        raise ValueError(msg)


class ModelActor:
    """Holds one model replica; loads the checkpoint once (from bytes in the object store)."""

    def __init__(self, model_bytes: bytes, threads: int = 1, use_gpu: bool = False, compile: bool = False,
                 chunk: int = 4096):
        import ray
        import torch

        if isinstance(model_bytes, ray.ObjectRef):  # nested refs are not resolved for us
            model_bytes = ray.get(model_bytes)
        torch.set_num_threads(max(1, int(threads)))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        bundle = torch.load(io.BytesIO(model_bytes), map_location="cpu", weights_only=True)
        self.bundle = bundle
        self.model = ck.build_model(bundle).to(self.device)
        self.preprocess = pp.get(bundle["preprocess"])
        self.shape = (bundle["in_channels"], *bundle["image_size"])
        self.class_names = list(bundle["class_names"])
        self.amp = self.device.type == "cuda"
        self.chunk = int(chunk)
        self.forward = self.model
        self.compiled = False
        if compile:
            self._compile()

    def _compile(self) -> None:
        """``torch.compile`` for one fixed batch shape (tails are padded), warmed up here so that the
        compile time is paid once per replica; any failure falls back to eager mode."""
        import torch

        try:
            import torch._inductor.config as inductor_config

            # Inference only: freeze the weights into the graph (constant folding, prepacked oneDNN
            # convolutions) and use channels-last; together about 3.5x eager on one CPU thread for cnn.
            inductor_config.freezing = True
            model = self.model.to(memory_format=torch.channels_last)
            fn = torch.compile(model, dynamic=False)
            with torch.inference_mode():
                fn(torch.zeros(self.chunk, *self.shape, device=self.device).contiguous(
                    memory_format=torch.channels_last))
            self.forward, self.compiled = fn, True
        except Exception as e:  # noqa: BLE001 - no compiler, unsupported op: eager still works
            print(f"[stampray] torch.compile unavailable ({type(e).__name__}); scoring in eager mode", flush=True)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Softmax probabilities for preprocessed stamps (N, C, H, W)."""
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(x), self.chunk):
                part = np.ascontiguousarray(x[i:i + self.chunk])
                n = len(part)
                if self.compiled and n < self.chunk:  # keep the one compiled shape
                    part = np.concatenate([part, np.zeros((self.chunk - n, *self.shape), np.float32)])
                xb = torch.from_numpy(part)
                if self.compiled:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                if self.device.type == "cuda":
                    xb = xb.pin_memory().to(self.device, non_blocking=True)
                with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                    logits = self.forward(xb)
                out.append(torch.softmax(logits.float(), dim=1)[:n].cpu().numpy())
        if not out:
            return np.zeros((0, len(self.class_names)), np.float32)
        return np.concatenate(out)

    def decode_valid(self, batch: pa.Table) -> tuple[np.ndarray, np.ndarray, list]:
        """Images of the rows that can be scored, their row indices, and (row, reason) for the others."""
        col = batch.column(st.IMAGE)
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        n = batch.num_rows
        width = int(np.prod(self.shape)) * 4
        reasons: dict[int, str] = {}
        if col.type != pa.binary(width):
            # Rows of shards with another image size (a batch may mix shards: Arrow then holds them as
            # variable-size binary): the rows of the right size are scored, the others set aside.
            if not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)
                    or pa.types.is_fixed_size_binary(col.type)):
                reason = f"shape: image column {col.type} does not hold {self.shape} float32 stamps"
                return np.zeros((0, *self.shape), np.float32), np.zeros(0, np.int64), [(i, reason) for i in range(n)]
            lengths = pc.binary_length(col).fill_null(width).to_numpy(zero_copy_only=False)
            for i in np.nonzero(lengths != width)[0]:
                reasons[int(i)] = (f"shape: image of {int(lengths[i]) // 4} float32 values, the model takes "
                                   f"{self.shape} = {width // 4}")
            if len(reasons) == n:
                return np.zeros((0, *self.shape), np.float32), np.zeros(0, np.int64), sorted(reasons.items())
            col = pc.if_else(pa.array(lengths == width), col.cast(pa.binary()), pa.scalar(b"\x00" * width, pa.binary()))
            col = col.cast(pa.binary(width))
        if col.null_count:
            for i in np.nonzero(~col.is_valid().to_numpy(zero_copy_only=False))[0]:
                reasons[int(i)] = "shape: no image"
            col = col.fill_null(b"\x00" * width)
        images = st.decode_images(col, self.shape)
        finite = np.isfinite(images).all(axis=(1, 2, 3))
        for i in np.nonzero(~finite)[0]:
            reasons.setdefault(int(i), f"nonfinite: {int((~np.isfinite(images[i])).sum())} non-finite pixels")
        if not reasons:
            return images, np.arange(n), []
        ok = np.ones(n, bool)
        ok[list(reasons)] = False
        good = np.nonzero(ok)[0]
        return images[good], good, sorted(reasons.items())


class Scorer(ModelActor):
    """map_batches callable: stamp rows in, one result row per stamp out (errors flagged in ``_error``)."""

    def __init__(self, model_bytes: bytes, keep: list[str], fractions, model_tag: str, threads: int = 1,
                 use_gpu: bool = False, compile: bool = False, chunk: int = 4096):
        super().__init__(model_bytes, threads, use_gpu, compile, chunk)
        self.keep, self.fractions, self.model_tag = list(keep), tuple(fractions), model_tag
        self.prob_names = [prob_column(c) for c in self.class_names]

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        images, good, bad = self.decode_valid(batch)
        probs = np.full((n, len(self.class_names)), np.nan, np.float32)
        if len(good):
            probs[good] = self.probabilities(self.preprocess(images))
        pred = probs.argmax(axis=1) if n else np.zeros(0, np.int64)
        valid = np.ones(n, bool)
        errors = np.full(n, None, dtype=object)
        for i, reason in bad:
            valid[i] = False
            errors[i] = reason
        names = np.asarray(self.class_names, dtype=object)[pred] if n else np.zeros(0, object)
        fixed = batch.column(st.SPLIT) if st.SPLIT in batch.schema.names else None
        cols = {
            st.ID: batch.column(st.ID),
            st.LABEL: batch.column(st.LABEL) if st.LABEL in batch.schema.names else pa.nulls(n, pa.int64()),
            st.SPLIT: pa.array(splits.assign(batch.column(st.ID), self.fractions, fixed), pa.string()),
            "pred": pa.array(pred.astype(np.int64), mask=~valid),
            "pred_name": pa.array(names, pa.string(), mask=~valid),
        }
        for j, name in enumerate(self.prob_names):
            cols[name] = pa.array(probs[:, j], pa.float32(), mask=~valid)
        cols["model"] = pa.array([self.model_tag] * n, pa.string())
        for k in self.keep:
            cols[k] = batch.column(k)
        cols["_shard"] = batch.column("_shard")
        cols[ERROR] = pa.array(errors, pa.string())
        return pa.table(cols)


def pool_plan(use_gpu: bool, actors: int | None, cpus: float, gpus: float) -> dict:
    """Actor count and per-actor resources (see the module docstring)."""
    if use_gpu:
        if gpus < 1:
            msg = "--use-gpu was given but the Ray cluster has no GPU"
            raise ValueError(msg)
        n = int(actors or gpus)
        return {"actors": n, "num_cpus": 1.0, "num_gpus": 1.0, "threads": 1, "batch_size": 16384}
    n = int(actors or max(1, int(cpus)))
    per = max(0.25, min(1.0, (cpus - 1.0) / n)) if cpus > 1 else 0.25
    return {"actors": n, "num_cpus": per, "num_gpus": 0.0, "threads": max(1, int(per)), "batch_size": 4096}


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done, self.t0, self.last = total, enabled, 0, time.time(), 0.0
        self.tty = sys.stderr.isatty()

    def update(self, rows: int) -> None:
        self.done += rows
        now = time.time()
        if not self.enabled or now - self.last < (0.5 if self.tty else 10.0):
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        pct = 100.0 * self.done / max(self.total, 1)
        line = f"score: {self.done:,}/{self.total:,} stamps ({pct:5.1f}%), {rate:,.0f} stamps/s"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty and self.last:
            print(file=sys.stderr)


TMP_DIR = "_tmp"


def _write_atomic(table: pa.Table, path: str) -> None:
    """Write under ``_tmp/`` of the result directory, then move into place: a reader (or a rerun) sees
    the whole file or none of it."""
    fs, p = st.resolve(path)
    root = posixpath.dirname(p) if posixpath.basename(posixpath.dirname(p)) != "_errors" else \
        posixpath.dirname(posixpath.dirname(p))
    tmp = posixpath.join(root, TMP_DIR, f"{posixpath.basename(p)}.{uuid.uuid4().hex[:8]}")
    fs.create_dir(posixpath.dirname(tmp), recursive=True)
    pq.write_table(table, tmp, filesystem=fs, compression="zstd")
    fs.move(tmp, p)


@dataclass
class ScoreResult:
    out: str
    scored: int
    set_aside: int
    errors: dict
    seconds: float
    rows_per_s: float
    skipped_shards: int
    nothing_to_do: bool = False


def open_model_for(model: str, data: str) -> tuple[st.Manifest, str, dict, bytes]:
    """The dataset's manifest, the checkpoint's path, bundle and bytes, after the compatibility check
    (shared by ``score`` and ``occlude``: the replicas load the bytes from the object store)."""
    manifest = st.read_manifest(data)
    model_path = ck.resolve_path(model)
    bundle = ck.load_bundle(model_path)
    check_compatible(bundle, manifest, data)
    fs, p = st.resolve(model_path)
    with fs.open_input_stream(p) as f:
        return manifest, model_path, bundle, f.read()


def _job_doc(settings: ScoreSettings, bundle: dict, tag: str) -> dict:
    return {"model": settings.model, "model_tag": tag, "data": settings.data, "keep": list(settings.keep),
            "preprocess": bundle["preprocess"], "class_names": list(bundle["class_names"])}


def score(settings: ScoreSettings) -> ScoreResult:
    """Score every stamp of ``settings.data`` with the checkpoint ``settings.model`` (see module docs)."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    from .data import SHARD, read_stamps
    from .runtime import cluster_cpus, cluster_gpus, ray_session

    t0 = time.time()
    manifest, _, bundle, model_bytes = open_model_for(settings.model, settings.data)
    missing = [k for k in settings.keep if k not in manifest.columns]
    if missing:
        extra = [c for c in manifest.columns if c not in st.CORE_COLUMNS]
        msg = f"--keep names columns {missing} that {settings.data} does not have; it has: {', '.join(extra) or 'none'}"
        raise ValueError(msg)
    clash = [k for k in settings.keep if k in (st.ID, st.LABEL, st.SPLIT, "pred", "pred_name", "model")]
    if clash:
        msg = f"--keep {clash}: these columns are always written"
        raise ValueError(msg)
    tag = f"{bundle['model']}@{ck.weights_hash(bundle)}"

    out = settings.out
    st.make_dirs(out)
    job = _job_doc(settings, bundle, tag)
    job_path = st.join(out, JOB_FILE)
    if st.exists(job_path) and not settings.overwrite:
        before = json.loads(st.read_text(job_path))
        for key in ("model_tag", "data", "keep", "preprocess"):
            if before.get(key) != job[key]:
                msg = (f"{out} holds results of another job ({key}: {before.get(key)} vs {job[key]}); "
                       f"choose another --out, or pass --overwrite to start it again")
                raise ValueError(msg)
    if settings.overwrite:
        fs, p = st.resolve(out)
        fs.delete_dir_contents(p, missing_dir_ok=True)
    st.write_text(job_path, json.dumps(job, indent=2))
    ofs, op = st.resolve(out)
    ofs.delete_dir_contents(posixpath.join(op, TMP_DIR), missing_dir_ok=True)  # leftovers of a killed run

    expected = {s["path"]: int(s["rows"]) for s in manifest.shards}
    done = {name for name in expected if st.exists(st.join(out, name))}
    todo = [name for name in expected if name not in done]
    total_rows = sum(expected[n] for n in todo)
    if manifest.num_rows == 0:
        print(f"score: warning: {settings.data} holds no stamps; wrote an empty result", file=sys.stderr)

    counts = {"scored": 0, "set_aside": 0, "errors": {}, "duplicates": 0}
    if todo:
        with ray_session(settings.address):
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False  # stampray prints one progress line instead
            plan = pool_plan(settings.use_gpu, settings.actors, cluster_cpus(), cluster_gpus())
            columns = [st.ID, st.IMAGE, st.LABEL, *settings.keep] + ([st.SPLIT] if st.SPLIT in manifest.columns else [])
            # Quarter-CPU read tasks, kept apart from the actors: fused into the actor operator, Ray Data
            # 2.60 ran the whole pool on a single replica.
            ds = read_stamps(settings.data, todo, columns, tag_shard=True, num_cpus=0.25)
            batch = int(settings.batch_size or plan["batch_size"])
            # torch.compile pays a few seconds per replica and doubles CPU throughput: worth it for big jobs.
            compile_model = settings.compile == "on" or (settings.compile == "auto" and total_rows >= COMPILE_ROWS)
            # 1. One model replica per actor, loaded once from the object store.
            ds = ds.map_batches(
                Scorer, batch_format="pyarrow", batch_size=batch,
                compute=ActorPoolStrategy(size=plan["actors"]), num_cpus=plan["num_cpus"],
                num_gpus=plan["num_gpus"], zero_copy_batch=True,
                fn_constructor_kwargs={"model_bytes": ray.put(model_bytes), "keep": list(settings.keep),
                                       "fractions": tuple(settings.fractions), "model_tag": tag,
                                       "threads": plan["threads"], "use_gpu": settings.use_gpu,
                                       "compile": compile_model, "chunk": batch})
            # 2. The driver gathers each shard's rows and writes the shard once all are in.
            pending: dict[str, list[pa.Table]] = {}
            seen: dict[str, set] = {}
            progress = _Progress(total_rows, settings.progress)
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=4):
                for name in pc_unique(batch.column(SHARD)):
                    part = batch.filter(pc.equal(batch.column(SHARD), name))
                    ids = seen.setdefault(name, set())
                    keep_mask = []
                    for sid in part.column(st.ID).to_pylist():
                        keep_mask.append(sid not in ids)
                        ids.add(sid)
                    if not all(keep_mask):
                        counts["duplicates"] += len(keep_mask) - sum(keep_mask)
                        part = part.filter(pa.array(keep_mask))
                    pending.setdefault(name, []).append(part)
                    progress.update(part.num_rows)
                    if len(ids) == expected[name]:
                        _finish_shard(out, name, pa.concat_tables(pending.pop(name)), counts)
                        seen.pop(name)
            progress.close()
            if pending:
                short = {n: sum(t.num_rows for t in ts) for n, ts in pending.items()}
                msg = (f"score: shards {sorted(short)} came back incomplete ({short} rows of "
                       f"{[expected[n] for n in sorted(short)]}); rerun the same command to finish them")
                raise RuntimeError(msg)

    # 3. The manifest of the result, from every shard file (also those of earlier runs).
    shard_docs, scored, aside, errors = [], 0, 0, {}
    for name in expected:
        meta = pq.read_metadata(st.resolve(st.join(out, name))[1], filesystem=st.resolve(out)[0])
        rows = meta.num_rows
        e_path = st.join(out, "_errors", name)
        e_rows = 0
        if st.exists(e_path):
            et = pq.read_table(st.resolve(e_path)[1], filesystem=st.resolve(out)[0], columns=["reason"])
            e_rows = et.num_rows
            for r in et.column("reason").to_pylist():
                kind = r.split(":", 1)[0]
                errors[kind] = errors.get(kind, 0) + 1
        shard_docs.append({"path": name, "rows": rows, "errors": e_rows})
        scored += rows
        aside += e_rows
    doc = {**job, "num_rows": scored, "set_aside": aside, "errors": errors, "shards": shard_docs,
           "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()}}
    st.write_text(st.join(out, SCORE_MANIFEST), json.dumps(doc, indent=2))
    seconds = time.time() - t0
    return ScoreResult(out, scored, aside, errors, seconds, counts["scored"] / max(seconds, 1e-9) if todo else 0.0,
                       len(done), nothing_to_do=not todo)


def pc_unique(col) -> list[str]:
    return pc.unique(col).to_pylist()


def _finish_shard(out: str, name: str, table: pa.Table, counts: dict) -> None:
    err_mask = table.column(ERROR).is_valid()
    errors = table.filter(err_mask)
    good = table.filter(pc.invert(err_mask)).drop_columns(["_shard", ERROR])
    if errors.num_rows:
        st.make_dirs(st.join(out, "_errors"))
        err = pa.table({"stamp_id": errors.column(st.ID), "source": errors.column("_shard"),
                        "row": pa.nulls(errors.num_rows, pa.int64()), "reason": errors.column(ERROR)})
        _write_atomic(err, st.join(out, "_errors", name))
        for r in errors.column(ERROR).to_pylist():
            kind = r.split(":", 1)[0]
            counts["errors"][kind] = counts["errors"].get(kind, 0) + 1
    # The result file is written last: its presence marks the shard as done.
    _write_atomic(good, st.join(out, name))
    counts["scored"] += good.num_rows + errors.num_rows
    counts["set_aside"] += errors.num_rows


def read_scores(path: str, columns=None) -> pa.Table:
    """All result rows of a score directory."""
    doc = json.loads(st.read_text(st.join(path, SCORE_MANIFEST)))
    fs, _ = st.resolve(path)
    tables = [pq.read_table(st.resolve(st.join(path, s["path"]))[1], filesystem=fs, columns=columns)
              for s in doc["shards"]]
    if not tables:
        return pa.table({st.ID: pa.array([], pa.string())})
    return pa.concat_tables(tables, promote_options="default")


def score_manifest(path: str) -> dict:
    if not st.exists(st.join(path, SCORE_MANIFEST)):
        msg = f"{path} holds no finished scores ({SCORE_MANIFEST} missing); run 'stampray score' first"
        raise FileNotFoundError(msg)
    return json.loads(st.read_text(st.join(path, SCORE_MANIFEST)))
