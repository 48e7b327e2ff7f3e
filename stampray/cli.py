"""Command line: parses arguments and dispatches to the verb functions; holds no logic of its own.

Flags fill each verb's frozen settings dataclass; ``--config FILE`` (JSON or TOML) fills it first, and only
flags given on the command line override it (unset flags never override defaults or the file).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from dataclasses import fields

S = argparse.SUPPRESS


def _shape(text: str) -> tuple[int, int, int]:
    parts = [t.strip() for t in text.split(",") if t.strip()]
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--shape wants C,H,W such as 1,21,21 (each at least 1), got {text!r}")
    if int(parts[1]) * int(parts[2]) > 4096 * 4096:
        raise argparse.ArgumentTypeError(f"--shape {text}: stamps of at most 4096x4096 pixels")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def _classes(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError(f"--classes wants a number of classes, at least 2, got {text!r}")
    return int(text)


def _settings(cls, ns: argparse.Namespace, **fixed):
    """Build a settings dataclass: config file, then the flags the user actually gave; every value is
    checked against its field's declared type (:mod:`stampray.settings`)."""
    from .settings import absolute_paths, coerce, load_config, missing_required

    path = getattr(ns, "config", None)
    values = coerce(cls, load_config(path), f"--config {path}") if path else {}
    names = {f.name for f in fields(cls)}
    values.update(coerce(cls, {k: v for k, v in vars(ns).items() if k in names}, "command line"))
    values.update(fixed)
    missing = missing_required(cls, values)
    if missing:
        flags, keys = ", ".join(m[0] for m in missing), ", ".join(m[1] for m in missing)
        where = f"neither on the command line nor in --config {path}" if path else "missing"
        raise ValueError(f"{flags}: required, {where}; give {'it' if len(missing) == 1 else 'them'} as flags "
                         f"or in a --config file ({keys})")
    return absolute_paths(cls(**values))  # Ray's workers on a cluster run in another directory


# Each verb: its one-line help, and where its settings dataclass lives (module, class). The flags are built
# from the dataclass (stampray/settings.py: add_arguments), so a setting's flag, type, choices, default and
# help are declared once, beside the setting. ``models`` has no settings: it only lists the registry.
VERBS = {
    "synth": ("write a reproducible synthetic survey as a stamp table", "synth", "SynthSettings"),
    "ingest": ("convert npy/npz, HDF5, FITS or pickle stamps into a stamp table", "ingest", "IngestSettings"),
    "cutout": ("cut stamps from FITS mosaics at catalogue positions into a stamp table", "cutout",
               "CutoutSettings"),
    "models": ("list the registered models with parameters and FLOPs", None, None),
    "train": ("train a registered model with Ray Train (data-parallel)", "train", "TrainSettings"),
    "score": ("score stamp shards with a checkpoint (Ray Data, exactly once, resumable)", "score",
              "ScoreSettings"),
    "occlude": ("occlusion maps: where does the network look?", "occlusion", "OccludeSettings"),
    "evaluate": ("confusion matrices, ROC, calibration, thresholds and an HTML report from scores", "evaluate",
                 "EvaluateSettings"),
    "vet": ("an HTML page of the top-ranked and borderline stamps of a class, to vet by eye", "vet",
            "VetSettings"),
    "similar": ("the stamps nearest to given ones by their features (score --features), by cosine distance",
                "similar", "SimilarSettings"),
    "export": ("write a checkpoint as an ONNX model (dynamic batch axis, metadata)", "export", "ExportSettings"),
    "demo": ("the whole pipeline on a small synthetic survey", "demo", "DemoSettings"),
}


def settings_class(verb: str):
    """The settings dataclass of ``verb`` (imported on demand: a verb's parser needs only its own module)."""
    import importlib

    _, module, name = VERBS[verb]
    return getattr(importlib.import_module(f".{module}", __package__), name)


def _version_line() -> str:
    """``stampray 0.1.0 (ray 2.60.0, torch 2.13.0+cpu, python 3.11.7, commit abc123...)``."""
    from .provenance import provenance

    p = provenance()
    commit = f", commit {p['git_commit']}" if p["git_commit"] else ""
    return f"stampray {p['stampray']} (ray {p['ray']}, torch {p['torch']}, python {p['python']}{commit})"


