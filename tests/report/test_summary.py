"""raysys/report/summary.py: what the console shows at the end of a sweep."""

import re

from raysys.report import summary, tables
from raysys.report.scope import StudyRows


def test_the_console_summary_gives_the_findings_and_only_the_titles_of_the_tables(micro_run):
    study, store, _ = micro_run
    scope = StudyRows(study, store)
    text = summary.summary(scope)
    assert "Findings: the paper's claims against this study's data" in text
    sections = tables.table_sections(scope)
    assert len(sections) > 5
    for section in sections:
        line = rf"^  {re.escape(section.title)} +{len(section.rows)} rows$"
        assert re.search(line, text, re.MULTILINE), section.title
        if section.rows:  # the table itself is the report's, not the console's
            assert section.text().splitlines()[1] not in text, section.title
