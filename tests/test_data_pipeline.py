"""`qwen2 data pipeline CONFIG.yaml` (qwen2/data/pipeline.py): the verbs as one run from a config. Its
output is the verbs' run one after another by hand, record for record; the same config gives the same
records on local processes and on a Ray cluster; a killed run resumes without redoing finished steps
or shards; every config mistake, and a Ray address nobody answers at, is one line before any output."""
import glob
import json
import os
import shutil
import tempfile
import time

import pytest

pytest.importorskip("datatrove")
import yaml  # noqa: E402

from qwen2.cli import main  # noqa: E402
from qwen2.data import planted  # noqa: E402

LANGS = "en,de,fr,es,zh"  # a small detection set: lingua loads fewer models
FULL_STEPS = [{"dedup": {"near": 0.8}}, {"filter": {"heuristics": "default"}},
              {"langid": {"languages": LANGS.split(","), "keep": ["en", "de"]}},
              {"decontaminate": {"against": ["humaneval"]}}]
QUICK_STEPS = [{"dedup": {"near": 0}}, "decontaminate"]  # few datatrove stages: Ray starts an actor per task


def records(folder) -> list[dict]:
    return [json.loads(line) for path in sorted(glob.glob(os.path.join(folder, "*.jsonl")))
            for line in open(path, encoding="utf-8")]


def write_config(path, inputs, output, steps) -> str:
    path.write_text(yaml.safe_dump({"input": inputs, "output": str(output), "steps": steps}))
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """Three shards with every kind of planted problem: copies, near copies, junk, HumanEval prompts."""
    root = tmp_path_factory.mktemp("planted") / "corpus"
    planted.build(str(root), 0.5, seed=5, shards=3, shares={"exact_duplicate": 0.08, "near_duplicate": 0.12,
                                                              "junk": 0.06, "humaneval": 0.05})
    return str(root)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> str:
    """Two small shards with copies, junk and HumanEval prompts: for the runs that start many executors."""
    root = tmp_path_factory.mktemp("small") / "corpus"
    planted.build(str(root), 0.2, seed=6, shards=2, shares={"exact_duplicate": 0.1, "junk": 0.1, "humaneval": 0.08})
    return str(root)


