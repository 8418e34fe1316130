"""The evaluation-table driver (benchmarks/experiments/eval_report_table.py): runs, resumes, restores
from git's compressed copies, reports with the gaps section; and llama.cpp's replies come from the one
continuous-batching loop eval_humaneval uses too."""
import json

import pytest

from benchmarks.common import llama_cpp_installed
from benchmarks.experiments import eval_humaneval
from benchmarks.experiments import eval_report_table as table

MODELS = "qwen2.5-coder-0.5b-instruct,qwen2.5-coder-1.5b-instruct"


@pytest.fixture
def counted(monkeypatch):
    """The prompts our engine is asked to answer, counted across runs."""
    asked = []
    replier = table.qwen2_replier

    def counting(m, batch):
        inner = replier(m, batch)

        def reply(prompts, max_new_tokens, stop):
            asked.extend(prompts)
            yield from inner(prompts, max_new_tokens, stop)

        return reply

    monkeypatch.setattr(table, "qwen2_replier", counting)
    return asked


def test_tiny_run_reports_resumes_and_restores(tmp_path, tiny_chat_model, counted, monkeypatch, offline):
    # both registry names stand for the tiny random model: the driver's logic, not the weights
    monkeypatch.setattr(table, "load_model", lambda name, quantize: tiny_chat_model)
    run_dir, out = tmp_path / "run", tmp_path / "report.md"
    argv = ["--models", MODELS, "--benchmarks", "bbh,mc-mmlu", "--engines", "qwen2", "--limit", "1",
            "--max-new-tokens", "4", "--batch", "2", "--run-dir", str(run_dir), "--out", str(out)]
    assert table.main(argv) == 0
    assert len(counted) == 2  # one bbh item per model; mc-mmlu scores choices, no replies
    summaries = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*.summary.json"))
    assert summaries == [f"{m}/qwen2-int4/{pack}.summary.json" for m in MODELS.split(",")
                         for pack in ("bbh", "mc-mmlu")]
    text = out.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| benchmark | metric"))
    assert "qwen2.5-coder-0.5b-instruct-int4" in header and "qwen2.5-coder-1.5b-instruct-int4" in header
    gaps = text.split("## Gaps to the published figures")[1]
    assert "subset: 1 items of the offline pack's 81 (--limit), not the published set's 6,511" in gaps
    assert "quantisation:" in gaps and "loaded with quantize=int4" in gaps
    # no figure for the coder instruct models: their size's are shown, and why they differ
    assert "model: the figure is Qwen2-0.5B-Instruct's: another family (qwen2, not qwen2.5-coder)" in gaps
    assert "ours 2-shot (the task's default is 3;" in gaps and "ours 5-shot asked, 4 given" in gaps
    assert "math-mgsm" not in text  # not asked for, so not listed as left out
    assert (tmp_path / "report.png").exists() and json.loads((tmp_path / "report.json").read_text())["runs"]

    # a rerun resumes: nothing is generated again
    assert table.main(argv) == 0
    assert len(counted) == 2
    # a fresh checkout holds only the compressed copies: the .jsonl comes back from its .jsonl.gz
    results = run_dir / "qwen2.5-coder-0.5b-instruct" / "qwen2-int4" / "bbh.jsonl"
    kept = results.read_bytes()
    results.unlink()
    assert table.main(argv) == 0
    assert len(counted) == 2 and results.read_bytes() == kept


def test_bad_input_is_one_line(capsys, no_loading):
    for argv, message in ((["--benchmarks", "nope"], "unknown benchmark 'nope'"),
                          (["--models", "qwen9-7b"], "unknown model 'qwen9-7b'"),
                          (["--benchmarks", "math-mgsm-de"], "give --mgsm-data"),
                          (["--engines", "vllm"], "unknown engine vllm")):
        assert table.main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err


needs_llama_cpp = pytest.mark.skipif(not llama_cpp_installed(), reason="llama_cpp is not importable")


@needs_llama_cpp
def test_llama_cpp_column_on_the_same_prompts(tmp_path, real_int4, counted, monkeypatch, offline):
    monkeypatch.setattr(table, "load_model", lambda name, quantize: real_int4)
    run_dir, out = tmp_path / "run", tmp_path / "report.md"
    assert table.main(["--models", "qwen2.5-coder-0.5b-instruct", "--benchmarks", "math-gsm8k", "--limit", "1",
                       "--max-new-tokens", "8", "--run-dir", str(run_dir), "--out", str(out)]) == 0
    folder = run_dir / "qwen2.5-coder-0.5b-instruct"
    ours, theirs = ([json.loads(line) for line in (folder / engine / "math-gsm8k.jsonl").open()]
                    for engine in ("qwen2-int4", "llama.cpp"))
    assert ours[0]["prompt"] == theirs[0]["prompt"] == counted[0]
    assert theirs[0]["settings"]["model"] == "llama.cpp:qwen2.5-coder-0.5b-instruct" and theirs[0]["reply"]
    assert (folder / "llama.cpp" / "math-gsm8k.jsonl.gz").exists()
    header = next(line for line in out.read_text().splitlines() if line.startswith("| benchmark | metric"))
    assert "| qwen2.5-coder-0.5b-instruct-int4 | llama.cpp:qwen2.5-coder-0.5b-instruct |" in header


@needs_llama_cpp
def test_eval_humaneval_replies_through_the_shared_loop(real_int4, real_gguf, monkeypatch):
    """eval_humaneval's llama.cpp generator is the shared loop's replies, one sample each, with its stop."""
    from qwen2.eval import humaneval

    calls = []
    shared = eval_humaneval.llama_cpp_replies

    def spy(engine, tokenizer, end_ids, prompt_ids, max_new_tokens, stops, batch):
        calls.append((list(prompt_ids), max_new_tokens, list(stops), batch))
        yield from shared(engine, tokenizer, end_ids, prompt_ids, max_new_tokens, stops, batch)

    monkeypatch.setattr(eval_humaneval, "llama_cpp_replies", spy)
    settings = humaneval.Settings(model="m", max_new_tokens=8)
    prompt = humaneval.build_prompt(real_int4.tokenizer, humaneval.load_problems(limit=1)[0])
    tok = real_int4.tokenizer
    generate = eval_humaneval.llama_cpp_generator(real_gguf, tok, real_int4.eos_ids, threads=2, batch=2)
    replies = list(generate([(0, prompt)], settings))
    assert calls == [([0], 8, [settings.stop], 2)]
    # the driver's replier, on the same text, gives the same reply: one loop behind both
    driver = table.llama_cpp_replier(real_gguf, tok, real_int4.eos_ids, threads=2, batch=2)
    assert replies == [(0, [text]) for _, text in driver([prompt], 8, [settings.stop])]
