"""The `raysys` command: look into a storage without Ray.

    raysys status STORAGE [--watch [SECONDS]]   per stage: planned, done, failed, to do; the running sweep (exit 1
                                                when cells failed)
    raysys results STORAGE [TABLE]              list the tables; print one (--where A>=x, --sort, --group-by A
                                                --agg mean,std), or write it (--output x.csv|.parquet|.jsonl|.md)
    raysys report STORAGE [--out DIR]           regenerate the report of the storage's study from the tables
                          [--all | --version N]  every row of the storage; version N of its study
                          [--set report.KEY=VALUE]  judge the same rows by other margins or confidence
    raysys failures STORAGE [--full]             every failed cell with its error (exit 1 when there are any)
    raysys run [ARGS]                           the sweep (what sweeps/full_paper.py runs; `raysys run --help`)
    raysys export STORAGE (--tuned HASH | --plm HASH) --to DIR
                                                a model in the formats transformers and peft load (a README says how)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import pyarrow as pa

from raysys.config import ConfigError, ReportConfig, apply_override, build, to_dict
from raysys.report import query, summary
from raysys.report.scope import StudyRows
from raysys.report.status import failures, failures_text, status_summary
from raysys.storage import results
from raysys.storage.store import Store
from raysys.storage.study import load_saved_study, load_version


def results_command(store: Store, args: argparse.Namespace) -> str:
    """A table (filtered, grouped, sorted) printed or written to a file; no table: the list of tables."""
    if args.table is None:
        return query.list_tables(store)
    if args.table not in results.SCHEMAS:
        raise ValueError(f"unknown table '{args.table}'; tables: {sorted(results.SCHEMAS)}")
    table = query.filter_table(results.read_table(store, args.table), args.where)
    if args.group_by:
        table = query.group_table(table, args.group_by, args.agg or ["mean", "std"], args.columns)
    elif args.columns:
        query.check_columns(table, args.columns, "--columns")
        table = table.select(args.columns)
    if args.sort:
        table = query.sort_table(table, args.sort)
    if args.output:
        query.write_table(table, args.output)
        return f"{table.num_rows} rows -> {args.output}"
    shown = table if args.columns or args.group_by else query.shown_columns(table)
    return shown.slice(0, args.limit).to_pandas().to_string(max_colwidth=40) + f"\n({table.num_rows} rows)"


EXAMPLES = """examples:
  raysys run --preset tiny                       the whole study at tiny scale (rerun: resumes where it stopped)
  raysys run --preset tiny --dry-run             what the study plans and its training compute; nothing runs
  raysys status runs/tiny                        where each stage stands; exit 1 when cells failed
  raysys failures runs/tiny                      every failed cell with its error
  raysys results runs/tiny                       the result tables; `raysys results --help` for queries
  raysys report runs/tiny                        report.md and its figures from the tables
  raysys export runs/tiny --tuned 3f2a9c --to lora-d1   a tuned model for transformers / peft
"""

RESULTS_EXAMPLES = """examples:
  raysys results runs/tiny                                          the tables and their rows
  raysys results runs/tiny tuning_runs --where tuning_type=lora --where 'test_accuracy>=0.6' --sort test_accuracy:desc
  raysys results runs/tiny methods_runs --where regime=kshot --group-by method,tuning_type --columns test_accuracy
  raysys results runs/tiny tuning_runs --group-by task --agg mean,std,count --output by_task.md
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="raysys", description="Run the recyclable-tuning sweep, and look into its "
                                     "storage (only `run` needs Ray)", epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version())
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", add_help=False, help="run the sweep: the arguments of sweeps/full_paper.py (main takes "
                                                "them before this parser)")
    p = sub.add_parser("status", help="per stage: planned, done, failed, to do; the running sweep (exit 1 when cells "
                                      "failed)")
    p.add_argument("storage")
    p.add_argument("--watch", type=float, nargs="?", const=15.0, default=None, metavar="SECONDS",
                   help="again every SECONDS (default 15) while a sweep runs on the storage; then once more, and exit")
    p = sub.add_parser("failures", help="every failed cell of the study with its error")
    p.add_argument("storage")
    p.add_argument("--full", action="store_true", help="the whole error of each (default: its first 6 lines)")
    listed = lambda s: [x for x in s.split(",") if x]
    p = sub.add_parser("results", help="list the tables, or print, group or export one", epilog=RESULTS_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("storage")
    p.add_argument("table", nargs="?", help="a table (none: list them with their row counts)")
    p.add_argument("--where", action="append", default=[], metavar="COLUMN OP VALUE",
                   help="keep rows where it holds; OP one of = != < <= > >= (repeatable: all must hold)")
    p.add_argument("--columns", type=listed, default=None, metavar="A,B,...",
                   help="the columns to show (default: what the cell is and measured, provenance aside)")
    p.add_argument("--sort", type=listed, default=None, metavar="A,B:desc",
                   help="sort by these, B:desc descending (or --sort=-B)")
    p.add_argument("--group-by", type=listed, default=None, metavar="A,B",
                   help="one row per group: --agg of every numeric column (or of --columns)")
    p.add_argument("--agg", type=listed, default=None, metavar="mean,std",
                   help=f"with --group-by: any of {','.join(query.AGGREGATES)} (default mean,std)")
    p.add_argument("--output", type=Path, default=None,
                   help=f"write {', '.join(query.FORMATS)} instead of printing")
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


def print_status(store: Store) -> tuple[int, bool]:
    """Print the status; (how many planned cells failed, whether a sweep was running)."""
    text, failed, running = status_summary(store)
    print(text, flush=True)
    return failed, running


def watch(store: Store, every: float) -> int:
    """`status --watch`: the status every `every` seconds while a sweep runs on the storage, and once more when it
    has ended (the text that says so is the last one printed)."""
    if every <= 0:
        raise ValueError(f"--watch {every:g}: SECONDS must be more than 0")
    while True:
        failed, running = print_status(store)
        if not running:
            return failed
        print(flush=True)
        time.sleep(every)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        number = installed("raysys")
    except PackageNotFoundError:  # run from a checkout without installing
        number = "not installed"
    return f"raysys {number} (code {results.code_version()})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:  # every argument after `run` is the driver's (argparse would claim its options)
        from raysys.sweep.driver import main as run  # Ray and torch: only for this command

        return run(argv[1:], prog="raysys run")
    args = parse_args(argv)
    try:
        store = Store(args.storage)
        if not store.exists():
            raise FileNotFoundError(f"{store.shown}: no such storage")
        if args.command == "status":
            failed = print_status(store)[0] if args.watch is None else watch(store, args.watch)
            if failed:
                return 1  # a script (or CI) watching a sweep learns of failed cells from the exit status
        elif args.command == "results":
            print(results_command(store, args))
        elif args.command == "failures":
            rows = failures(store)
            print(failures_text(rows, None if args.full else 6))
            if rows:
                return 1
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
