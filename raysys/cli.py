"""The `raysys` command: look into a storage without Ray.

    raysys status STORAGE                       per stage: planned, done, failed, to do; the running sweep (exit 1
                                                when cells failed)
    raysys results STORAGE TABLE [--where k=v]  print a table, or export it (--output x.csv|x.parquet|x.jsonl)
    raysys report STORAGE [--out DIR]           regenerate the report of the storage's study from the tables
                          [--all | --version N]  every row of the storage; version N of its study
                          [--set report.KEY=VALUE]  judge the same rows by other margins or confidence
    raysys export STORAGE (--tuned HASH | --plm HASH) --to DIR
                                                a model in the formats transformers and peft load (a README says how)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from raysys.config import ConfigError, ReportConfig, apply_override, build, to_dict
from raysys.report import summary
from raysys.report.scope import StudyRows
from raysys.report.status import status_summary
from raysys.storage import results
from raysys.storage.store import Store, atomic_write_bytes
from raysys.storage.study import load_saved_study, load_version


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def filter_table(table: pa.Table, where: list[str]) -> pa.Table:
    """Keep the rows where every `column=value` holds (values parsed as JSON when they parse: 3, 0.5, true)."""
    for clause in where:
        column, sep, value = clause.partition("=")
        if not sep:
            raise ValueError(f"--where '{clause}': expected COLUMN=VALUE")
        if column not in table.column_names:
            raise ValueError(f"--where '{clause}': no column '{column}'; columns: {table.column_names}")
        table = table.filter(pc.equal(table[column], pa.scalar(_parse_value(value), table.schema.field(column).type)))
    return table


def export_table(table: pa.Table, output: Path) -> None:
    suffix = output.suffix.lower()
    sink = pa.BufferOutputStream()
    if suffix == ".parquet":
        pq.write_table(table, sink)
    elif suffix == ".csv":
        plain = table.select([f.name for f in table.schema if not pa.types.is_nested(f.type)])
        pa_csv.write_csv(plain, sink)
    elif suffix == ".jsonl":
        lines = "".join(json.dumps(row, default=str) + "\n" for row in table.to_pylist())
        sink.write(lines.encode())
    else:
        raise ValueError(f"--output {output}: use .parquet, .csv or .jsonl")
    atomic_write_bytes(output, sink.getvalue().to_pybytes())


def results_command(store: Store, table_name: str, where: list[str], columns: list[str] | None,
                    output: Path | None, limit: int) -> str:
    if table_name not in results.SCHEMAS:
        raise ValueError(f"unknown table '{table_name}'; tables: {sorted(results.SCHEMAS)}")
    table = filter_table(results.read_table(store, table_name), where)
    if columns:
        unknown = [c for c in columns if c not in table.column_names]
        if unknown:
            raise ValueError(f"--columns: no column(s) {unknown} in '{table_name}'")
        table = table.select(columns)
    if output:
        export_table(table, output)
        return f"{table.num_rows} rows -> {output}"
    shown = table.drop_columns([c for c in ("config", "error") if c in table.column_names and not columns])
    return shown.slice(0, limit).to_pandas().to_string(max_colwidth=40) + f"\n({table.num_rows} rows)"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="raysys", description="Inspect a raysys storage (no Ray needed).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("status", help="per stage: planned, done, failed, to do; the running sweep")
    p.add_argument("storage")
    p = sub.add_parser("results", help="print or export one result table")
    p.add_argument("storage")
    p.add_argument("table")
    p.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE")
    p.add_argument("--columns", type=lambda s: s.split(","), default=None, metavar="A,B,...")
    p.add_argument("--output", type=Path, default=None, help="write .parquet, .csv or .jsonl instead of printing")
    p.add_argument("--limit", type=int, default=50, help="rows to print (default 50)")
    p = sub.add_parser("report", help="regenerate the report from the Parquet tables")
    p.add_argument("storage")
    p.add_argument("--out", type=Path, default=None,
                   help="local folder for report.md (default <storage>/report, report-all, report-v<N>)")
    p.add_argument("--all", dest="everything", action="store_true",
                   help="every row of the storage, whatever study made it (default: the current study's cells)")
    p.add_argument("--version", type=int, default=None, metavar="N",
                   help="the cells of version N of the storage's study (see the driver's 'study changed' line)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="report.KEY=VALUE",
                   help="judge the findings by another margin or confidence (the report section only)")
    p = sub.add_parser("export", help="write a tuned model or a PLM in the formats transformers and peft load")
    p.add_argument("storage")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--tuned", metavar="HASH", help="a tuned model: its tuning_runs cell_hash (or a unique prefix)")
    which.add_argument("--plm", metavar="HASH", help="a PLM: its pretrain_runs cell_hash (or a unique prefix)")
    p.add_argument("--to", type=Path, required=True, metavar="DIR", help="the folder to write (must not exist)")
    return parser.parse_args(argv)


def export_command(store: Store, tuned: str | None, plm: str | None, out: Path) -> str:
    from raysys.storage import export

    if tuned:
        path = export.export_tuned(store, export.resolve(store, "tuned", tuned), out)
    else:
        path = export.export_plm(store, export.resolve(store, "plm", plm), out)
    return f"exported: {path} (its README.md says how to load it)"


def rejudged(study, overrides: list[str]):
    """The study with its `report` section overridden: the findings' margins and confidence are the only fields
    a report may change, since every other field changes what the rows are."""
    data = {"report": to_dict(study.report)}
    for assignment in overrides:
        if not assignment.startswith("report."):
            raise ConfigError(f"--set {assignment}: a report can only re-judge its rows (report.KEY=VALUE); other "
                              "fields change what the study computes: run the sweep with them")
        data = apply_override(data, assignment)
    return dataclasses.replace(study, report=build(ReportConfig, data["report"], "report"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        store = Store(args.storage)
        if not store.exists():
            raise FileNotFoundError(f"{store.shown}: no such storage")
        if args.command == "status":
            text, failed = status_summary(store)
            print(text)
            if failed:
                return 1  # a script (or CI) watching a sweep learns of failed cells from the exit status
        elif args.command == "results":
            print(results_command(store, args.table, args.where, args.columns, args.output, args.limit))
        elif args.command == "export":
            print(export_command(store, args.tuned, args.plm, args.to))
        else:
            study = load_saved_study(store) if args.version is None else load_version(store, args.version)
            study = rejudged(study, args.overrides)
            scope = StudyRows(study, store, everything=args.everything)
            path = summary.write_report(scope, args.out) if args.out else summary.publish_report(scope)
            print(f"report: {path}")
    except (OSError, ValueError, ConfigError, pa.ArrowInvalid) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
