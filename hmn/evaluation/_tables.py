"""The cell and file format of the evaluation's CSV tables, shared by the report (:mod:`hmn.evaluation.report`)
and the comparison (:mod:`hmn.evaluation.compare`), so that the comparison does not import the report (whose
command line reads predictions with the comparison's reader)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from typing import Any

import numpy as np

from hmn.durable import atomic_write


def _num(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    x = float(x)
    return repr(x) if np.isfinite(x) else ""


def _table(path: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Writes one CSV file (header `columns`, then `rows`) atomically, as every table of the report is written."""
    def write(f: Any) -> None:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(columns)
        w.writerows(rows)

    atomic_write(path, write)
