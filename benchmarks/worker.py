"""The worker side of a benchmark's fresh processes (`benchmarks.common.spawn` starts them): run the
named worker on its job file and write its result, or why there is none, to the result file.
Standard library only: a worker that measures a reference (llama.cpp) must not load torch with it."""
from __future__ import annotations

import json
import os
import traceback


def run_worker(workers: dict, name: str, job_file: str, result_file: str, refusals: dict | None = None) -> None:
    """`workers[name](job)` -> {"status": "ok", ...its result}. `refusals`: exception class -> the status
    a worker that raises it is reported with (e.g. "not available"), with the exception's text; an
    ImportError is "not installed" for llama.cpp; any other error is "error" (its traceback on stderr).
    The result file is written whole or not at all."""
    refusals = refusals or {}
    with open(job_file) as f:
        job = json.load(f)
    try:
        result = {"status": "ok", **workers[name](job)}
    except tuple(refusals) as why:
        result = {"status": refusals[type(why)], "error": str(why)}
    except ImportError as error:
        result = {"status": "not installed" if name == "llama.cpp" else "error", "error": repr(error)}
    except Exception as error:  # reported in the table; the other engines still run
        traceback.print_exc()
        result = {"status": "error", "error": repr(error)}
    partial = result_file + ".partial"
    with open(partial, "w") as f:
        json.dump(result, f)
    os.replace(partial, result_file)
