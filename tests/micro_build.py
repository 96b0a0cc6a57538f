"""Runs the micro study of tests/conftest.py into `<folder>/micro`, on a Ray of its own, and writes what run_study
reported to `<folder>/micro-ran.json` (last, by a rename: its presence says the store is complete), or the error
to `<folder>/micro-failed.txt`. The test session starts it in the background (conftest.pytest_collection_finish).

    python -m tests.micro_build FOLDER
"""

import json
import sys
import traceback
from pathlib import Path


def main(folder: Path) -> int:
    # first: importing it sets the tests' environment (offline hubs, no token auth) before raysys imports anything
    from tests.conftest import MICRO_OVERRIDES, start_test_ray  # noqa: I001

    from raysys.config import load_study
    from raysys.storage.store import Store
    from raysys.sweep.driver import run_study

    ray = start_test_ray()
    try:
        ran = run_study(load_study("tiny", MICRO_OVERRIDES), Store(folder / "micro"), log=lambda *_: None)
        staged = folder / "micro-ran.json.tmp"
        staged.write_text(json.dumps(ran))
        staged.rename(folder / "micro-ran.json")
        return 0
    except BaseException:
        (folder / "micro-failed.txt").write_text(traceback.format_exc())
        raise
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
