"""Compare every result table of two storages cell for cell, timing and provenance columns aside: what a refactor
or a speed change must leave identical (run the tiny study at the old commit into one storage and at the new one
into another, then `python bench/compare_runs.py OLD NEW`). Exit 0 when every table matches.

Rows are matched by their key — the cell hash plus the columns that tell a cell's rows apart (a step, a split, a
layer and head, ...) — and every other column is compared exactly (floats bit for bit).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysys.storage import results
from raysys.storage.store import Store

# When and where a row was made, and how fast: never the same twice.
PROVENANCE = {"started_at", "seconds", "host", "node_id", "code_version", "train_seconds", "seconds_to_target",
              "full_dev_seconds_to_target", "tokens_per_second", "attempts", "start_train_seconds"}
# Besides the cell hash, what tells one cell's rows apart.
ROW_KEYS = ("step", "split", "layer", "head", "what", "kind", "task", "alpha", "method", "setting", "seed")


def _rows(store: Store, table: str) -> dict[tuple, dict]:
    rows = results.read_table(store, table).to_pylist()
    names = [n for n in results.SCHEMAS[table].names if n not in PROVENANCE]
    keys = [k for k in ("cell_hash", *ROW_KEYS) if k in names]
    out = {}
    for row in rows:
        key = tuple(row[k] for k in keys)
        if key in out:
            raise ValueError(f"{table}: two rows with key {dict(zip(keys, key))}")
        out[key] = {n: row[n] for n in names}
    return out


def _same(x, y) -> bool:
    """Equal, NaN equal to NaN (a barrier of a path that never moved)."""
    return x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))


def compare(old: Store, new: Store, ignore: set[str] = frozenset()) -> dict[str, dict]:
    """Per table: rows in each, rows only in one, and (column -> count) of differing values in shared rows."""
    report = {}
    for table in results.SCHEMAS:
        a, b = _rows(old, table), _rows(new, table)
        differing: dict[str, int] = {}
        for key in a.keys() & b.keys():
            for column, value in a[key].items():
                if column not in ignore and not _same(value, b[key][column]):
                    differing[column] = differing.get(column, 0) + 1
        report[table] = {"rows": (len(a), len(b)), "only_old": len(a.keys() - b.keys()),
                         "only_new": len(b.keys() - a.keys()), "differing": differing}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--ignore", nargs="*", default=[], help="columns not to compare (say why in your note)")
    args = parser.parse_args(argv)
    report = compare(Store(args.old), Store(args.new), set(args.ignore))
    same = True
    for table, r in report.items():
        ok = not (r["only_old"] or r["only_new"] or r["differing"])
        same &= ok
        print(f"{table:<20} rows {r['rows'][0]:>6} / {r['rows'][1]:<6} "
              + ("identical" if ok else f"only old {r['only_old']}, only new {r['only_new']}, "
                                        f"differing {r['differing']}"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
