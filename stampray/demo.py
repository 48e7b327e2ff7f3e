"""``stampray demo``: the whole pipeline on a synthetic survey, in one command.

Synthesise a tno survey, train ``cnn`` with Ray Train on two workers, score every stamp with Ray Data,
draw occlusion maps for a sample of misclassified stamps, evaluate, and print where everything is.
One Ray instance serves every step and is shut down at the end; a second run in the same place starts
over: the run (``runs/cnn``) and the scores, maps and report directories an earlier demo made there (listed
in its ``_demo.json``, with every file in them) are replaced, each as a whole, once the new demo is complete
(meanwhile they wait in ``_demo-previous/``, and are put back if it fails, or by the next demo if it was
killed); one of them that no demo made, or a file in them that the earlier demo did not write (added or
changed since), is refused, never deleted, and other runs beside ``runs/cnn`` stay. ``--out`` may be a local
directory or a URI (``s3://bucket/prefix``): every step writes through pyarrow's filesystems.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import pyarrow.fs as pafs

from . import table as st
from .evaluate import EvaluateSettings, evaluate
from .occlusion import OccludeSettings, occlude
from .provenance import provenance
from .runtime import ray_session
from .score import ScoreSettings, score
from .synth import SynthSettings, synth
from .train import TrainSettings, fit

log = logging.getLogger(__name__)

DEMO_FILE = "_demo.json"  # in --out: the directories a demo made there, which the next demo may replace
# Replaced by a second demo (its run is runs/cnn: other runs beside it stay); the survey is synth's to replace.
OWN_DIRS = ("runs/cnn", "scores", "maps", "report")


@dataclass(frozen=True)
class DemoSettings:
    """Settings of ``stampray demo``.

    Args:
        out: working directory; a demo's own earlier outputs in it are replaced, nothing else.
        n: number of stamps.
        seed: random seed.
        epochs: training epochs.
        workers: Ray Train workers.
        address: Ray cluster to connect to (default: a private local Ray; RAY_ADDRESS is honoured).
    """

    out: str = field(default="stampray-demo", metadata={"path": True})
    n: int = field(default=20_000, metadata={"flag": "-n"})
    seed: int = 0
    epochs: int = 4
    workers: int = 2
    address: str | None = None

    def __post_init__(self):
        if int(self.n) < MIN_N:
            msg = (f"-n {self.n}: a demo needs at least {MIN_N:,} stamps, so that its validation and test splits "
                   f"hold some of each class")
            raise ValueError(msg)
        for flag, value in (("--epochs", self.epochs), ("--workers", self.workers)):
            if int(value) < 1:
                msg = f"{flag} must be at least 1, got {value}"
                raise ValueError(msg)


MIN_N = 200
ASIDE = "_demo-previous"  # in --out while a demo runs: the earlier demo's directories, put back if it fails


def demo(settings: DemoSettings) -> dict:
    """Run the demo; returns the numbers it prints. The earlier demo's directories are set aside while it
    runs, and put back if it fails: they are replaced only once the new ones are complete."""
    out = settings.out.rstrip("/") if "://" in settings.out else os.path.abspath(settings.out)
    _start_over(out, settings)
    try:
        result = _demo(settings, out)
    except Exception:
        _restore(out)
        raise
    # Its files, listed with their sizes: a later demo replaces these and refuses to go on over any other file
    # in its directories (a user's). Written with the phase: a kill while the earlier results go leaves
    # nothing to put back.
    _set_phase(out, "done", files=_own_files(out))
    _remove(out, ASIDE)
    return result


def _demo(settings: DemoSettings, out: str) -> dict:
    t0 = time.time()
    paths = {k: st.join(out, k) for k in ("survey", "runs", "scores", "maps", "report")}
    with ray_session(settings.address):
        m = synth(SynthSettings(out=paths["survey"], n=settings.n, seed=settings.seed, shard_rows=5000,
                                address=settings.address))
        log.info(f"[1/5] synthesised {m.num_rows:,} tno stamps (21x21, {m.label_counts.get('1', 0):,} with a source) "
              f"at {paths['survey']}")
        t = time.time()
        tr = fit(TrainSettings(model="cnn", data=paths["survey"], out=paths["runs"], workers=settings.workers,
                               epochs=settings.epochs, batch_size=128, seed=settings.seed, address=settings.address))
        log.info(f"[2/5] trained cnn on {settings.workers} Ray Train workers in {time.time() - t:.0f} s: "
              f"test accuracy {tr.metrics['test_acc']:.4f}, AUC {tr.metrics['test_auc']:.4f} "
              f"(best epoch {tr.metrics['best_epoch']})")
        sc = score(ScoreSettings(model=tr.best, data=paths["survey"], out=paths["scores"], keep=("snr", "artifact"),
                                 progress=False, address=settings.address))
        log.info(f"[3/5] scored {sc.scored:,} stamps with Ray Data in {sc.seconds:.1f} s "
              f"({sc.rows_per_s:,.0f} stamps/s) into {paths['scores']}")
        oc = occlude(OccludeSettings(model=tr.best, data=paths["survey"], out=paths["maps"], where="misclassified",
                                     limit=10, png=st.join(paths["maps"], "png"), address=settings.address))
        log.info(f"[4/5] occlusion maps of {oc.rows} misclassified stamps in {paths['maps']}")
    ev = evaluate(EvaluateSettings(scores=(paths["scores"],), out=paths["report"], data=paths["survey"],
                                   run=tr.run_dir, by=("snr",), tensorboard=st.join(tr.run_dir, "tensorboard"),
                                   names=("cnn",)))
    res = ev.report["results"]["cnn"]
    log.info(f"[5/5] evaluated {res['n']:,} held-out test stamps: accuracy {res['accuracy']:.4f}, "
          f"AUC {res['auc']:.4f}")
    seconds = time.time() - t0
    log.info(f"\ndemo finished in {seconds:.0f} s\n"
          f"  report:       {ev.html}\n"
          f"  TensorBoard:  tensorboard --logdir {st.join(tr.run_dir, 'tensorboard')}\n"
          f"  checkpoint:   {tr.best}\n"
          f"  scores:       {paths['scores']}  (Parquet, one file per shard)\n"
          f"  occlusion:    {st.join(paths['maps'], 'png', 'occlusion_grid.png')}\n"
          f"  test accuracy {tr.metrics['test_acc']:.4f}; scoring {sc.rows_per_s:,.0f} stamps/s")
    return {"test_acc": tr.metrics["test_acc"], "eval_acc": res["accuracy"], "scored": sc.scored,
            "stamps_per_s": sc.rows_per_s, "occluded": oc.rows, "report": ev.html, "seconds": round(seconds, 1)}


def _start_over(out: str, settings: DemoSettings) -> None:
    """Set aside (under ``ASIDE``) the directories an earlier demo made in ``out`` (``OWN_DIRS`` listed in its
    ``DEMO_FILE``) and nothing else, then mark them as this demo's (its ``phase``: setting-aside, running,
    then done or restored); the survey is rewritten in place by ``synth`` (which replaces only a table it
    wrote, once the new one is complete). One of them that no demo made (no marker, or not listed) is refused
    with the fix, before anything is deleted. Local or a URI."""
    try:
        fs, _ = st.resolve(out)
    except (ValueError, OSError) as e:
        msg = f"--out {out}: {st.one_line(e)}; give a local directory or a URI such as s3://bucket/prefix"
        raise ValueError(msg) from None
    marker = st.join(out, DEMO_FILE)
    with _storage_errors(out, "read"):
        text = st.read_text(marker) if st.exists(marker) else "{}"
        present = [sub for sub in OWN_DIRS
                   if fs.get_file_info(st.resolve(st.join(out, sub))[1]).type != pafs.FileType.NotFound]
    try:
        ours = set(json.loads(text).get("dirs", []))
    except (ValueError, AttributeError, TypeError) as e:
        msg = (f"--out {out}: cannot read {DEMO_FILE} ({st.one_line(e)}); remove it if an earlier "
               f"demo left it damaged, or choose a new --out")
        raise ValueError(msg) from None
    theirs = [sub for sub in present if sub not in ours]
    if theirs:
        msg = (f"--out {out} holds {', '.join(theirs)}, which 'stampray demo' did not make there (not listed in "
               f"{DEMO_FILE}), and a demo would replace them; choose a new or empty directory for --out (or, if "
               f"they are an older demo's, delete them yourself)")
        raise ValueError(msg)
    with _storage_errors(out, "write to"):
        if st.exists(st.join(out, ASIDE)):
            _finish_earlier(out, json.loads(text) if text.strip() else {})
            present = [sub for sub in OWN_DIRS
                       if fs.get_file_info(st.resolve(st.join(out, sub))[1]).type != pafs.FileType.NotFound]
            text = st.read_text(marker)
        recorded = json.loads(text).get("files") if present else None
        if isinstance(recorded, dict):  # an earlier demo that listed its files (one before that: its dirs whole)
            _refuse_foreign(out, recorded)
        st.make_dirs(out)
        doc = {"verb": "demo", "dirs": list(OWN_DIRS), "settings": asdict(settings), "provenance": provenance()}
        if isinstance(recorded, dict):  # the earlier demo's, while they are set aside (put back if this one fails)
            doc["files"] = recorded
        st.write_text(marker, json.dumps({**doc, "phase": "setting-aside"}, indent=2))
        for sub in present:
            try:
                _move_tree(fs, st.resolve(st.join(out, sub))[1], st.resolve(st.join(out, ASIDE, sub))[1],
                           "://" not in out)
            except OSError as e:
                if "://" in out:
                    raise
                msg = (f"--out {out}: cannot move {st.join(out, sub)}, an earlier demo's, aside "
                       f"({st.one_line(e)}); delete it yourself or choose another --out")
                raise PermissionError(msg) from None
        st.write_text(marker, json.dumps({**doc, "phase": "running"}, indent=2))


def _refuse_foreign(out: str, recorded: dict) -> None:
    """Refuse to go on where the directories a demo replaces hold a file the earlier demo did not write
    (``recorded``: its files and sizes): a user's, added or changed since."""
    foreign = sorted(f for f, size in _own_files(out).items() if recorded.get(f) != size)
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        msg = (f"--out {out}: {', '.join(foreign[:5])}{more} in the directories a demo replaces "
               f"({', '.join(OWN_DIRS)}) are not the earlier demo's files (added or changed since; {DEMO_FILE} lists "
               f"its own), so nothing is replaced; move them out, or choose a new --out")
        raise ValueError(msg)


