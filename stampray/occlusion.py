"""Occlusion maps with Ray Data: ``stampray occlude``.

The notebooks' occlusion test: set a ``kernel``×``kernel`` square of the (preprocessed) stamp to zero at
every position, preprocess again, predict, and map the probability of the true class (the predicted
class when the stamp is unlabelled) at each position; the map is padded back to the stamp size
(``(kernel-1)//2`` before, ``kernel//2`` after, with the map's minimum as the notebooks do), so odd and
even kernels both give an H×W map. All occluded variants of a batch of stamps go through the model as
one large batch, on the same actor-pool machinery as ``stampray score``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import table as st
from .score import ModelActor, open_model_for, pool_plan

WHERE = ("misclassified",)
ERROR = "_error"  # set on rows that could not be occluded (their reason); they go to OUT/_errors/


@dataclass(frozen=True)
class OccludeSettings:
    """Settings of ``stampray occlude``; see ``stampray occlude --help``."""

    model: str
    data: str
    out: str
    kernel: int = 5
    stride: int = 1
    ids: tuple[str, ...] = ()
    where: str | None = None
    limit: int | None = None
    png: str | None = None
    png_limit: int = 20
    batch_size: int | None = None
    actors: int | None = None
    use_gpu: bool = False
    address: str | None = None

    def __post_init__(self):
        if int(self.kernel) < 1 or int(self.stride) < 1:
            msg = f"--kernel and --stride must be positive integers, got {self.kernel!r} and {self.stride!r}"
            raise ValueError(msg)
        if self.where is not None and self.where not in WHERE:
            msg = f"--where must be one of {', '.join(WHERE)}, got {self.where!r}"
            raise ValueError(msg)
        if self.ids and self.where:
            msg = "give either --ids or --where, not both"
            raise ValueError(msg)
        if self.limit is not None and int(self.limit) < 1:
            msg = f"--limit must be a positive integer, got {self.limit!r}"
            raise ValueError(msg)


def occlusion_masks(shape, kernel: int, stride: int) -> tuple[np.ndarray, int, int]:
    """(P, 1, H, W) masks that zero one kernel×kernel window each, and the window grid size."""
    _, h, w = shape
    ys, xs = range(0, h - kernel + 1, stride), range(0, w - kernel + 1, stride)
    if not len(ys) or not len(xs):
        msg = f"--kernel {kernel} does not fit in stamps of {h}x{w}"
        raise ValueError(msg)
    masks = np.ones((len(ys) * len(xs), 1, h, w), np.float32)
    for p, (y, x) in enumerate((y, x) for y in ys for x in xs):
        masks[p, :, y:y + kernel, x:x + kernel] = 0.0
    return masks, len(ys), len(xs)


def occlusion_maps(raw: np.ndarray, target: np.ndarray, kernel: int, stride: int,
                   preprocess: Callable[[np.ndarray], np.ndarray],
                   predict: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Heatmaps (n, H, W): probability of class ``target[i]`` with each window occluded.

    ``predict`` maps preprocessed stamps (N, C, H, W) to class probabilities (N, K).
    """
    n, c, h, w = raw.shape
    if n == 0:
        return np.zeros((0, h, w), np.float32)
    masks, gy, gx = occlusion_masks((c, h, w), kernel, stride)
    base = preprocess(raw)
    variants = (base[:, None] * masks[None]).reshape(n * len(masks), c, h, w)
    probs = predict(preprocess(variants)).reshape(n, len(masks), -1)
    grid = probs[np.arange(n), :, target].reshape(n, gy, gx)
    if stride > 1:  # each window position stands for the stride×stride block it starts
        grid = np.repeat(np.repeat(grid, stride, axis=1), stride, axis=2)[:, :h - kernel + 1, :w - kernel + 1]
    before, after = (kernel - 1) // 2, kernel // 2
    low = grid.reshape(n, -1).min(axis=1)[:, None, None]
    out = np.empty((n, h, w), np.float32)
    out[:] = low
    out[:, before:h - after, before:w - after] = grid
    return out


def _tensor_column(arr: np.ndarray) -> pa.ExtensionArray:
    """(n, ...) float32 -> Arrow's canonical fixed_shape_tensor column."""
    arr = np.ascontiguousarray(arr, np.float32)
    typ = pa.fixed_shape_tensor(pa.float32(), list(arr.shape[1:]))
    storage = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), int(np.prod(arr.shape[1:])))
    return pa.ExtensionArray.from_storage(typ, storage)


