"""#13.3: every verb's flags are built from its settings dataclass, where each setting is documented once."""

import json
import os
from dataclasses import MISSING, dataclass, field, fields

import pytest

from stampray import cli
from stampray.settings import add_arguments, field_help

VERBS = [v for v, (_, module, _) in cli.VERBS.items() if module is not None]


def subparser(verb: str):
    return cli.build_parser(verb)._subparsers._group_actions[0].choices[verb]


@pytest.mark.parametrize("verb", VERBS)
def test_every_setting_of_every_verb_is_a_documented_flag(verb):
    cls = cli.settings_class(verb)
    helps = field_help(cls)
    actions = {a.dest: a for a in subparser(verb)._actions}
    for f in fields(cls):
        assert helps.get(f.name, "").strip(), f"{cls.__name__}.{f.name} has no Args: entry"
        a = actions[f.name]  # the flag exists and fills the field of the same name
        text = helps[f.name].rstrip(".")[:40].replace("%", "%%")
        assert a.help.startswith(f"without {text}" if f.default is True and f.type in (bool, "bool") else text)
        # A required setting may come from --config too: argparse does not require the flag, its help says so.
        required = f.default is MISSING and f.default_factory is MISSING
        assert not a.required and a.help.endswith(f"(required: this flag or {f.name} in --config)") == required
        if "choices" in f.metadata:
            assert tuple(a.choices) == tuple(f.metadata["choices"])


def test_types_defaults_and_choices_come_from_the_declaration(capsys):
    train = subparser("train")
    help_text = " ".join(train.format_help().split())
    assert "--optimizer {adamw,sgd}" in help_text and "(default adamw)" in help_text
    assert "--fractions TRAIN,VAL,TEST" in help_text and "(default 0.7,0.1,0.2)" in help_text
    assert "--no-amp" in help_text and "--wait-gpu SECONDS" in help_text
    ns = cli.build_parser("train").parse_args(["train", "--model", "cnn", "--data", "d", "--out", "o", "--fractions",
                                               "0.5,0.2,0.3", "--epochs", "3", "--no-amp", "--lr", "0.01"])
    assert (ns.fractions, ns.epochs, ns.amp, ns.lr) == ((0.5, 0.2, 0.3), 3, False, 0.01)
    assert not hasattr(ns, "batch_size")  # a flag not given stays out, so a config file's value holds
    for argv, message in [(["--optimizer", "adam"], "invalid choice: 'adam' (choose from 'adamw', 'sgd')"),
                          (["--fractions", "0.5,0.5"], "--fractions wants 3 comma-separated values, got '0.5,0.5'"),
                          (["--fractions", "a,b,c"], "--fractions wants comma-separated numbers, got 'a,b,c'"),
                          (["--epochs", "two"], "argument --epochs: invalid int value: 'two'")]:
        with pytest.raises(SystemExit):
            cli.build_parser("train").parse_args(["train", "--model", "cnn", "--data", "d", "--out", "o", *argv])
        assert message in capsys.readouterr().err
    ingest = " ".join(subparser("ingest").format_help().split())
    assert "source (exactly one form):" in ingest and "--class NAME=FILE" in ingest
    ns = cli.build_parser("ingest").parse_args(["ingest", "--out", "o", "--class", "noise=a.npy", "--class",
                                                "source=b.npy", "--header-keys", "EXPTIME,FILTER"])
    assert ns.class_files == [("noise", "a.npy"), ("source", "b.npy")] and ns.header_keys == ("EXPTIME", "FILTER")
    assert cli.build_parser("synth").parse_args(["synth", "--out", "o", "-n", "7"]).n == 7


def test_a_new_field_is_a_new_flag_and_config_key(tmp_path):
    @dataclass(frozen=True)
    class Toy:
        """Toy settings.

        Args:
            out: where to write.
            size: the size, in pixels;
                more text on a second line.
            mode: how.
            keep: columns to keep.
            quiet: say nothing.
        """

        out: str
        size: int = 5
        mode: str = field(default="a", metadata={"choices": ("a", "b"), "metavar": None})
        keep: tuple[str, ...] = ()
        quiet: bool = False

    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p, Toy)
    text = " ".join(p.format_help().split())
    assert "--size SIZE the size, in pixels; more text on a second line (default 5)" in text
    assert "--quiet say nothing" in text
    ns = p.parse_args(["--out", "x", "--keep", "snr,ra", "--mode", "b", "--quiet"])
    cfg = tmp_path / "toy.json"
    cfg.write_text(json.dumps({"size": 9, "mode": "a"}))
    ns.config = str(cfg)
    assert cli._settings(Toy, ns) == Toy(out="x", size=9, mode="b", keep=("snr", "ra"), quiet=True)


def test_a_verb_parses_without_importing_the_others():
    import subprocess
    import sys

    code = ("import sys; from stampray import cli; cli.build_parser('synth'); "
            "print(sorted(m for m in ('torch', 'stampray.train', 'stampray.score') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_local_paths_are_made_absolute_and_uris_kept(tmp_path, monkeypatch):
    """Ray's workers on a cluster run in another directory (where `ray start` ran): the verbs hand them
    absolute paths, resolved where the user ran the command."""
    monkeypatch.chdir(tmp_path)
    ns = cli.build_parser("ingest").parse_args(["ingest", "--out", "o", "--class", "noise=a.npy", "--class",
                                                "source=/x/b.npy", "--id-prefix", "rel"])
    s = cli._settings(cli.settings_class("ingest"), ns)
    assert s.out == str(tmp_path / "o")
    assert s.class_files == (("noise", str(tmp_path / "a.npy")), ("source", "/x/b.npy"))
    assert s.id_prefix == "rel"  # not a path: as given
    ns = cli.build_parser("evaluate").parse_args(["evaluate", "--scores", "a", "--scores", "s3://b/c", "--out", "../r"])
    s = cli._settings(cli.settings_class("evaluate"), ns)
    assert s.scores == (str(tmp_path / "a"), "s3://b/c") and s.out == str(tmp_path.parent / "r") and s.run is None
    ns = cli.build_parser("train").parse_args(["train", "--model", "cnn", "--data", "t", "--out", "runs"])
    s = cli._settings(cli.settings_class("train"), ns)
    assert (s.model, s.data, s.out) == ("cnn", str(tmp_path / "t"), str(tmp_path / "runs"))  # a model's name stays


def test_a_relative_path_in_a_ray_jobs_temporary_working_dir_copy_is_refused(tmp_path, monkeypatch, capsys):
    """A submitted job's driver starts in Ray's copy of its --working-dir, which Ray deletes later."""
    from stampray.cli import main

    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    assert main(["synth", "-n", "20", "--out", "relsynth"]) == 2
    assert capsys.readouterr().err == (
        f"stampray synth: error: --out relsynth is a relative path, and this Ray job runs in Ray's temporary copy of "
        f"its --working-dir ({copy}), which Ray deletes: give an absolute path on storage the cluster's nodes share, "
        f"or a URI (s3://...)\n")
    assert main(["synth", "-n", "20", "--out", str(tmp_path / "tno")]) == 0
    assert os.listdir(copy) == []
