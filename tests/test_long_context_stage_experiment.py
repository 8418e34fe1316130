"""benchmarks/experiments/long_context_stage_experiment.py, run as a command at smoke size: two staged
pre-training runs that share their first stage exactly and differ in the second only by the RoPE
base, which their saved models keep; held-out scores at the end of stage 1 and at each checkpoint."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_staged_runs_share_stage_one_and_keep_their_bases(tmp_path):
    run = subprocess.run([sys.executable, "-m", "benchmarks.experiments.long_context_stage_experiment", "--smoke",
                          "--out", str(tmp_path / "run"), "--results", str(tmp_path / "report")],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    s = json.loads((tmp_path / "report.json").read_text())
    a = s["args"]
    assert s["stage1_equal"] is True
    for name, theta in (("base 1e6", 1e6), ("base 1e4 (unchanged)", 1e4)):
        r = s["runs"][name]
        assert [x["stage"] for x in r["log"]] == [1] * a["short_steps"] + [2] * a["long_steps"]
        assert {x["rope_theta"] for x in r["log"][a["short_steps"]:]} == {theta}
        assert [x["step"] for x in r["scores"]] == list(range(a["short_steps"], a["short_steps"] + a["long_steps"] + 1,
                                                              a["eval_every"]))
        assert all(math.isfinite(x[f"ppl_{a['long']}"]) for x in r["scores"])
    for folder, theta in (("base-1e6", 1e6), ("base-1e4", 1e4)):
        config = json.loads((tmp_path / "run" / "runs" / folder / "model" / "config.json").read_text())
        assert (config["rope_theta"], config["max_position_embeddings"]) == (theta, a["long"])
    # the end of stage 1 is the same model in both runs: the same score
    firsts = [s["runs"][n]["scores"][0] for n in s["runs"]]
    assert firsts[0] == firsts[1]