def _finish_earlier(out: str, doc: dict) -> None:
    """An ``ASIDE`` left by a demo that was killed: what its ``phase`` says to do with it."""
    phase = doc.get("phase")
    if phase == "done":  # killed while removing the results its complete run replaced
        _remove(out, ASIDE)
    elif phase in ("running", "restoring"):  # killed while it ran, or while it put them back
        _restore(out)
    elif phase == "setting-aside":  # killed while it set them aside: back, deleting nothing
        _move_back(out)
    else:
        msg = (f"--out {out} holds {ASIDE}, which no demo there set aside (its {DEMO_FILE} says nothing of it); "
               f"move it away or choose a new --out")
        raise ValueError(msg)


def _set_phase(out: str, phase: str, **more) -> None:
    marker = st.join(out, DEMO_FILE)
    st.write_text(marker, json.dumps({**json.loads(st.read_text(marker)), "phase": phase, **more}, indent=2))


def _own_files(out: str) -> dict[str, int]:
    """The files under the directories a demo replaces (``OWN_DIRS``), as paths relative to ``out`` with
    their sizes."""
    fs, root = st.resolve(out)
    base = root.rstrip("/") + "/"
    files = {}
    for sub in OWN_DIRS:
        for info in fs.get_file_info(pafs.FileSelector(base + sub, recursive=True, allow_not_found=True)):
            if info.type == pafs.FileType.File:
                files[info.path[len(base):]] = int(info.size)
    return dict(sorted(files.items()))


