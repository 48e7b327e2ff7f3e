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
        if isinstance(value, str):  # "snr,artifact" as on the command line, never letter by letter
            value = [v.strip() for v in value.split(",") if v.strip()]
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
    ``name: text`` indented 8 spaces, continuation lines indented further), for ``--help``: the settings
    are documented once, where they are declared."""
    out: dict[str, str] = {}
    name = None
    for line in (cls.__doc__ or "").split("Args:", 1)[-1].splitlines():
        text = line.strip()
        head, sep, rest = text.partition(": ")
        if sep and len(line) - len(line.lstrip()) == 8 and head.isidentifier():
            name, out[head] = head, rest
        elif name and text:
            out[name] += " " + text
    return out