class _Version(argparse.Action):
    """``--version``, with the versions looked up only when asked for (they import torch and Ray)."""

    def __init__(self, option_strings, dest=S, default=S, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version_line())
        parser.exit()


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``stampray`` parser. Every verb's flags come from its settings dataclass; with ``only``, just that
    verb's flags are built (``main`` passes the verb on the command line, so ``stampray synth`` does not
    import torch to describe ``train``)."""
    from .settings import add_arguments

    parser = argparse.ArgumentParser(prog="stampray",
                                     description="Train CNNs on image stamps and score millions of them with Ray.")
    parser.add_argument("--version", action=_Version, help="show the versions of stampray, Ray, PyTorch and Python")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (text, module, _) in VERBS.items():
        p = sub.add_parser(verb, help=text, description=text)
        if only not in (None, verb):
            continue
        if module is None:
            p.add_argument("--shape", type=_shape, default=(1, 21, 21), help="C,H,W (default 1,21,21)")
            p.add_argument("--classes", type=_classes, default=2, help="number of classes (default 2)")
            continue
        add_arguments(p, settings_class(verb))
        p.add_argument("--config", default=None, metavar="FILE",
                       help="JSON or TOML file of settings (keys as the flags' names with underscores); flags "
                            "override it")
    return parser


def _cmd_synth(settings):
    from .synth import synth

    t0 = time.time()
    m = synth(settings)
    dt = time.time() - t0
    if settings.append:  # what this append added; the table's totals after it
        added = m.settings["appends"][-1]
        made, counts = int(added["stamps"]), added.get("label_counts", {})
        where = (f"in {len(added['shards'])} new shards appended to {settings.out} (now {m.num_rows} stamps in "
                 f"{len(m.shards)} shards)")
    else:
        made, counts = m.num_rows, m.label_counts
        where = f"in {len(m.shards)} shards to {settings.out}"
    classes = {name: int(counts.get(str(k), 0)) for k, name in enumerate(m.spec.class_names)}
    print(f"synth: wrote {made} {settings.kind} stamps {m.spec.shape} {where}; classes {classes}; "
          f"{dt:.1f} s ({made / max(dt, 1e-9):,.0f} stamps/s)")


def _cmd_ingest(settings):
    from .ingest import ingest

    r = ingest(settings)
    counts = r.appended_aside if r.appended is not None else r.set_aside
    aside = sum(counts.values())
    detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"
    if r.appended is not None:
        new = len(r.manifest.settings["appends"][-1]["shards"])
        what = (f"appended {r.appended} stamps {r.manifest.spec.shape} in {new} new shards to {settings.out} "
                f"(now {r.ingested} stamps in {len(r.manifest.shards)} shards)")
    else:
        what = f"ingested {r.ingested} stamps {r.manifest.spec.shape} into {len(r.manifest.shards)} shards at {settings.out}"
    print(f"ingest: read {r.rows_in} rows; {what}; set aside {aside} ({detail})"
          + (f", listed in {settings.out}/_errors" if aside else "")
          + f"; classes {list(r.manifest.spec.class_names)}; {r.seconds:.1f} s")
    if r.appended is not None and r.rows_in == 0:  # (a new table of no stamps is refused by ingest itself)
        msg = f"the input holds no rows: no stamp was appended to {settings.out}; check that it is the input you meant"
        raise ValueError(msg)
    if r.appended is not None and not r.appended:  # the table as it was, its ledger says why (a night rerun, say)
        logging.getLogger("stampray").warning(f"ingest: warning: no stamp was appended to {settings.out}; the "
                                              f"{aside} rows set aside are listed in {settings.out}/_errors")


def _cmd_cutout(settings):
    from .cutout import cutout, summary

    r = cutout(settings)
    print(summary(settings, r))


def _cmd_models(ns):
    from .models import describe

    rows = describe(ns.shape, ns.classes)
    c, h, w = ns.shape
    print(f"models at {c}x{h}x{w}, {ns.classes} classes:")
    print(f"{'model':<10} {'parameters':>12} {'MFLOPs/stamp':>13}  source")
    for r in rows:
        if r["params"] is None:
            print(f"{r['model']:<10} {'-':>12} {'-':>13}  {r['note']}")
        else:
            print(f"{r['model']:<10} {r['params']:>12,} {r['flops'] / 1e6:>13.3f}  {r['note']}")


def _cmd_train(settings):
    from .train import fit

    r = fit(settings)
    m = r.metrics
    print(f"train: {settings.model} on {settings.data}: {m.get('epochs_done')} epochs, best epoch "
          f"{m.get('best_epoch')}; test accuracy {m.get('test_acc', float('nan')):.4f}, test AUC "
          f"{m.get('test_auc', float('nan')):.4f} on {m.get('test_n')} stamps; "
          f"{m.get('stamps_per_s', 0):,.0f} stamps/s; {m.get('wall_seconds')} s")
    aside = m.get("set_aside") or {}
    if sum(aside.values()):
        n = sum(aside.values())
        print(f"train: set aside {n} stamp{'s' if n != 1 else ''} with non-finite pixels, not trained on "
              f"({', '.join(f'{k} {v}' for k, v in aside.items())}); listed in {r.run_dir}/_errors")
    print(f"train: best checkpoint {r.best}; TensorBoard: tensorboard --logdir {r.run_dir}/tensorboard")


def _cmd_score(settings):
    from .score import score

    r = score(settings)
    if r.nothing_to_do:
        print(f"score: {settings.out} is already complete ({r.scored} stamps scored, {r.set_aside} set aside); "
              f"nothing to do")
        return
    detail = ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())) or "none"
    where = f" on {len(r.nodes)} nodes" if len(r.nodes) > 1 else ""
    before = (f"; {r.skipped_shards} shards were already done ({r.scored + r.set_aside - r.scored_now} stamps), "
              f"{r.scored_now} stamps scored now{where}") if r.skipped_shards else where
    print(f"score: {r.scored} stamps scored into {settings.out}; set aside {r.set_aside} ({detail})"
          + (f", listed in {settings.out}/_errors" if r.set_aside else "")
          + before + f"; {r.seconds:.1f} s, {r.rows_per_s:,.0f} stamps/s")


def _cmd_occlude(settings):
    from .occlusion import occlude

    r = occlude(settings)
    print(f"occlude: {r.rows} occlusion maps (kernel {settings.kernel}, stride {settings.stride}) written to "
          f"{settings.out}" + (f"; {len(r.pngs)} PNGs in {settings.png}" if r.pngs else "") + f"; {r.seconds:.1f} s")


def _cmd_evaluate(settings):
    from .evaluate import evaluate

    r = evaluate(settings)
    for name, res in r.report["results"].items():
        print(f"evaluate: {name}: {res['n']} stamps ({settings.split} split), accuracy {res['accuracy']:.4f}, "
              f"AUC {res['auc'] if res['auc'] is None else round(res['auc'], 4)}, "
              f"{res['misclassified']['n']} misclassified")
    print(f"evaluate: report {r.html} ({len(r.plots)} plots), numbers in {settings.out}/report.json; "
          f"{r.report['seconds']:.1f} s")


def _cmd_vet(settings):
    from .vet import summary, vet

    print(summary(vet(settings)))


def _cmd_similar(settings):
    from .similar import format_table, similar, summary

    r = similar(settings)
    if settings.out is None:
        print(format_table(r))
    print(summary(r))


def _cmd_export(settings):
    import json
    import time

    from .export import export

    t0 = time.time()
    r = export(settings)
    check = (f"onnxruntime matches PyTorch within {r.max_abs_diff:.1e}" if r.max_abs_diff is not None
             else "onnxruntime not installed: not checked")
    c, h, w = json.loads(r.metadata["stampray.input_shape"])
    print(f"export: wrote {r.path} (input (N, {c}, {h}, {w}) after preprocessing "
          f"{r.metadata['stampray.preprocess']}; output probabilities of {r.metadata['stampray.class_names']}); "
          f"{check}; {time.time() - t0:.1f} s")


def _cmd_demo(settings):
    from .demo import demo

    demo(settings)


COMMANDS = {"synth": _cmd_synth, "ingest": _cmd_ingest, "cutout": _cmd_cutout, "models": _cmd_models,
            "train": _cmd_train, "score": _cmd_score, "occlude": _cmd_occlude, "evaluate": _cmd_evaluate,
            "vet": _cmd_vet, "similar": _cmd_similar, "export": _cmd_export, "demo": _cmd_demo}


class _LineHandler(logging.Handler):
    """What the library logs (``logging.getLogger("stampray...")``), one line each on the current stderr:
    warnings and the verbs' own notes, as ``score: warning: ...``."""

    def emit(self, record):
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging never raises into the verb
            self.handleError(record)