def _move_tree(fs: pafs.FileSystem, src: str, dst: str, local: bool) -> None:
    """Move a directory: one rename on a local disk (to a place that does not exist yet); else file by file,
    into what is already there, so a move cut short is finished by running it again."""
    fs.create_dir(os.path.dirname(dst), recursive=True)
    if local and fs.get_file_info(dst).type == pafs.FileType.NotFound:
        fs.move(src, dst)
        return
    for info in fs.get_file_info(pafs.FileSelector(src, recursive=True)):
        if info.type == pafs.FileType.File:
            target = dst + info.path[len(src.rstrip("/")):]
            fs.create_dir(os.path.dirname(target), recursive=True)
            if fs.get_file_info(target).type == pafs.FileType.File:
                fs.delete_file(target)
            fs.move(info.path, target)
    fs.delete_dir(src)


def _remove(out: str, sub: str) -> None:
    fs, p = st.resolve(st.join(out, sub))
    if fs.get_file_info(p).type == pafs.FileType.Directory:
        fs.delete_dir(p)


def _move_back(out: str) -> None:
    fs, _ = st.resolve(out)
    for sub in OWN_DIRS:
        kept = st.resolve(st.join(out, ASIDE, sub))[1]
        if fs.get_file_info(kept).type == pafs.FileType.Directory:
            _move_tree(fs, kept, st.resolve(st.join(out, sub))[1], "://" not in out)
    _remove(out, ASIDE)


def _restore(out: str) -> None:
    """Put the earlier demo's directories back, in place of what the failed (or killed) demo made of them:
    first those are removed (phase ``running``), then the earlier ones move back (phase ``restoring``, in
    which nothing is removed any more)."""
    if json.loads(st.read_text(st.join(out, DEMO_FILE))).get("phase") != "restoring":
        for sub in OWN_DIRS:
            if st.exists(st.join(out, ASIDE, sub)):
                _remove(out, sub)
        _set_phase(out, "restoring")
    _move_back(out)
    _set_phase(out, "restored")


@contextlib.contextmanager
def _storage_errors(out: str, doing: str) -> Iterator[None]:
    """An object store's error while the demo reads or clears ``out``: one line naming it and the fix."""
    try:
        yield
    except OSError as e:
        if "://" not in out:
            raise
        msg = (f"--out {out}: cannot {doing} it ({st.one_line(e)}); check that the bucket exists and "
               f"that the AWS credentials allow reading and writing there")
        raise PermissionError(msg) from None
