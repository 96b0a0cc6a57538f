"""`raysys results`: one result table filtered, sorted, grouped and written as a person or a program wants it —
with pyarrow alone (no pandas needed to compute, none to read the output)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from raysys.report.tables import markdown_table
from raysys.storage import results
from raysys.storage.store import Store, atomic_write_bytes

# What a printed row leaves out unless --columns names it: provenance, long text, and the hashes of a cell's inputs
# (a cell's own hash stays: it is what `raysys export` and the artifacts are named by)
HIDDEN = {"error", "config", "host", "node_id", "code_version", "schema_version", "repeated_failures"}
OPERATORS = {"!=": pc.not_equal, ">=": pc.greater_equal, "<=": pc.less_equal, "=": pc.equal, ">": pc.greater,
             "<": pc.less}
AGGREGATES = ("mean", "std", "min", "max", "count")
FORMATS = (".parquet", ".csv", ".jsonl", ".md")


def _value(text: str, column: str, table: pa.Table) -> pa.Scalar:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    try:
        return pa.scalar(value, table.schema.field(column).type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        raise ValueError(f"--where: '{text}' is no value of column '{column}' "
                         f"({table.schema.field(column).type})") from None


def filter_table(table: pa.Table, where: list[str]) -> pa.Table:
    """Keep the rows where every `COLUMN OP VALUE` holds (OP one of = != < <= > >=; values parsed as JSON when
    they parse: 3, 0.5, true)."""
    pattern = re.compile(r"^([^=!<>]+)(" + "|".join(re.escape(op) for op in OPERATORS) + r")(.*)$")
    for clause in where:
        match = pattern.match(clause)
        if not match:
            raise ValueError(f"--where '{clause}': expected COLUMN OP VALUE, OP one of {' '.join(OPERATORS)}")
        column, op, text = match.group(1).strip(), match.group(2), match.group(3).strip()
        check_columns(table, [column], f"--where '{clause}'")
        table = table.filter(OPERATORS[op](table[column], _value(text, column, table)))
    return table


def check_columns(table: pa.Table, columns: list[str], flag: str) -> None:
    unknown = [c for c in columns if c not in table.column_names]
    if unknown:
        raise ValueError(f"{flag}: no column {unknown[0]!r}; columns: {table.column_names}")


def sort_table(table: pa.Table, keys: list[str]) -> pa.Table:
    """Sorted by `keys` in order, a key written `COLUMN:desc` (or `-COLUMN`) descending."""
    order = []
    for key in keys:
        name, _, direction = key.partition(":")
        if direction not in ("", "asc", "desc"):
            raise ValueError(f"--sort {key}: write COLUMN, COLUMN:asc or COLUMN:desc")
        descending = direction == "desc" or name.startswith("-")
        order.append((name.removeprefix("-"), "descending" if descending else "ascending"))
    check_columns(table, [name for name, _ in order], "--sort")
    return table.sort_by(order)


def group_table(table: pa.Table, keys: list[str], aggregates: list[str], columns: list[str] | None) -> pa.Table:
    """One row per value of `keys`: each aggregate (mean, std — the sample's, min, max, count) of each numeric
    column (or of `columns`), named `<column>_<aggregate>`, with `rows` counting the group."""
    check_columns(table, keys, "--group-by")
    bad = [a for a in aggregates if a not in AGGREGATES]
    if bad:
        raise ValueError(f"--agg: unknown {bad[0]!r}; known: {', '.join(AGGREGATES)}")
    if columns:
        check_columns(table, columns, "--columns")
    numeric = columns or [f.name for f in table.schema if f.name not in keys and f.name not in HIDDEN
                          and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))]
    specs = [(keys[0], "count", None, "rows")]
    for column in numeric:
        for agg in aggregates:
            function, options = {"std": ("stddev", pc.VarianceOptions(ddof=1)), "count": ("count", None)}.get(
                agg, (agg, None))
            specs.append((column, function, options, f"{column}_{agg}"))
    grouped = table.group_by(keys).aggregate([(c, f, o) if o else (c, f) for c, f, o, _ in specs])
    names = {f"{c}_{f}": name for c, f, _, name in specs}
    grouped = grouped.rename_columns([names.get(n, n) for n in grouped.column_names])
    return grouped.select(keys + [name for *_, name in specs]).sort_by([(k, "ascending") for k in keys])


def shown_columns(table: pa.Table) -> pa.Table:
    """The columns a printed table shows by default: what the cell is and what it measured."""
    return table.select([n for n in table.column_names if n not in HIDDEN and not n.endswith("_hash")
                         or n == "cell_hash"])


def write_table(table: pa.Table, output: Path) -> None:
    suffix = output.suffix.lower()
    sink = pa.BufferOutputStream()
    if suffix == ".parquet":
        pq.write_table(table, sink)
    elif suffix == ".csv":
        plain = table.select([f.name for f in table.schema if not pa.types.is_nested(f.type)])
        pa_csv.write_csv(plain, sink)
    elif suffix == ".jsonl":
        sink.write("".join(json.dumps(row, default=str) + "\n" for row in table.to_pylist()).encode())
    elif suffix == ".md":
        sink.write((markdown_rows(table) + "\n").encode())
    else:
        raise ValueError(f"--output {output}: use {', '.join(FORMATS)}")
    atomic_write_bytes(output, sink.getvalue().to_pybytes())


def markdown_rows(table: pa.Table) -> str:
    return markdown_table(table.column_names, [[_cell(v) for v in row.values()] for row in table.to_pylist()])


def _cell(value) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def list_tables(store: Store) -> str:
    """Every table with its rows (ok / all, where it has a status) and columns: what `raysys results` can show."""
    lines = [f"{'table':<22} {'rows':>7} {'ok':>7} {'columns':>8}"]
    for name in sorted(results.SCHEMAS):
        has_status = "status" in results.SCHEMAS[name].names
        table = results.read_table(store, name, ["status"] if has_status else None)
        ok = table.num_rows
        if has_status:
            ok = pc.sum(pc.equal(table["status"], "ok")).as_py() or 0
        lines.append(f"{name:<22} {table.num_rows:>7} {ok:>7} {len(results.SCHEMAS[name].names):>8}")
    return "\n".join(lines + ["", "raysys results STORAGE TABLE [--where ...] [--sort ...] [--group-by ... --agg ...]"])
