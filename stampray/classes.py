"""Class names: the score columns derived from them, their validation, and matching a model's to a table's.

One place decides every question about class names, so that ingest, synth, score, occlude and evaluate
agree:

* :func:`prob_column` derives the ``p_<class>`` column of a class's probability. Word characters are kept;
  ``+`` and ``-`` become ``plus`` and ``minus`` (``e+`` -> ``p_e_plus``, ``e-`` -> ``p_e_minus``: particle
  labels stay apart and readable) except a hyphen inside a word (``high-z`` -> ``p_high_z``); any other
  character becomes ``_``. Plain word names keep their columns (``noise`` -> ``p_noise``).
* :func:`std_column` derives the ``p_<class>_std`` column of the spread of a class's probability over K
  passes (``score --tta K`` / ``--mc-dropout K``).
* :func:`positive_classes` and :data:`NEGATIVE` state which classes are positive: class 1 of two, every
  class one-vs-rest beyond two; class 0 is the negative class wherever a negative is needed.
* :func:`check_class_names` refuses a class list with an empty name, a name given twice, or two names that
  give the same column, naming both.
* :func:`match_classes` decides how a model's classes meet a table's: the same names in the same order
  pass; the same names in another order are matched by name (the model's outputs are reordered into the
  table's label order, so that ``label``, ``pred`` and the ``p_`` columns agree); other names are refused,
  unless ``rename=True`` (``--rename-classes``) takes the model's names by position.

This module imports nothing heavy: ingest and its Ray tasks use it without loading torch.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

PROB_PREFIX = "p_"
STD_SUFFIX = "_std"
NEGATIVE = 0
"""The negative class (noise, bogus, no detection): label 0, by stampray's convention at ingest and synth.
It is the class a false positive is drawn from (``evaluate --by``: completeness of every other class, and
the share of class-0 stamps called any other class). See :func:`positive_classes`."""
_SIGNS = {"+": "plus", "-": "minus"}


def _column_char(m: re.Match) -> str:
    ch, i, text = m.group(0), m.start(), m.string
    before = i > 0 and bool(re.match(r"\w", text[i - 1]))
    after = i + 1 < len(text) and bool(re.match(r"\w", text[i + 1]))
    if ch not in _SIGNS or (ch == "-" and before and after):  # a hyphen inside a word stays a separator
        return "_"
    return ("_" if before else "") + _SIGNS[ch] + ("_" if after else "")


def prob_column(name: str) -> str:
    """Column name of a class probability: ``p_`` plus the class name made identifier-safe.

    >>> [prob_column(c) for c in ("noise", "e+", "e-", "high-z", "pi0 (decay)")]
    ['p_noise', 'p_e_plus', 'p_e_minus', 'p_high_z', 'p_pi0__decay_']
    """
    return PROB_PREFIX + re.sub(r"\W", _column_char, str(name))


def std_column(name: str) -> str:
    """Column of the standard deviation of a class's probability over K passes (``score --tta K`` or
    ``--mc-dropout K``): :func:`prob_column` plus ``_std``.

    >>> std_column("e+")
    'p_e_plus_std'
    """
    return prob_column(name) + STD_SUFFIX


def positive_classes(k: int) -> list[int]:
    """The classes scored as positives, one curve each (ROC, AUC, PR curves, threshold sweeps, the class to
    rank by): the one rule every verb follows.

    Two classes are a detection problem, negative :data:`NEGATIVE` (class 0) against positive class 1:
    ``[1]``, and a binary score is ``p`` of class 1. With more classes (or one) no class is singled out:
    every class is a positive in turn, one-vs-rest, ``[0, 1, ..., k-1]``, and a single figure is the
    unweighted mean over them (scikit-learn's ``multi_class="ovr", average="macro"``). Where a verb needs
    one class of several (``vet``'s default ``--class``), it takes the last of these, which for two classes
    is class 1.

    >>> positive_classes(2), positive_classes(4)
    ([1], [0, 1, 2, 3])

    Raises
    ------
    ValueError
        ``k`` is not a positive integer.
    """
    n = operator.index(k) if hasattr(k, "__index__") and not isinstance(k, bool) else 0  # NumPy ints too
    if n < 1:
        msg = f"the number of classes must be a positive integer, got {k!r}"
        raise ValueError(msg)
    return [1] if n == 2 else list(range(n))


def check_class_names(names, what: str, fix: str = "give each class a distinct, non-empty name") -> None:
    """Refuse class names that cannot each have a column of their own.

    Parameters
    ----------
    names : sequence of str
        Class names in label order.
    what : str
        Where the names come from (``"--classes"``, ``"the labels of labels.npy"``), for the message.
    fix : str
        How to put it right, for the message.

    Raises
    ------
    ValueError
        A name is empty (or only blanks), a name is given twice, or two names give the same
        :func:`prob_column`; the message names both.
    """
    seen: dict[str, str] = {}
    for i, name in enumerate(str(n) for n in names):
        if not name.strip():
            msg = f"{what}: class {i} has an empty name ({name!r}); {fix}"
            raise ValueError(msg)
        column = prob_column(name)
        if column in seen:
            other = seen[column]
            why = (f"class {name!r} is named twice" if other == name else
                   f"classes {other!r} and {name!r} would share the score column {column!r}")
            msg = f"{what}: {why}; {fix}"
            raise ValueError(msg)
        seen[column] = name


@dataclass(frozen=True)
class ClassMatch:
    """How a model's outputs meet a table's labels.

    Attributes
    ----------
    names : tuple of str
        The class names the outputs are reported under (``pred_name``, ``p_`` columns), in label order.
    order : tuple of int or None
        For each reported class, the index of the model output that gives it; None when they are the
        model's own outputs in the model's order.
    note : str
        What was done, for the user (empty when the names simply agree).
    """

    names: tuple[str, ...]
    order: tuple[int, ...] | None = None
    note: str = ""


def _pairs(a, b) -> str:
    return ", ".join(f"{x} -> {y}" for x, y in zip(a, b))


def match_classes(model_names, data_names, data: str, rename: bool = False) -> ClassMatch:
    """Match a model's classes to those a table declares (see the module docstring).

    Parameters
    ----------
    model_names, data_names : sequence of str
        The checkpoint's class names and the table's, each in label order; a table that names no
        classes (unlabelled data) matches any model.
    data : str
        The table, for messages.
    rename : bool
        ``--rename-classes``: where the names differ, take the model's names by position.

    Raises
    ------
    ValueError
        The class counts differ, or the names differ and ``rename`` is False.
    """
    model, table = tuple(str(c) for c in model_names), tuple(str(c) for c in data_names)
    if not table or table == model:
        return ClassMatch(model)
    if len(table) != len(model):
        msg = (f"{data} declares {len(table)} classes ({', '.join(table)}) but the model predicts "
               f"{len(model)} ({', '.join(model)})")
        raise ValueError(msg)
    if rename:
        note = (f"--rename-classes: {data}'s classes are taken as the model's by position "
                f"({_pairs(table, model)}); scores are written under the model's names")
        return ClassMatch(model, None, note)
    if set(table) == set(model) and len(set(model)) == len(model):
        order = tuple(model.index(c) for c in table)
        note = (f"{data} lists the model's classes in another order ({', '.join(table)}; the model: "
                f"{', '.join(model)}); they are matched by name, and pred, pred_name and the p_ columns "
                f"follow {data}'s labels ({', '.join(f'{i}={c}' for i, c in enumerate(table))})")
        return ClassMatch(table, order, note)
    msg = (f"{data} names its classes {', '.join(table)}; the model predicts {', '.join(model)}. Scores "
           f"of other classes cannot be compared with these labels: score data ingested with the model's "
           f"class names, or, if they are the same classes under other names, pass --rename-classes to take "
           f"the model's names by position ({_pairs(table, model)})")
    raise ValueError(msg)
