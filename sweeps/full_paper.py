"""Run the whole recyclable-tuning study: `python sweeps/full_paper.py [--preset tiny|paper] [--set k=v] [--storage DIR]`.

Rerunning the same command skips every finished cell (results and artifacts are keyed by config hash)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from raysys.sweep.driver import main

if __name__ == "__main__":
    sys.exit(main())
