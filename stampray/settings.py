"""Settings from flags and config files, checked by their declared types in one place.

Every verb's settings are a frozen dataclass. :func:`coerce` takes the raw values (from a ``--config`` JSON or
TOML file, from flags, or from a Python caller) and checks each against its field's annotation, naming the
setting (as its flag) and where the value came from, so ``"batch_size": "256"`` is refused in one line
rather than failing later with a ``TypeError``, and ``"keep": "snr"`` means the column ``snr``.
"""

from __future__ import annotations

import json
import typing
from dataclasses import fields
from types import NoneType, UnionType


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _describe(value) -> str:
    kind = {str: "a string", bool: "true/false", int: "an integer", float: "a number", list: "a list",
            dict: "a table", NoneType: "null"}.get(type(value), type(value).__name__)
    return f"{value!r} ({kind})"


def _one(tp, value, name: str, where: str):
    """``value`` checked (and, for sequences, normalised) against the annotation ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, UnionType):
        if value is None and NoneType in args:
            return None
        rest = [a for a in args if a is not NoneType]
        errors = []
        for a in rest:
            try:
                return _one(a, value, name, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        want = "true or false"
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        want = "an integer"
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        want = "a number"
    elif tp is str:
        if isinstance(value, str):
            return value
        want = "a string"
    elif origin is tuple:
        if isinstance(value, str):  # "snr,artifact" or "0.7,0.1,0.2" as on the command line, never letter by letter
            parts = [v.strip() for v in value.split(",") if v.strip()]
            kinds = [args[0]] * len(parts) if len(args) == 2 and args[1] is Ellipsis else list(args)
            value = [_from_text(k, v) for k, v in zip(kinds, parts)] + parts[len(kinds):]
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_one(args[0], v, name, where) for v in value)
            if len(value) == len(args):
                return tuple(_one(a, v, name, where) for a, v in zip(args, value))
            want = f"a list of {len(args)} values"
        else:
            want = "a list"
    else:  # an annotation this checker does not know: leave it to the dataclass
        return value
    msg = f"{where}: {flag(name)} must be {want}, got {_describe(value)}"
    raise ValueError(msg)


def _from_text(tp, text: str):
    """A number written as text in a comma list, as the command line reads it; other text as it is."""
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            return text
    return text


def coerce(cls, values: dict, where: str = "settings") -> dict:
    """``values`` checked against ``cls``'s field types; unknown keys refused with the known ones listed."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        msg = (f"{where}: unknown settings {', '.join(unknown)}; known: "
               f"{', '.join(sorted(known))}")
        raise ValueError(msg)
    return {k: _one(hints[k], v, k, where) for k, v in values.items()}