@pytest.fixture(scope="module")
def full_run(corpus, tmp_path_factory):
    """The four steps through `qwen2 data pipeline`: (output dir, stats, removed records). One worker: the
    tasks run in this process, without a worker process's start (Ray and two workers are tested below)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    config = write_config(tmp / "clean.yaml", corpus, tmp / "out", FULL_STEPS)
    assert main(["data", "pipeline", config, "--removed", str(tmp / "removed.jsonl"), "--no-progress"]) == 0
    stats = json.loads((tmp / "out" / "stats.json").read_text())
    return tmp / "out", stats, records_of(tmp / "removed.jsonl")


def records_of(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_the_pipeline_is_the_verbs_run_one_after_another(corpus, full_run, tmp_path):
    out, stats, removed = full_run
    hand = [["dedup", "--near", "0.8"], ["filter", "--heuristics", "default"],
            ["langid", "--languages", LANGS, "--keep", "en,de"], ["decontaminate", "--against", "humaneval"]]
    previous = corpus
    for number, (verb, *flags) in enumerate(hand, 1):
        step_out = str(tmp_path / f"{number}-{verb}")
        assert main(["data", verb, previous, step_out, *flags, "--no-progress"]) == 0
        by_pipeline = out / f"{number:02d}-{verb}"
        assert records(by_pipeline) == records(step_out), verb
        hand_stats = json.loads(open(os.path.join(step_out, "stats.json")).read())
        assert (stats["steps"][number - 1]["documents_out"], stats["steps"][number - 1]["removed"]) == \
            (hand_stats["documents_out"], hand_stats["removed"]), verb
        previous = step_out
    # every step removed something, and stats.json sums them up
    assert all(step["removed"] for step in stats["steps"])
    assert stats["output"] == str(out / "04-decontaminate")
    assert stats["documents_in"] == stats["steps"][0]["documents_in"] == len(records(corpus))
    assert stats["documents_out"] == len(records(out / "04-decontaminate"))
    assert sum(stats["removed"].values()) == stats["documents_in"] - stats["documents_out"] == len(removed)
    assert {"exact_duplicate", "near_duplicate", "language", "contamination"} <= set(stats["removed"])
    assert {r["filter_reason"] for r in removed} >= {"exact_duplicate", "near_duplicate", "contamination"}


def test_a_finished_run_run_again_redoes_nothing(corpus, full_run, tmp_path):
    out, stats, _ = full_run
    config = write_config(tmp_path / "again.yaml", corpus, out, FULL_STEPS)
    before = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(out / "*" / "*.jsonl"))}
    start = time.perf_counter()
    assert main(["data", "pipeline", config, "--no-progress"]) == 0
    assert time.perf_counter() - start < 10
    assert before == {p: os.stat(p).st_mtime_ns for p in glob.glob(str(out / "*" / "*.jsonl"))}
    assert json.loads((out / "stats.json").read_text())["steps"] == stats["steps"]


@pytest.fixture
def ray_cluster():
    """A local Ray instance for this test alone (2 CPUs, no dashboard), shut down even when the test fails."""
    import ray  # the test extra installs datatrove[ray]: a missing Ray fails here, it is not skipped

    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def test_the_same_config_gives_the_same_records_locally_and_on_ray(small_corpus, tmp_path, ray_cluster):
    outputs = {}
    for executor in ("local", "ray"):
        config = write_config(tmp_path / f"{executor}.yaml", [small_corpus], tmp_path / executor, QUICK_STEPS)
        assert main(["data", "pipeline", config, "--executor", executor, "--workers", "2", "--no-progress"]) == 0
        stats = json.loads((tmp_path / executor / "stats.json").read_text())
        outputs[executor] = sorted(records(stats["output"]), key=lambda r: r["id"])
    assert outputs["local"] == outputs["ray"]
    assert 0 < len(outputs["ray"]) < len(records(small_corpus))


def test_a_killed_run_resumes_at_the_step_and_shard_it_stopped(small_corpus, tmp_path, capsys):
    steps = [{"dedup": {"near": 0}}, "filter", "decontaminate"]
    config = write_config(tmp_path / "p.yaml", small_corpus, tmp_path / "out", steps)
    assert main(["data", "pipeline", config, "--no-progress"]) == 0
    out = tmp_path / "out"
    finished = records(out / "03-decontaminate")
    # What a kill during step 2 leaves: its other shard done and marked, no stats.json, no step 3
    (out / "stats.json").unlink()
    (out / "02-filter" / "stats.json").unlink()
    (out / "02-filter" / "00001.jsonl").unlink()
    (out / "02-filter" / ".datatrove" / "completions" / "00001").unlink()
    shutil.rmtree(out / "03-decontaminate")
    kept = {p: os.stat(p).st_mtime_ns for p in [*glob.glob(str(out / "01-dedup" / "*.jsonl")),
                                                 str(out / "02-filter" / "00000.jsonl")]}
    assert main(["data", "pipeline", config, "--no-progress"]) == 0
    assert kept == {p: os.stat(p).st_mtime_ns for p in kept}  # step 1 and step 2's finished shard skipped
    assert (out / "02-filter" / "00001.jsonl").exists() and records(out / "03-decontaminate") == finished
    assert json.loads((out / "stats.json").read_text())["documents_out"] == len(finished)

    # a step's settings changed since: its directory is named, to delete
    write_config(tmp_path / "p.yaml", small_corpus, out, [{"dedup": {"near": 0}}, {"filter": {"heuristics": "web"}},
                                                          "decontaminate"])
    capsys.readouterr()
    assert main(["data", "pipeline", config, "--no-progress"]) == 1
    assert capsys.readouterr().err.startswith(f"error: {out / '02-filter'} was made with other settings")


@pytest.mark.parametrize("text, message", [
    (None, "cannot read the pipeline config {config}: No such file or directory"),
    ("input: [a\nsteps: -", "{config} is not valid YAML"),
    ("- dedup", "{config}: the config must be a mapping with input, output and steps"),
    ("input: {corpus}\nsteps: [dedup]", "{config}: no 'output'"),
    ("input: {corpus}\noutput: {out}\nsteps: [dedup]\nworkers: 4", "{config}: unknown key(s) 'workers'"),
    ("input: {corpus}\noutput: {out}\nsteps: [dedupe]",
     "{config}: step 1: unknown step 'dedupe'; the steps are dedup, filter, langid, decontaminate"),
    ("input: {corpus}\noutput: {out}\nsteps: [dedup, {{filter: {{max-perplexty: 9}}}}]",
     "{config}: step 2 (filter): unknown option 'max-perplexty'; filter takes heuristics, model"),
    ("input: {corpus}\noutput: {out}\nsteps: [{{dedup: {{near: 2}}}}]",
     "{config}: step 1 (dedup): near must be a number from 0 to 1, got 2"),
    ("input: {corpus}\noutput: {out}\nsteps: [{{dedup: {{near: high}}}}]",
     "{config}: step 1 (dedup): near must be a number from 0 to 1, got 'high'"),
    ("input: {corpus}\noutput: {out}\nsteps: [dedup, {{langid: {{keep: [en, xx]}}}}]",
     "{config}: step 2 (langid): unknown language code(s) xx"),
    ("input: {corpus}\noutput: {out}\nsteps: [{{decontaminate: {{against: [mmlu]}}}}]",
     "{config}: step 1 (decontaminate): mmlu: neither an evaluation set this project runs"),
    ("input: {corpus}\noutput: {out}\nsteps: [{{filter: {{heuristics: strict}}}}]",
     "{config}: step 1 (filter): unknown heuristic 'strict'"),
    ("input: {corpus}\noutput: {out}\nsteps: [{{decontaminate: {{mark_only: yes please}}}}]",
     "{config}: step 1 (decontaminate): mark-only must be true or false"),
    ("input: {corpus}/missing\noutput: {out}\nsteps: [dedup]", "{corpus}/missing: no such file or directory"),
])
def test_config_mistakes_are_one_line_errors_before_any_output(text, message, small_corpus, tmp_path, capsys):
    corpus = small_corpus
    config, out = tmp_path / "p.yaml", tmp_path / "out"
    if text is not None:
        config.write_text(text.format(corpus=corpus, out=out))
    assert main(["data", "pipeline", str(config), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: " + message.format(config=config, corpus=corpus)), err
    assert err.count("\n") == 1 and not out.exists()


def test_a_ray_address_nobody_answers_at_is_one_line_in_seconds(small_corpus, tmp_path, capsys):
    config = write_config(tmp_path / "p.yaml", small_corpus, tmp_path / "out", QUICK_STEPS)
    start = time.perf_counter()
    assert main(["data", "pipeline", config, "--executor", "ray", "--address", "127.0.0.1:1", "--no-progress"]) == 1
    assert time.perf_counter() - start < 15
    err = capsys.readouterr().err
    assert err.startswith("error: no Ray cluster answers at 127.0.0.1:1") and "--address" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()
    # a single verb fails the same way, before writing anything
    assert main(["data", "dedup", small_corpus, str(tmp_path / "deduped"), "--executor", "ray", "--address",
                 "127.0.0.1:1"]) == 1
    assert "no Ray cluster answers at 127.0.0.1:1" in capsys.readouterr().err and not (tmp_path / "deduped").exists()
