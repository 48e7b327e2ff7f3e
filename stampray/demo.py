"""``stampray demo``: the whole pipeline on a synthetic survey, in one command.

Synthesise a tno survey, train ``cnn`` with Ray Train on two workers, score every stamp with Ray Data,
draw occlusion maps for a sample of misclassified stamps, evaluate, and print where everything is.
One Ray instance serves every step and is shut down at the end; a second run in the same place starts
over (the run, scores, maps and report are replaced). ``--out`` may be a local directory or a URI
(``s3://bucket/prefix``): every step writes through pyarrow's filesystems.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from . import table as st
from .evaluate import EvaluateSettings, evaluate
from .occlusion import OccludeSettings, occlude
from .runtime import ray_session
from .score import ScoreSettings, score
from .synth import SynthSettings, synth
from .train import TrainSettings, fit

log = logging.getLogger(__name__)


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

    out: str = "stampray-demo"
    n: int = field(default=20_000, metadata={"flag": "-n"})
    seed: int = 0
    epochs: int = 4
    workers: int = 2
    address: str | None = None


def demo(settings: DemoSettings) -> dict:
    """Run the demo; returns the numbers it prints."""
    t0 = time.time()
    out = settings.out.rstrip("/") if "://" in settings.out else os.path.abspath(settings.out)
    _start_over(out)
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


def _start_over(out: str) -> None:
    """Delete the sub-directories an earlier demo wrote in ``out`` (runs, scores, maps, report) and nothing
    else; the survey is rewritten in place by ``synth``. Local or a URI."""
    try:
        fs, _ = st.resolve(out)
    except (ValueError, OSError) as e:
        msg = f"--out {out}: {' '.join(str(e).split())}; give a local directory or a URI such as s3://bucket/prefix"
        raise ValueError(msg) from None
    for sub in ("runs", "scores", "maps", "report"):
        path = st.join(out, sub)
        p = st.resolve(path)[1]
        try:
            if fs.get_file_info(p).type == pafs.FileType.Directory:
                fs.delete_dir(p)
        except OSError as e:
            if "://" not in out:  # as before: a local directory that cannot be removed is left
                continue
            msg = (f"--out {out}: cannot clear {path} from an earlier run ({' '.join(str(e).split())}); check that "
                   f"the bucket exists and that the AWS credentials allow writing there")
            raise PermissionError(msg) from None