def load_config(path: str) -> dict:
    """A JSON or TOML settings file (by its extension; JSON otherwise), with errors naming the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        msg = f"--config {path}: cannot read it ({e.strerror or e})"
        raise ValueError(msg) from None
    toml = path.lower().endswith(".toml")
    try:
        if toml:
            import tomllib

            doc = tomllib.loads(raw.decode())
        else:
            doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        msg = (f"--config {path} is not valid {'TOML' if toml else 'JSON'} ({e}); settings files are JSON, or "
               f"TOML when named *.toml")
        raise ValueError(msg) from None
    if not isinstance(doc, dict):
        msg = f"--config {path}: want a {'table' if toml else 'JSON object'} of settings, got {_describe(doc)}"
        raise ValueError(msg)
    return doc


def positive(settings, *names: str, allow_none: bool = True) -> None:
    """Refuse a setting that is not a positive integer, naming its flag."""
    for name in names:
        value = getattr(settings, name)
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            msg = f"{flag(name)} must be a positive integer, got {value!r}"
            raise ValueError(msg)


def non_negative(settings, *names: str) -> None:
    """Refuse a number below zero, naming its flag."""
    for name in names:
        value = getattr(settings, name)
        if value is not None and float(value) < 0:
            msg = f"{flag(name)} must be zero or more, got {value!r}"
            raise ValueError(msg)


def field_help(cls) -> dict[str, str]:
    """Each field's description from the ``Args:`` section of a settings class's docstring (Google style:
    ``name: text``, continuation lines indented further), for ``--help``: the settings are documented once,
    where they are declared."""
    import inspect

    out: dict[str, str] = {}
    name, indent = None, None
    for line in inspect.cleandoc(cls.__doc__ or "").split("Args:", 1)[-1].splitlines():
        text = line.strip()
        if not text:
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        head, sep, rest = text.partition(": ")
        if depth < indent:  # the section ended (a "Returns:" or the like)
            break
        if sep and depth == indent and head.isidentifier():
            name, out[head] = head, rest
        elif name:
            out[name] += " " + text
    return out


def cli_help(cls) -> dict[str, str]:
    """Each field's ``--help`` text: its ``Args:`` description, with the default appended where it is a plain
    value (so a default is stated only where the field declares it)."""
    doc = field_help(cls)
    out = {}
    for f in fields(cls):
        text = doc.get(f.name, "").rstrip(".")
        d = f.default
        if text and isinstance(d, (int, float, str)) and not isinstance(d, bool) and d != "":
            text = f"{text} (default {d})"
        elif text and isinstance(d, tuple) and d and all(isinstance(v, (int, float, str)) for v in d):
            text = f"{text} (default {','.join(str(v) for v in d)})"
        out[f.name] = text.replace("%", "%%")
    return out


def add_arguments(parser, cls, *, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of the settings dataclass ``cls`` to an argparse ``parser``.

    The flag, its type, its choices and its help are all read from the declaration, so each is stated once:
    the type from the annotation (``int``, ``float``, ``str``, ``bool``, a tuple as a comma list), the help
    from the class's ``Args:`` docstring section (:func:`field_help`), the default from the field. A field's
    ``metadata`` may add ``flag`` (another name, e.g. ``--class`` for ``class_name``), ``short`` (``-n``),
    ``metavar``, ``choices``, ``group`` (a heading in ``--help``), ``append`` (the flag repeats; each value parsed by ``parse``), ``parse`` (a
    function from the flag's text to the value) and ``cli=False`` (no flag: set from a config file or by a
    caller only). A field without a default is a required setting: its flag, or its key in a ``--config``
    file (:func:`missing_required` checks once both are read); a bool that defaults to True becomes
    ``--no-NAME``. Flags not given are absent from the namespace (``argparse.SUPPRESS``), so they never
    override a config file or the dataclass default.
    """
    import argparse
    from dataclasses import MISSING

    hints = typing.get_type_hints(cls)
    helps = cli_help(cls)
    groups: dict = {}
    top = parser
    for f in fields(cls):
        meta = f.metadata
        if f.name in skip or meta.get("cli", True) is False:
            continue
        parser = top
        if meta.get("group"):
            if meta["group"] not in groups:
                groups[meta["group"]] = top.add_argument_group(meta["group"])
            parser = groups[meta["group"]]
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, UnionType):
            rest = [a for a in typing.get_args(tp) if a is not NoneType]
            tp = rest[0] if len(rest) == 1 else str
        names = [meta.get("flag") or flag(f.name)]
        if meta.get("short"):
            names.insert(0, meta["short"])
        required = f.default is MISSING and f.default_factory is MISSING
        kw: dict = {"dest": f.name, "help": helps.get(f.name) or None, "default": argparse.SUPPRESS}
        if required:
            kw["help"] = f"{kw['help'] or ''} (required: this flag or {f.name} in --config)".lstrip()
        if tp is bool:
            if f.default is True:  # the flag turns the setting off: its help says what goes
                names = [meta.get("flag") or "--no-" + f.name.replace("_", "-")]
                kw["help"] = f"without {kw['help']}" if kw["help"] else None
            kw["action"] = "store_false" if f.default is True else "store_true"
            parser.add_argument(*names, **kw)
            continue
        if meta.get("parse"):
            kw["type"] = meta["parse"]
        elif typing.get_origin(tp) is tuple:
            kw["type"] = _comma_list(tp, names[-1])
        elif tp in (int, float):
            kw["type"] = tp
        if meta.get("append"):
            kw["action"] = "append"
        for key in ("metavar", "choices"):
            if key in meta:
                kw[key] = meta[key]
        parser.add_argument(*names, **kw)