class Occluder(ModelActor):
    """map_batches callable: stamp rows in, one heatmap row per selected stamp out."""

    def __init__(self, model_bytes, kernel: int, stride: int, ids: list[str], where: str | None,
                 threads: int = 1, use_gpu: bool = False):
        super().__init__(model_bytes, threads, use_gpu)
        self.kernel, self.stride, self.where = int(kernel), int(stride), where
        self.ids = pa.array(sorted(ids), pa.string()) if ids else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.ids is not None:
            batch = batch.filter(pc.is_in(batch.column(st.ID), value_set=self.ids))
        images, good, bad = self.decode_valid(batch)
        bad_ids = batch.column(st.ID).take(pa.array([i for i, _ in bad], pa.int64())).combine_chunks()
        batch = batch.take(pa.array(good, pa.int64()))
        base = self.probabilities(self.preprocess(images))
        pred = base.argmax(axis=1) if len(base) else np.zeros(0, np.int64)
        label = batch.column(st.LABEL).to_numpy(zero_copy_only=False) if len(batch) else np.zeros(0)
        has_label = batch.column(st.LABEL).is_valid().to_numpy(zero_copy_only=False) if len(batch) else \
            np.zeros(0, bool)
        label = np.where(has_label, np.nan_to_num(label, nan=-1), -1).astype(np.int64)
        target = np.where(has_label, label, pred)
        keep = np.ones(len(batch), bool)
        if self.where == "misclassified":
            keep = has_label & (pred != label)
        idx = np.nonzero(keep)[0]
        heat = occlusion_maps(images[idx], target[idx], self.kernel, self.stride, self.preprocess,
                              self.probabilities)
        rows = len(idx)
        # Rows that cannot be occluded (non-finite pixels, a wrong image size) travel on with their reason
        # and zero-filled maps; the driver writes them to ``OUT/_errors/`` and never among the maps.
        n_bad, hw = len(bad), tuple(self.shape[1:])
        id_col = batch.column(st.ID).combine_chunks()
        return pa.table({
            st.ID: pa.concat_arrays([id_col.take(pa.array(idx, pa.int64())), bad_ids.cast(id_col.type)]),
            st.LABEL: pa.array(np.concatenate([label[idx], np.zeros(n_bad, np.int64)]), pa.int64(),
                               mask=np.concatenate([~has_label[idx], np.ones(n_bad, bool)])),
            "pred": pa.array(np.concatenate([pred[idx], np.full(n_bad, -1)]).astype(np.int64)),
            "target": pa.array(np.concatenate([target[idx], np.full(n_bad, -1)]).astype(np.int64)),
            "base_prob": pa.array(np.concatenate([base[idx, target[idx]] if rows else np.zeros(0),
                                                  np.full(n_bad, np.nan)]), pa.float32()),
            "heatmap": _tensor_column(np.concatenate([heat.reshape(rows, *hw), np.zeros((n_bad, *hw))])),
            "stamp": _tensor_column(np.concatenate([self.preprocess(images[idx])[:, 0] if rows else
                                                    np.zeros((0, *hw)), np.zeros((n_bad, *hw))])),
            ERROR: pa.array([None] * rows + [reason for _, reason in bad], pa.string()),
        })


@dataclass
class OccludeResult:
    out: str
    rows: int
    pngs: list
    seconds: float
    set_aside: int = 0


