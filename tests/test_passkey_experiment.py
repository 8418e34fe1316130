"""The passkey experiment (benchmarks/experiments/passkey.py), run as its users run it, in a
subprocess: merging two result files (a run already in the first wins), the report's accuracy
table, plot and memory check, and a bad setting as a one-line error. Fast: no model is loaded."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def passkey(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.experiments.passkey", *argv],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def _run(setting, length, depth, peak, warm=2000.0, tokens=None):
    return {"setting": setting, "length": length, "depth": depth, "seed": 0, "tokens": tokens or length,
            "answer": "12345", "reply": "12345", "correct": depth < 1, "seconds": 1.0, "peak_rss_mb": peak,
            "rss_loaded_mb": 300.0, "rss_warm_mb": warm, "device": "cpu", "quantize": None, "threads": 1}


def test_passkey_merge_report_and_memory_check(tmp_path):
    a = tmp_path / "a"
    (tmp_path / "a.json").write_text(json.dumps({"model": "m", "max_new_tokens": 16, "runs": [
        _run("plain", 4096, 0.0, 2400.0), _run("plain", 4096, 1.0, 2500.0)]}))
    (tmp_path / "b.json").write_text(json.dumps({"model": "m", "max_new_tokens": 16, "runs": [
        _run("plain", 4096, 0.0, 9999.0), _run("plain", 8192, 0.0, 3000.0)]}))
    done = passkey("--out", str(a), "--merge", str(tmp_path / "b.json"))
    assert done.returncode == 0, done.stderr
    runs = json.loads((tmp_path / "a.json").read_text())["runs"]
    assert [(r["length"], r["depth"], r["peak_rss_mb"]) for r in runs] == [(4096, 0.0, 2400.0), (4096, 1.0, 2500.0),
                                                                          (8192, 0.0, 3000.0)]  # a's run kept
    md = (tmp_path / "a.md").read_text()
    assert "| 4096 | 1/1 | 0/1 | 1/2 |" in md and (tmp_path / "a.png").stat().st_size > 0
    # memory added per 1K tokens: (2500 - 2000) / 4 from the warm weights, then (3000 - 2500) / 4
    lines = md.splitlines()
    header = lines.index("| setting | tokens | peak RSS MB | weights in MB | added per 1K tokens MB |")
    assert lines[header + 2].endswith("| 125.0 |") and lines[header + 3].endswith("| 125.0 |")


def test_passkey_bad_setting_is_an_error():
    done = passkey("--settings", "plain,bogus")
    assert done.returncode == 1 and "unknown setting 'bogus'" in done.stderr
    assert done.stderr.count("\n") == 1