def absolute_paths(settings):
    """``settings`` with every local path setting (``metadata["path"]``) made absolute against this process's
    directory, so that Ray's workers, whose directory on a cluster is another (where ``ray start`` ran), read
    and write the same files the user named. URIs are kept. In a Ray job whose driver runs in Ray's temporary
    copy of its ``--working-dir`` (which Ray deletes), a relative path is refused."""
    import dataclasses
    import os

    job_dir = ray_job_copy(os.getcwd())
    changes = {}
    for f in fields(settings):
        if not f.metadata.get("path"):
            continue
        value = getattr(settings, f.name)

        def absolute(path, f=f):
            if not isinstance(path, str) or not path or "://" in path or os.path.isabs(path):
                return path
            if job_dir:
                name = f.metadata.get("flag") or flag(f.name)
                msg = (f"{name} {path} is a relative path, and this Ray job runs in Ray's temporary copy of its "
                       f"--working-dir ({job_dir}), which Ray deletes: give an absolute path on storage the "
                       f"cluster's nodes share, or a URI (s3://...)")
                raise ValueError(msg)
            return os.path.abspath(path)

        if isinstance(value, tuple):
            new = tuple(tuple(absolute(p) if i == len(v) - 1 else p for i, p in enumerate(v))
                        if isinstance(v, tuple) else absolute(v) for v in value)  # (NAME, FILE) pairs: the file
        else:
            new = absolute(value)
        if new != value:
            changes[f.name] = new
    return dataclasses.replace(settings, **changes) if changes else settings


def ray_job_copy(cwd: str) -> str | None:
    """``cwd`` if it is Ray's copy of a job's ``--working-dir`` (``.../runtime_resources/working_dir_files/
    _ray_pkg_<hash>``, where a submitted job's driver starts), else None."""
    parts = cwd.replace("\\", "/").split("/")
    for i, part in enumerate(parts[:-1]):
        if part == "working_dir_files" and i > 0 and parts[i - 1] == "runtime_resources" and \
                parts[i + 1].startswith("_ray_pkg_"):
            return cwd
    return None


def missing_required(cls, values: dict) -> list[tuple[str, str]]:
    """The (flag, config key) of each of ``cls``'s required settings (fields without a default) that
    ``values`` lacks."""
    from dataclasses import MISSING

    return [(f.metadata.get("flag") or flag(f.name), f.name) for f in fields(cls)
            if f.default is MISSING and f.default_factory is MISSING and f.init and f.name not in values]


def _comma_list(tp, name: str):
    """An argparse type for a tuple field: ``a,b,c`` split at commas, each part converted to its element type
    (``tuple[float, float, float]`` wants exactly three numbers)."""
    import argparse

    args = typing.get_args(tp)
    each = args[0] if len(args) == 2 and args[1] is Ellipsis else None

    def parse(text: str):
        parts = [t.strip() for t in text.split(",") if t.strip()]
        kinds = [each] * len(parts) if each is not None else list(args)
        if len(kinds) != len(parts):
            msg = f"{name} wants {len(kinds)} comma-separated values, got {text!r}"
            raise argparse.ArgumentTypeError(msg)
        try:
            return tuple(k(p) if k in (int, float) else p for k, p in zip(kinds, parts))
        except ValueError:
            kind = " and ".join(sorted({"integers" if k is int else "numbers" for k in kinds if k in (int, float)}))
            msg = f"{name} wants comma-separated {kind}, got {text!r}"
            raise argparse.ArgumentTypeError(msg) from None

    parse.__name__ = "comma list"
    return parse