def occlude(settings: OccludeSettings) -> OccludeResult:
    """Compute occlusion maps for the selected stamps and write them as Parquet (and PNGs)."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    from .data import read_stamps
    from .runtime import cluster_cpus, cluster_gpus, ray_session

    t0 = time.time()
    manifest, _, bundle, model_bytes = open_model_for(settings.model, settings.data)
    occlusion_masks(manifest.spec.shape, settings.kernel, settings.stride)  # kernel fits?
    if settings.where == "misclassified" and not manifest.label_counts:
        msg = f"--where misclassified needs labels, and {settings.data} holds none"
        raise ValueError(msg)
    st.make_dirs(settings.out)
    ofs, _ = st.resolve(settings.out)
    for item in ofs.get_file_info(st.pafs.FileSelector(st.resolve(settings.out)[1], allow_not_found=True)):
        if os.path.basename(item.path).startswith("part-"):
            ofs.delete_file(item.path)
    tables, errors, written, total = [], [], 0, 0
    with ray_session(settings.address):
        ray.data.DataContext.get_current().enable_progress_bars = False
        plan = pool_plan(settings.use_gpu, settings.actors, cluster_cpus(), cluster_gpus())
        ds = read_stamps(settings.data, columns=[st.ID, st.IMAGE, st.LABEL], num_cpus=0.25)
        ds = ds.map_batches(
            Occluder, batch_format="pyarrow", batch_size=settings.batch_size or (512 if settings.use_gpu else 64),
            compute=ActorPoolStrategy(size=plan["actors"]), num_cpus=plan["num_cpus"], num_gpus=plan["num_gpus"],
            fn_constructor_kwargs={"model_bytes": ray.put(model_bytes), "kernel": settings.kernel,
                                   "stride": settings.stride, "ids": list(settings.ids), "where": settings.where,
                                   "threads": plan["threads"], "use_gpu": settings.use_gpu})
        limit = int(settings.limit) if settings.limit else None
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if not batch.num_rows:
                continue
            failed = batch.column(ERROR).is_valid()
            if pc.any(failed).as_py():
                errors.append(batch.filter(failed).select([st.ID, ERROR]))
            batch = batch.filter(pc.invert(failed)).drop_columns([ERROR])
            if limit is not None:
                batch = batch.slice(0, limit - total)
            tables.append(batch)
            total += batch.num_rows
            if sum(t.num_rows for t in tables) >= 10_000:
                written = _flush(settings.out, tables, written)
                tables = []
            if limit is not None and total >= limit:
                break
    if tables or written == 0:
        written = _flush(settings.out, tables, written, allow_empty=True)
    set_aside = _write_errors(settings.out, errors)
    if set_aside:
        print(f"occlude: {set_aside} stamps could not be occluded (non-finite pixels or a wrong image size); "
              f"listed with their reasons in {st.join(settings.out, st.ERRORS_DIR)}", file=sys.stderr)
    if total == 0:
        print("occlude: warning: no stamp matched the selection; wrote an empty table", file=sys.stderr)
    pngs = []
    if settings.png and total:
        first = pq.read_table(st.resolve(st.join(settings.out, "part-00000.parquet"))[1], filesystem=ofs)
        pngs = write_pngs(first.slice(0, settings.png_limit), settings.png, list(bundle["class_names"]))
    return OccludeResult(settings.out, total, pngs, time.time() - t0, set_aside)


def _write_errors(out: str, errors: list) -> int:
    """Write the rows that could not be occluded to ``OUT/_errors/part-00000.parquet``; their count."""
    fs, _ = st.resolve(out)
    epath = st.join(out, st.ERRORS_DIR)
    fs.delete_dir_contents(st.resolve(epath)[1], missing_dir_ok=True)
    if not errors:
        return 0
    tbl = pa.concat_tables(errors).rename_columns([st.ID, "reason"])
    st.make_dirs(epath)
    pq.write_table(tbl, st.resolve(st.join(epath, "part-00000.parquet"))[1], filesystem=fs)
    return tbl.num_rows


def _flush(out: str, tables: list, index: int, allow_empty: bool = False) -> int:
    if not tables and not allow_empty:
        return index
    fs, _ = st.resolve(out)
    if tables:
        tbl = pa.concat_tables(tables)
    else:
        tbl = pa.table({st.ID: pa.array([], pa.string())})
    pq.write_table(tbl, st.resolve(st.join(out, f"part-{index:05d}.parquet"))[1], filesystem=fs)
    return index + 1


def read_maps(path: str) -> pa.Table:
    return pq.read_table(st.resolve(path)[1], filesystem=st.resolve(path)[0])


def write_pngs(table: pa.Table, out_dir: str, class_names: list[str]) -> list[str]:
    """Stamp-plus-heatmap overlays, one PNG per stamp and one grid of them all (the notebooks' picture)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    heat = table.column("heatmap").combine_chunks().to_numpy_ndarray()
    stamps = table.column("stamp").combine_chunks().to_numpy_ndarray()
    ids = table.column(st.ID).to_pylist()
    labels = table.column(st.LABEL).to_pylist()
    preds = table.column("pred").to_pylist()
    base = table.column("base_prob").to_pylist()

    def title(i):
        true = class_names[labels[i]] if labels[i] is not None else "?"
        return f"{ids[i]}\ntrue {true}, pred {class_names[preds[i]]}, p={base[i]:.2f}"

    paths = []
    for i in range(len(ids)):
        fig, ax = plt.subplots(figsize=(3.2, 3.4))
        ax.imshow(stamps[i], cmap="gray", origin="lower")
        im = ax.imshow(heat[i], cmap="Reds_r", alpha=0.5, origin="lower", vmin=0, vmax=1)
        fig.colorbar(im, ax=ax, fraction=0.046, label="p(target) occluded")
        ax.set_title(title(i), fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        path = os.path.join(out_dir, f"{ids[i]}.png".replace("/", "_"))
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    if ids:
        cols = min(5, len(ids))
        rows = (len(ids) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows), squeeze=False)
        for k, ax in enumerate(axes.flat):
            ax.set_xticks([])
            ax.set_yticks([])
            if k < len(ids):
                ax.imshow(stamps[k], cmap="gray", origin="lower")
                ax.imshow(heat[k], cmap="Reds_r", alpha=0.5, origin="lower", vmin=0, vmax=1)
                ax.set_title(title(k), fontsize=6)
            else:
                ax.axis("off")
        fig.tight_layout()
        grid = os.path.join(out_dir, "occlusion_grid.png")
        fig.savefig(grid, dpi=100)
        plt.close(fig)
        paths.append(grid)
    return paths