@contextlib.contextmanager
def _log_to_stderr():
    """For one verb: the "stampray" loggers' INFO and above on stderr, and only there (restored after, so a
    caller's own logging setup, or pytest's, is as it was)."""
    log = logging.getLogger("stampray")
    handler = _LineHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    before = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.level, log.propagate = before


def _quiet_private_ray(settings) -> contextlib.AbstractContextManager:
    """On the private local Ray a verb starts (no ``--address``, no ``RAY_ADDRESS``), the console lines of
    Ray's own processes that a user cannot act on are dropped (``inference.RAY_PRIVATE_NOISE``); on a
    cluster the user named, everything Ray says is shown."""
    import os

    if getattr(settings, "address", None) or os.environ.get("RAY_ADDRESS") or not hasattr(settings, "address"):
        return contextlib.nullcontext()
    from .inference import RAY_PRIVATE_NOISE, dropped_stderr_lines

    stack = contextlib.ExitStack()
    stack.enter_context(dropped_stderr_lines(RAY_PRIVATE_NOISE, fd=2))
    stack.enter_context(dropped_stderr_lines(RAY_PRIVATE_NOISE, fd=1))
    return stack


def _verb_of(argv: list[str]) -> str | None:
    """The verb on the command line (the first word that names one), to build only its parser."""
    return next((a for a in argv if a in VERBS), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = _verb_of(argv)
    try:
        parser = build_parser(verb)
    except Exception as e:  # noqa: BLE001 - a verb's module that fails to import is an internal error
        return _report(verb or "", e)
    ns = parser.parse_args(argv)
    if not ns.verb:
        parser.print_help()
        return 2
    from .runtime import on_sigterm, was_terminated

    on_sigterm()
    try:
        with _log_to_stderr():
            settings = ns if VERBS[ns.verb][1] is None else _settings(settings_class(ns.verb), ns)
            from .runtime import reap_before

            reap_before(ns.verb)
            with _quiet_private_ray(settings):
                COMMANDS[ns.verb](settings)
    except (KeyboardInterrupt, SystemExit) as e:
        # SystemExit from inside a verb is Ray's signal handling: Ray Train's Ctrl-C handler aborts the run and
        # exits, and a SIGTERM while ray.init runs meets Ray's sys.exit(15).
        if was_terminated() or (isinstance(e, SystemExit) and e.code == 15):
            print(f"stampray {ns.verb}: terminated (SIGTERM); rerun the same command to resume", file=sys.stderr)
            return 143
        print(f"stampray {ns.verb}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error ends in one line; see _report
        return _report(ns.verb, e)
    return 0


USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, NotImplementedError)


def _report(verb: str, e: BaseException) -> int:
    """One line on stderr for any error, and the exit status.

    A mistake of the user's (a ValueError and the like, raised with a message naming the flag or file and
    the fix) exits 2; a run that stopped for a reason it states (RuntimeError) exits 1; anything else is an
    internal error: its full traceback is saved to a file named in the line, and the exit status is 1.
    Errors raised inside Ray tasks are unwrapped to their cause first.
    """
    import traceback

    cause, seen = e, set()
    while id(cause) not in seen:  # RayTaskError(...).cause, and Ray Data's UserCodeException's __cause__
        seen.add(id(cause))
        inner = getattr(cause, "cause", None) or (cause.__cause__ if type(cause).__name__ == "UserCodeException"
                                                  else None)
        if not isinstance(inner, BaseException):
            break
        cause = inner
    if isinstance(cause, USER_ERRORS):
        print(f"stampray {verb}: error: {cause}", file=sys.stderr)
        return 2
    if isinstance(cause, RuntimeError) and type(cause) is RuntimeError:
        print(f"stampray {verb}: error: {cause}", file=sys.stderr)
        return 1
    lost = _ray_loss(cause)
    if lost:
        print(f"stampray {verb}: error: the Ray cluster lost a node or process this run needed ({lost}); rerun the "
              f"same command once the cluster is up (score, occlude, ingest and train resume from what they "
              f"completed)", file=sys.stderr)
        return 1
    import os
    import tempfile

    fd, path = tempfile.mkstemp(prefix=f"stampray-{verb}-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(f"stampray {' '.join(sys.argv[1:])}\n\n")
        traceback.print_exception(type(e), e, e.__traceback__, file=f)
    line = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    print(f"stampray {verb}: internal error: {type(cause).__name__}: {line[:300]}; the full traceback is in "
          f"{path} (please include it when you report this)", file=sys.stderr)
    return 1


# Ray's errors for a node, a raylet, a worker or an actor that died, or objects lost with them: the cluster's
# state, not a defect of stampray (each is a subclass of one of these, in ray.exceptions).
RAY_LOSSES = ("NodeDiedError", "LocalRayletDiedError", "WorkerCrashedError", "RayActorError", "ObjectLostError",
              "RaySystemError")


def _ray_loss(e: BaseException) -> str | None:
    """``Name: first words of the message`` when ``e`` is one of Ray's :data:`RAY_LOSSES`, else None."""
    classes = [c for c in type(e).__mro__ if c.__module__.startswith("ray.") and c.__name__ in RAY_LOSSES]
    if not classes:
        return None
    text = " ".join(str(e).split())
    if len(text) > 160:
        text = text[:160].rsplit(" ", 1)[0] + " ..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
