"""Vetting candidates by eye: ``stampray vet``.

From a score table (``stampray score``'s output, labelled or not) and the stamp table it scored, one
self-contained page, ``OUT/vet.html`` (every picture inline as a base64 PNG), and ``OUT/candidates.parquet``:

* the score distribution: a histogram of ``p_<class>`` for every class (per true class when labelled);
* the *top* gallery: the ``--top`` stamps with the highest probability of ``--class`` (default: the
  positive class, class 1 of two, else the last: ``stampray.classes.positive_classes``), highest first, ties
  broken by ``stamp_id``;
* the *borderline* gallery: the ``--borderline`` stamps whose probability lies nearest ``--threshold``
  (default 0.5), nearest first, ties by ``stamp_id``. A stamp may sit in both galleries.

Each stamp is shown as a survey viewer shows it: every channel as its own panel, stretched with zscale or
asinh (:mod:`stampray.drawing`), with its id, probabilities and metadata (every column of the scores other
than the score columns, ``ra``, ``dec``, ``snr``, ``mjd`` and the like, and any other metadata column of
the stamp table), and beside it the occlusion map's probability change when ``--maps`` (an ``occlude``
output) holds that id.

``--since`` vets only the stamps of the latest shards, e.g. those added by an append: ``--since SHARD``
takes that shard (``part-00007.parquet`` or ``part-00007``) and every shard after it in the stamp
table's manifest order, which is the order writers add them; ``--since N`` takes the last N shards.

Only the shown stamps are read from the stamp table: each shard's ``stamp_id`` column is read and matched
with ``is_in``, and only the row groups holding a match are read with the image and metadata columns.

``candidates.parquet`` holds one row per gallery entry: ``gallery`` (top or borderline), ``rank`` (1 = first
shown), the score columns, the metadata, ``shard`` (the stamp table shard it came from) and ``has_map``.
``vet.json`` records the resolved settings, the counts and the provenance.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import outfiles
from . import table as st
from .lock import output_lock
from .classes import positive_classes, prob_column, std_column
from .data import SHARD
from .drawing import STRETCHES, channel_png, draw_occlusion, figure_png, pyplot
from .progress import Progress
from .provenance import provenance

logger = logging.getLogger(__name__)

HTML_NAME = "vet.html"
CANDIDATES_NAME = "candidates.parquet"
SETTINGS_NAME = "vet.json"
OUT_FILES = (CANDIDATES_NAME, SETTINGS_NAME, HTML_NAME)  # in the order they are put in place: the page last
SCORE_COLUMNS = (st.ID, st.LABEL, st.SPLIT, "pred", "pred_name", "model", "features")
GALLERIES = ("top", "borderline")


@dataclass(frozen=True)
class VetSettings:
    """Settings of ``stampray vet``.

    Args:
        scores: score directory written by 'stampray score' (local path or URI).
        data: the stamp table that was scored; the shown stamps are read from it by id.
        out: output directory for vet.html, candidates.parquet and vet.json (local path or URI).
        class_name: the class to rank by (default: the positive class, class 1 of two, else the last).
        top: stamps in the top gallery, highest probability first.
        borderline: stamps in the borderline gallery, probability nearest --threshold first (0: none).
        threshold: the decision threshold the borderline gallery is centred on.
        since: only the latest shards of --data: a shard name (it and every later shard in manifest order)
            or a number N (the last N shards).
        maps: an 'stampray occlude' output; stamps it holds are shown beside their occlusion map.
        stretch: how stamps are stretched for display: zscale (IRAF/DS9) or asinh.
        progress: a line per stage on stderr.
    """

    scores: str = field(metadata={"path": True})
    data: str = field(metadata={"path": True, "metavar": "STAMPS"})
    out: str = field(metadata={"path": True, "metavar": "DIR"})
    class_name: str | None = field(default=None, metadata={"flag": "--class", "metavar": "NAME"})
    top: int = field(default=25, metadata={"metavar": "N"})
    borderline: int = field(default=25, metadata={"metavar": "N"})
    threshold: float = field(default=0.5, metadata={"metavar": "P"})
    since: str | None = field(default=None, metadata={"metavar": "SHARD|N"})
    maps: str | None = field(default=None, metadata={"path": True, "metavar": "MAPS"})
    stretch: str = field(default="zscale", metadata={"choices": STRETCHES})
    progress: bool = True

    def __post_init__(self):
        for name in ("scores", "data", "out"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                msg = f"--{name} must name a path or URI, got {getattr(self, name)!r}"
                raise ValueError(msg)
        if int(self.top) < 1:
            msg = f"--top must be a positive integer, got {self.top!r}"
            raise ValueError(msg)
        if int(self.borderline) < 0:
            msg = f"--borderline must be an integer >= 0, got {self.borderline!r}"
            raise ValueError(msg)
        if not 0 < float(self.threshold) < 1:
            msg = f"--threshold must lie strictly between 0 and 1, got {self.threshold!r}"
            raise ValueError(msg)
        if self.stretch not in STRETCHES:
            msg = f"--stretch must be one of {', '.join(STRETCHES)}, got {self.stretch!r}"
            raise ValueError(msg)
        if self.since is not None:
            object.__setattr__(self, "since", str(self.since).strip())


@dataclass
class VetResult:
    out: str
    html: str
    candidates: str
    rows: int  # scored stamps vetted (after --since)
    shards: list  # stamp table shards vetted
    top: int
    borderline: int
    maps: int  # gallery stamps shown with an occlusion map
    class_name: str
    seconds: float


# --------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------
def since_shards(manifest: st.Manifest, since: str | None, data: str = "--data") -> list[str]:
    """The shards ``--since`` selects, in manifest order (every shard when ``since`` is None)."""
    names = [str(s["path"]) for s in manifest.shards]
    if since is None:
        return names
    if since.lstrip("+-").isdigit():
        n = int(since)
        if n < 1:
            msg = f"--since {since}: give a shard name or a positive number of shards"
            raise ValueError(msg)
        return names[-n:]
    name = since if since.endswith(".parquet") else since + ".parquet"
    if name not in names:
        listed = ", ".join(names[:3]) + (f", ..., {names[-1]}" if len(names) > 3 else "")
        msg = (f"--since {since}: {data} has no shard of that name (its shards, in order: {listed or 'none'}); "
               f"give one of them, or a number N for the last N shards")
        raise ValueError(msg)
    return names[names.index(name):]


def _scored_only(shards: list[str], doc: dict, manifest: st.Manifest, settings: "VetSettings") -> list[str]:
    """Of the ``shards`` selected, those the scores cover, with a warning naming the others (a table that grew
    since it was scored). All of them when none is covered (the caller says to score them first)."""
    recorded = set(doc.get("data_shards") or ()) or {str(s["path"]) for s in doc.get("shards", [])}
    left = [s for s in shards if s not in recorded]
    if not left or len(left) == len(shards):
        return shards
    rows = {str(s["path"]): int(s["rows"]) for s in manifest.shards}
    named = ", ".join(left[:3]) + (" ..." if len(left) > 3 else "")
    logger.warning(f"vet: warning: {len(left)} of the {len(shards)} shards of {settings.data} ("
                   f"{sum(rows.get(s, 0) for s in left):,} stamps: {named}) have no scores in {settings.scores} yet, "
                   f"and are left out; rerun the same 'stampray score' to score them (it scores only the new shards)")
    return [s for s in shards if s in recorded]


def check_scored_from(doc: dict, manifest: st.Manifest, scores: str, data: str) -> None:
    """Refuse a stamp table other than the one scored: a shard the scores record with another footer,
    or none of the scored shards at all."""
    recorded = doc.get("data_shards") or {}
    have = {str(s["path"]): s.get("footer") for s in manifest.shards}
    changed = sorted(n for n, f in recorded.items() if n in have and f and have[n] and f != have[n])
    if changed:
        msg = (f"--data {data} is not the table --scores {scores} scored: shard {changed[0]} has changed since "
               f"({len(changed)} shard(s) differ); give the stamp table that was scored, or score it again")
        raise ValueError(msg)
    if recorded and not set(recorded) & set(have):
        msg = (f"--data {data} holds none of the shards --scores {scores} scored ({', '.join(sorted(recorded)[:3])}"
               f"{' ...' if len(recorded) > 3 else ''}); give the stamp table that was scored")
        raise ValueError(msg)


def shard_ids(data: str, shards: list[str]) -> pa.Array:
    """The ``stamp_id`` column of some shards (nothing else is read)."""
    chunks = [st.read_parquet(st.join(data, name), [st.ID]).column(st.ID) for name in shards]
    return pa.chunked_array([c for ch in chunks for c in ch.chunks], pa.string()).combine_chunks() if chunks \
        else pa.array([], pa.string())


def rank_top(ids: np.ndarray, p: np.ndarray, n: int) -> np.ndarray:
    """Row indices of the ``n`` highest probabilities, highest first, ties by id."""
    return np.lexsort((ids, -p))[:n]


def rank_borderline(ids: np.ndarray, p: np.ndarray, threshold: float, n: int) -> np.ndarray:
    """Row indices of the ``n`` probabilities nearest ``threshold``, nearest first, ties by id."""
    return np.lexsort((ids, np.abs(p - threshold)))[:n]


def fetch_stamps(data: str, ids: list[str], shards: list[str], columns: list[str]) -> pa.Table:
    """The rows of ``ids`` with ``columns`` (and ``shard``), reading only what they need: each shard's id
    column, then only the row groups that hold a wanted id. Stops once every id is found."""
    want = pa.array(sorted(set(ids)), pa.string())
    cols = [st.ID, *[c for c in columns if c != st.ID]]
    found, seen = [], 0
    fs, _ = st.resolve(data)
    for name in shards:
        path = st.join(data, name)
        try:
            with fs.open_input_file(st.resolve(path)[1]) as f:
                pf = st.open_parquet(f)
                hit = pc.is_in(pf.read(columns=[st.ID]).column(st.ID), value_set=want).to_numpy(zero_copy_only=False)
                if not hit.any():
                    continue
                starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
                groups = sorted({int(g) for g in np.searchsorted(starts, np.nonzero(hit)[0], side="right") - 1})
                part = pf.read_row_groups(groups, columns=cols)
        except (OSError, pa.ArrowException) as e:
            raise ValueError(st.damaged(path, e)) from None
        part = part.filter(pc.is_in(part.column(st.ID), value_set=want))
        found.append(part.append_column("shard", pa.array([name] * part.num_rows, pa.string())))
        seen += part.num_rows
        if seen >= len(want):
            break
    if not found:
        return pa.table({c: pa.array([], pa.string()) for c in [*cols, "shard"]})
    return pa.concat_tables(found, promote_options="default")


MAP_COLUMNS = (st.ID, "heatmap", "base_prob", "target")


def check_maps(maps: str) -> None:
    """Refuse a ``--maps`` that is missing or holds no occlusion maps (a score or stamp table, say), before
    any work."""
    from .pieces import list_files

    fs, p = st.resolve(maps)
    kind = fs.get_file_info(p).type
    if kind == st.pafs.FileType.NotFound:
        msg = f"--maps {maps} does not exist; give the --out directory of 'stampray occlude'"
        raise FileNotFoundError(msg)
    files = [maps] if kind == st.pafs.FileType.File else [st.join(maps, n) for n in list_files(maps)
                                                          if n.startswith("part-")]
    if not files:
        msg = f"--maps {maps} holds no occlusion maps (no part-*.parquet); give the --out directory of 'stampray occlude'"
        raise FileNotFoundError(msg)
    try:
        names = pq.read_schema(st.resolve(files[0])[1], filesystem=fs).names
    except (OSError, pa.ArrowException) as e:
        msg = f"--maps {maps}: {files[0]} is not a Parquet file of occlusion maps ({st.one_line(e)})"
        raise ValueError(msg) from None
    lacking = [c for c in MAP_COLUMNS if c not in names]
    if lacking:
        msg = (f"--maps {maps} holds no occlusion maps ({files[0]} has no {', '.join(lacking)} column); give the "
               f"--out directory of 'stampray occlude'")
        raise ValueError(msg)


def read_map_rows(maps: str, ids: list[str]) -> tuple[dict[str, dict], int | None]:
    """``{stamp_id: {"heatmap", "base_prob", "target"}}`` for the ids an occlude output holds, and its kernel
    (from its ``_maps.json``; None when unknown)."""
    from .occlusion import MAPS_FILE, read_maps

    t = read_maps(maps)
    t = t.filter(pc.is_in(t.column(st.ID), value_set=pa.array(ids, pa.string())))
    marker = st.join(maps, MAPS_FILE)
    kernel = json.loads(st.read_text(marker)).get("kernel") if st.exists(marker) else None
    if not t.num_rows:
        return {}, kernel
    heat = t.column("heatmap").combine_chunks().to_numpy_ndarray()
    rows = {}
    for i, (sid, base, target) in enumerate(zip(t.column(st.ID).to_pylist(), t.column("base_prob").to_pylist(),
                                                 t.column("target").to_pylist())):
        rows[sid] = {"heatmap": heat[i], "base_prob": base, "target": target}
    return rows, kernel


# --------------------------------------------------------------------------------------------------
# The verb
# --------------------------------------------------------------------------------------------------
def _ranked(settings: VetSettings, pcol: str, shards: list[str]) -> tuple[pa.Table, np.ndarray, dict]:
    """The scored rows (of the ``--since`` shards), their ids, and the rows of each gallery."""
    from .score import FEATURES, read_scores

    t = read_scores(settings.scores, skip=(FEATURES,))
    if t.num_rows == 0 or pcol not in t.column_names:
        msg = f"--scores {settings.scores} holds no scored rows; run 'stampray score' first"
        raise ValueError(msg)
    t = t.filter(t.column(pcol).is_valid())
    if settings.since is not None:
        t = t.filter(pc.is_in(t.column(st.ID), value_set=shard_ids(settings.data, shards)))
        if t.num_rows == 0:
            msg = (f"--scores {settings.scores} holds no rows of the shards --since {settings.since} selects "
                   f"({shards[0]}{' ...' if len(shards) > 1 else ''}); score them first")
            raise ValueError(msg)
    ids = np.asarray(t.column(st.ID).to_pylist(), dtype=str)
    p = t.column(pcol).to_numpy(zero_copy_only=False).astype(np.float64)
    picks = {"top": rank_top(ids, p, int(settings.top)),
             "borderline": rank_borderline(ids, p, float(settings.threshold), int(settings.borderline))}
    return t, ids, picks


def _shown_stamps(settings: VetSettings, t: pa.Table, manifest: st.Manifest, shards: list[str], shown: list[str],
                  meta_data: list[str]) -> tuple[dict, dict, dict]:
    """The pixels, table metadata and shard of each stamp shown, read from ``--data`` (only the shards that
    hold them, where score recorded each row's shard)."""
    if SHARD in t.column_names:
        wanted = set(t.filter(pc.is_in(t.column(st.ID), value_set=pa.array(shown, pa.string())))
                     .column(SHARD).to_pylist())
        shards = [s for s in shards if s in wanted]
    stamps = fetch_stamps(settings.data, shown, shards, [st.IMAGE, *meta_data])
    missing = sorted(set(shown) - set(stamps.column(st.ID).to_pylist()))
    if missing:
        msg = (f"--data {settings.data} lacks {len(missing)} of the stamps to show ({', '.join(missing[:3])}"
               f"{' ...' if len(missing) > 3 else ''}); the scores were made from another table: give the one "
               f"that was scored")
        raise ValueError(msg)
    ids = stamps.column(st.ID).to_pylist()
    images = dict(zip(ids, st.decode_images(stamps.column(st.IMAGE), manifest.spec.shape)))
    data_meta = {c: dict(zip(ids, stamps.column(c).to_pylist())) for c in meta_data}
    return images, data_meta, dict(zip(ids, stamps.column("shard").to_pylist()))


def vet(settings: VetSettings) -> VetResult:
    """Rank, draw and write the vetting page and the candidate table; see the module docstring."""
    t0 = time.time()
    progress = Progress("vet", 0, settings.progress, unit="stages")
    say = progress.say
    st.check_separate(settings.out, {"--scores": settings.scores, "--data": settings.data, "--maps": settings.maps})
    outfiles.check(settings.out, VET_FILES)
    if settings.maps:
        check_maps(settings.maps)
    from .score import score_manifest  # torch: only when vet runs, not for --help

    doc = score_manifest(settings.scores)
    names = [str(c) for c in doc["class_names"]]
    cls = settings.class_name if settings.class_name is not None else names[positive_classes(len(names))[-1]]
    if cls not in names:
        msg = f"--class {cls!r} is not a class of --scores {settings.scores}; its classes are {', '.join(names)}"
        raise ValueError(msg)
    manifest = st.read_manifest(settings.data)
    check_scored_from(doc, manifest, settings.scores, settings.data)
    shards = _scored_only(since_shards(manifest, settings.since), doc, manifest, settings)

    say(f"reading the scores in {settings.scores}")
    t, ids, picks = _ranked(settings, prob_column(cls), shards)
    shown = sorted({ids[i] for rows in picks.values() for i in rows})
    meta_scores = [c for c in t.column_names if c not in SCORE_COLUMNS and not c.startswith("_")
                   and c not in {prob_column(n) for n in names} | {std_column(n) for n in names}]
    meta_data = [c for c in manifest.columns if c not in (st.ID, st.IMAGE, st.LABEL, st.SPLIT)
                 and not c.startswith("_") and c not in t.column_names]
    say(f"reading {len(shown)} stamps from {settings.data}")
    images, data_meta, shard_of = _shown_stamps(settings, t, manifest, shards, shown, meta_data)

    maps, kernel = {}, None
    if settings.maps:
        say(f"joining occlusion maps from {settings.maps}")
        maps, kernel = read_map_rows(settings.maps, shown)
        if maps and kernel is None:
            logger.warning("--maps %s records no kernel (no _maps.json): its border is drawn as measured",
                           settings.maps)

    candidates = build_candidates(t, picks, data_meta, shard_of, set(maps))
    say(f"drawing {len(shown)} stamps")
    page = render_page(settings, t, names, cls, candidates, images, maps, kernel or 1, meta_scores + meta_data,
                       len(shards), len(manifest.shards))
    cand_path, html_path = st.join(settings.out, CANDIDATES_NAME), st.join(settings.out, HTML_NAME)
    result = VetResult(settings.out, html_path, cand_path, t.num_rows, shards,
                       int((pc.equal(candidates.column("gallery"), "top")).to_numpy(zero_copy_only=False).sum()),
                       int((pc.equal(candidates.column("gallery"), "borderline")).to_numpy(zero_copy_only=False).sum()),
                       len(maps), cls, 0.0)
    result.seconds = round(time.time() - t0, 2)
    with tempfile.TemporaryDirectory(prefix="stampray-vet-") as staged:
        pq.write_table(candidates, os.path.join(staged, CANDIDATES_NAME))
        with open(os.path.join(staged, SETTINGS_NAME), "w") as f:
            json.dump({"settings": asdict(settings), "class": cls, "rows": result.rows, "shards": shards,
                       "top": result.top, "borderline": result.borderline, "maps": result.maps, "kernel": kernel,
                       "seconds": result.seconds, "provenance": provenance()}, f, indent=1)
        with open(os.path.join(staged, HTML_NAME), "w") as f:
            f.write(page)
        with output_lock(settings.out, "vet"):
            outfiles.publish(staged, list(OUT_FILES), settings.out, VET_FILES)  # the page last
    progress.close()
    return result


def _legacy_vet(out: str) -> set[str]:
    """The files of a vet output written before the outfiles marker, known by its vet.json."""
    try:
        doc = json.loads(st.read_text(st.join(out, SETTINGS_NAME)))
    except (OSError, ValueError, UnicodeDecodeError):
        return set()
    ours = isinstance(doc, dict) and {"settings", "class", "provenance"} <= set(doc)
    return set(OUT_FILES) if ours else set()


VET_FILES = outfiles.Files("vet", "--out", OUT_FILES, ".html", _legacy_vet)  # ".html": vet.html only, in fixed


def build_candidates(t: pa.Table, picks: dict[str, np.ndarray], data_meta: dict[str, dict], shard_of: dict,
                     with_map: set) -> pa.Table:
    """One row per gallery entry: gallery, rank, the score row, the stamp table's metadata, shard, has_map."""
    parts = []
    for gallery in GALLERIES:
        rows = t.take(pa.array(picks[gallery], pa.int64())).drop_columns([c for c in t.column_names
                                                                          if c.startswith("_")])
        n = rows.num_rows
        ids = rows.column(st.ID).to_pylist()
        rows = rows.add_column(0, "rank", pa.array(np.arange(1, n + 1), pa.int64()))
        rows = rows.add_column(0, "gallery", pa.array([gallery] * n, pa.string()))
        for c, values in data_meta.items():
            rows = rows.append_column(c, pa.array([values[i] for i in ids]))
        rows = rows.append_column("shard", pa.array([shard_of[i] for i in ids], pa.string()))
        rows = rows.append_column("has_map", pa.array([i in with_map for i in ids], pa.bool_()))
        parts.append(rows)
    return pa.concat_tables(parts, promote_options="default")


# --------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------
def _img(data: bytes, alt: str, cls: str) -> str:
    return (f'<img class="{cls}" alt="{html.escape(alt)}" src="data:image/png;base64,'
            f'{base64.b64encode(data).decode()}">')


def _value(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.6g}" if abs(v) < 1e5 else f"{v:.8g}"
    return html.escape(str(v))


def histogram_png(t: pa.Table, names: list[str], cls: str, threshold: float) -> bytes:
    """p_<class> of every vetted stamp, one panel per class; per true class when the scores are labelled."""
    plt = pyplot()
    k = len(names)
    fig, axes = plt.subplots(1, k, figsize=(2.9 * k, 2.5), squeeze=False, layout="constrained")
    labels = t.column(st.LABEL).to_numpy(zero_copy_only=False) if st.LABEL in t.column_names else None
    labelled = labels is not None and t.column(st.LABEL).null_count < t.num_rows
    edges = np.linspace(0, 1, 21)
    for j, name in enumerate(names):
        ax = axes[0][j]
        p = t.column(prob_column(name)).to_numpy(zero_copy_only=False).astype(float)
        ax.hist(p, bins=edges, color="0.75", label="all")
        if labelled:
            for c, true in enumerate(names):
                ax.hist(p[labels == c], bins=edges, histtype="step", lw=1.2, label=f"true {true}")
        if name == cls:
            ax.axvline(threshold, color="k", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel(f"p({name})", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("stamps", fontsize=8)
    axes[0][0].legend(fontsize=6)
    return figure_png(fig)


def map_png(stamp: np.ndarray, m: dict, kernel: int, names: list[str], how: str) -> bytes:
    """The probability-change map of one stamp (its channels are shown beside it on the page)."""
    target = names[m["target"]] if 0 <= int(m["target"]) < len(names) else str(m["target"])
    fig, ax = pyplot().subplots(figsize=(2.6, 2.6), layout="constrained")
    draw_occlusion(stamp, m["heatmap"], kernel, f"occlusion, p({target})={m['base_prob']:.3f}", ax,
                   base_prob=m["base_prob"], target=target, how=how)
    return figure_png(fig)


STYLE = ("body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px}h2{border-bottom:1px solid #ddd}"
         ".card{display:inline-block;vertical-align:top;border:1px solid #ccc;border-radius:4px;padding:6px;"
         "margin:4px;font-size:12px}.card h3{margin:0 0 4px 0;font-size:13px}.panel{width:128px;height:128px;"
         "image-rendering:pixelated;margin:2px;border:1px solid #999}.map{width:auto;height:180px;"
         "image-rendering:auto;border:none}table{border-collapse:collapse}td,th{padding:1px 6px;text-align:left}"
         "th{color:#555;font-weight:normal}.hist{max-width:100%}")


def render_page(settings: VetSettings, t: pa.Table, names: list[str], cls: str, cand: pa.Table,
                images: dict, maps: dict, kernel: int, meta_cols: list[str], n_shards: int, all_shards: int) -> str:
    """The self-contained page: the histograms, then both galleries, one card per stamp."""
    since = f"; shards: {n_shards} of {all_shards} (--since {html.escape(settings.since)})" if settings.since else ""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>stampray vet: {html.escape(cls)}</title>"
             f"<style>{STYLE}</style></head><body><h1>stampray vet: {html.escape(cls)}</h1>",
             f"<p>scores <code>{html.escape(settings.scores)}</code>, stamps <code>{html.escape(settings.data)}"
             f"</code>: {t.num_rows} scored stamps{since}; stretch {settings.stretch}.</p>",
             "<h2>Score distribution</h2>",
             _img(histogram_png(t, names, cls, settings.threshold), "probability histograms", "hist")]
    rows = cand.to_pylist()
    titles = {"top": f"Top {settings.top}: highest p({html.escape(cls)})",
              "borderline": f"Borderline: p({html.escape(cls)}) nearest {settings.threshold:g}"}
    for gallery in GALLERIES:
        entries = [r for r in rows if r["gallery"] == gallery]
        if gallery == "borderline" and not settings.borderline:
            continue
        parts.append(f"<h2>{titles[gallery]}</h2>")
        for r in entries:
            parts.append(card(r, names, cls, images[r[st.ID]], maps.get(r[st.ID]), kernel, meta_cols, settings.stretch))
    parts.append("<p style='color:#888'>made by stampray vet; every row is in candidates.parquet</p></body></html>")
    return "".join(parts)


def card(r: dict, names: list[str], cls: str, stamp: np.ndarray, m: dict | None, kernel: int,
         meta_cols: list[str], how: str) -> str:
    """One stamp: its channels (one <img> each), its occlusion map when known, and its numbers."""
    sid = str(r[st.ID])
    label = r.get(st.LABEL)
    info = [("p(" + cls + ")", f"{r[prob_column(cls)]:.4f}"), ("predicted", r.get("pred_name"))]
    if label is not None:
        info.append(("true", names[label] if 0 <= label < len(names) else label))
    info += [(c, r.get(c)) for c in meta_cols] + [("shard", r["shard"])]
    panels = "".join(_img(channel_png(stamp[k], how), f"{sid} channel {k}", "panel") for k in range(len(stamp)))
    if m is not None:
        panels += _img(map_png(stamp, m, kernel, names, how), f"{sid} occlusion map", "panel map")
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_value(v)}</td></tr>" for k, v in info)
    return (f"<div class='card' id='{html.escape(r['gallery'])}-{r['rank']}'><h3>#{r['rank']} "
            f"{html.escape(sid)}</h3><div>{panels}</div><table>{cells}</table></div>")


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def summary(r: VetResult) -> str:
    """The verb's closing line: what was written where, the counts, the time."""
    return (f"vet: {r.rows} scored stamps from {len(r.shards)} shard(s); class {r.class_name}: {r.top} top and "
            f"{r.borderline} borderline stamps ({r.maps} with occlusion maps); wrote {r.html} and {r.candidates}; "
            f"{r.seconds:.1f} s")

