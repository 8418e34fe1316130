"""Fill-in-the-middle (qwen2/fim.py): the prompt's ids are the layout Qwen2.5-Coder's tokenizer defines
(transformers' tokenizer on the same files is the reference), user text cannot inject a marker, and
generation returns the middle only, stopping at each FIM end token, through `Qwen2.infill`, the CLI and
the server's `suffix`. Tiny random models with the real vocabulary; one real-model infill."""
import copy
import json
import re

import httpx
import openai
import pytest
import torch
from safetensors.torch import save_file

from ggufs import random_model, small_tokenizer_metadata, tiny_config
from qwen2 import cli
from qwen2.api import Qwen2
from qwen2.errors import Qwen2Error
from qwen2.adapters.formats import ADAPTER_CONFIG, ADAPTER_FILE
from qwen2.fim import END_TOKENS, MIDDLE, PREFIX, SUFFIX, FimTokens
from qwen2.runtime.generate import SamplingParams, decode_steps
from qwen2.serve.app import create_app, serve_in_background
from qwen2.tokenizer import Tokenizer

CASES = [  # (prefix, suffix): code, edges of whitespace and of words, non-ASCII, empty sides
    ("def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"),
    ("class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):", "    def pop(self):"),
    ("x = 1", " + y  # trailing spaces   "),
    ("s = \"ünïcödé ✓ 中文 — \"\n", "\n\t\treturn s\r\n"),
    ("", "return 1\n"),
    ("import os\n", ""),
    ("", ""),
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    """transformers' tokenizer on the real model's tokenizer files."""
    import transformers

    from qwen2.checkpoint.registry import DEFAULT_MODEL, hf_dir
    return transformers.AutoTokenizer.from_pretrained(hf_dir(DEFAULT_MODEL, progress=False))


# ---- the prompt ---------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix, suffix", CASES)
def test_prompt_ids_are_the_tokenizers_encoding_of_the_fim_layout(real_tokenizer, hf_tokenizer, prefix, suffix):
    ids = FimTokens.of(real_tokenizer).prompt(real_tokenizer, prefix, suffix)
    expected = hf_tokenizer(f"{PREFIX}{prefix}{SUFFIX}{suffix}{MIDDLE}", add_special_tokens=False)["input_ids"]
    assert ids == expected


def test_the_markers_are_the_tokenizers_own_ids(real_tokenizer, hf_tokenizer):
    fim = FimTokens.of(real_tokenizer)
    assert [fim.prefix, fim.suffix, fim.middle] == hf_tokenizer.convert_tokens_to_ids([PREFIX, SUFFIX, MIDDLE])
    assert list(fim.ends) == hf_tokenizer.convert_tokens_to_ids(list(END_TOKENS))
    assert fim.stop_ids([151645, 151643]) == [151645, 151643, *fim.ends[1:]]  # each once, the model's first


def test_marker_strings_in_user_text_stay_text(real_tokenizer, hf_tokenizer):
    """A prefix or suffix that spells a marker (or any added token) cannot open or close a part of the
    prompt: it is encoded as text, as transformers does with split_special_tokens=True."""
    prefix = f"s = '{SUFFIX}'<|endoftext|>\n"
    suffix = f"{MIDDLE}x<|im_end|>{PREFIX}"
    fim = FimTokens.of(real_tokenizer)
    ids = fim.prompt(real_tokenizer, prefix, suffix)
    specials = [i for i in ids if i >= 151643]
    assert specials == [fim.prefix, fim.suffix, fim.middle] and ids[0] == fim.prefix and ids[-1] == fim.middle
    assert real_tokenizer.decode(ids) == f"{PREFIX}{prefix}{SUFFIX}{suffix}{MIDDLE}"
    for text in (prefix, suffix):
        assert real_tokenizer.encode_plain(text) == \
            hf_tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    # a user-defined added token too (transformers would still match this one): text is text
    assert 151657 in real_tokenizer.encode("<tool_call>") and 151657 not in real_tokenizer.encode_plain("<tool_call>")


def test_a_tokenizer_without_fim_tokens_is_refused_by_name():
    tokenizer = Tokenizer.from_gguf_metadata(small_tokenizer_metadata())
    with pytest.raises(Qwen2Error, match=r"^this model's tokenizer has no fill-in-the-middle tokens \(<\|fim_prefix\|>, "
                                         r"<\|fim_suffix\|>, <\|fim_middle\|> missing\); infilling needs a model "
                                         r"trained for it, such as Qwen2.5-Coder$"):
        FimTokens.of(tokenizer)


# ---- generation: the middle only, up to a FIM end token ----------------------------------------

PREFIX_TEXT, SUFFIX_TEXT = CASES[0]


@pytest.fixture(scope="module")
def base_model():
    return random_model(tiny_config(vocab_size=151936, max_position_embeddings=128), seed=3)


def greedy(model, tokenizer, n: int) -> list[int]:
    prompt = FimTokens.of(tokenizer).prompt(tokenizer, PREFIX_TEXT, SUFFIX_TEXT)
    return [int(t) for t in decode_steps(model, [prompt], SamplingParams(max_new_tokens=n))]


def ending_with(base_model, tokenizer, end: str, at: int = 5) -> tuple[Qwen2, list[int]]:
    """A copy of the tiny model whose greedy middle reaches `end` by step `at` (its head row for `end` is
    1.5 times the row of the token it picks there, which then loses to it), and that decode's tokens."""
    model = copy.deepcopy(base_model)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.token_to_id(end)] = 1.5 * model.lm_head.weight[greedy(base_model, tokenizer, 8)[at]]
    return Qwen2(model, tokenizer, source="tiny"), greedy(model, tokenizer, 12)


@pytest.mark.parametrize("end", [*END_TOKENS, "<|im_end|>"])
def test_infill_returns_the_middle_up_to_an_end_token(base_model, real_tokenizer, end):
    qwen, tokens = ending_with(base_model, real_tokenizer, end)
    end_id = real_tokenizer.token_to_id(end)
    assert end_id in tokens[:6]  # the greedy decode does reach it, and would go on past it
    middle = real_tokenizer.decode(tokens[:tokens.index(end_id)])
    assert qwen.infill(PREFIX_TEXT, SUFFIX_TEXT, max_new_tokens=12) == middle
    assert "".join(qwen.infill(PREFIX_TEXT, SUFFIX_TEXT, stream=True, max_new_tokens=12)) == middle
    if end in ("<|fim_pad|>", "<|file_sep|>", "<|repo_name|>"):  # FIM's own ends: plain generation runs on
        assert real_tokenizer.token_to_id(end) not in qwen.eos_ids


def test_infill_without_an_end_token_runs_to_max_new_tokens(base_model, real_tokenizer):
    qwen = Qwen2(base_model, real_tokenizer, source="tiny")
    tokens = greedy(base_model, real_tokenizer, 10)
    assert not set(tokens) & set(FimTokens.of(real_tokenizer).stop_ids(qwen.eos_ids))
    assert qwen.infill(PREFIX_TEXT, SUFFIX_TEXT, max_new_tokens=10) == real_tokenizer.decode(tokens)


def test_a_batch_of_infills_equals_each_alone(base_model, real_tokenizer):
    qwen = Qwen2(base_model, real_tokenizer, source="tiny")
    prefixes, suffixes = [c[0] for c in CASES[:3]], [c[1] for c in CASES[:3]]
    alone = [qwen.infill(p, s, max_new_tokens=8) for p, s in zip(prefixes, suffixes)]
    assert qwen.infill(prefixes, suffixes, max_new_tokens=8) == alone
    assert qwen.infill(PREFIX_TEXT, SUFFIX_TEXT, max_new_tokens=8, speculative="prompt-lookup") == \
        qwen.infill(PREFIX_TEXT, SUFFIX_TEXT, max_new_tokens=8)


def test_a_constrained_middle_matches_its_regex_and_ends_at_a_fim_end(base_model, real_tokenizer, monkeypatch,
                                                                       capsys):
    """infill takes generate's structured output: the middle matches the regex as a whole, and once
    the pattern is complete the row ends (at one of the FIM ends); the CLI's --suffix with --regex too."""
    qwen = Qwen2(base_model, real_tokenizer, source="tiny")
    free = qwen.infill(PREFIX_TEXT, SUFFIX_TEXT, max_new_tokens=12)
    middle = qwen.infill(PREFIX_TEXT, SUFFIX_TEXT, regex="return [a-z]{1,3}", max_new_tokens=12)
    assert re.fullmatch("return [a-z]{1,3}", middle) and not re.fullmatch("return [a-z]{1,3}", free)
    monkeypatch.setattr(cli.model_args, "load_model", lambda args: qwen)
    assert cli.main(["generate", PREFIX_TEXT, "--suffix", SUFFIX_TEXT, "--regex", "return [a-z]{1,3}",
                     "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == middle + "\n"


def test_an_infill_on_a_lora_adapter_equals_the_merged_models(base_model, real_tokenizer, tmp_path):
    """infill(adapter=) decodes on that adapter, as generate does: the middle equals the merged model's."""
    gen = torch.Generator().manual_seed(5)
    tensors, deltas = {}, {}
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        linear = base_model.get_submodule(module)
        A, B = torch.randn(4, linear.in_features, generator=gen), torch.randn(linear.out_features, 4, generator=gen)
        tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"], deltas[module] = A, B, 2.0 * B @ A
    save_file(tensors, str(tmp_path / ADAPTER_FILE))
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"r": 4, "alpha": 8.0, "dropout": 0.0, "modules": list(deltas)}))
    served = Qwen2(copy.deepcopy(base_model), real_tokenizer, source="tiny")
    served.add_adapter("x", tmp_path)
    merged = copy.deepcopy(base_model)
    with torch.no_grad():
        for module, delta in deltas.items():
            merged.get_submodule(module).weight += delta
    alone = Qwen2(merged, real_tokenizer, source="merged").infill(PREFIX_TEXT, SUFFIX_TEXT, max_new_tokens=8)
    assert served.infill(PREFIX_TEXT, SUFFIX_TEXT, max_new_tokens=8, adapter="x") == alone
    assert alone != served.infill(PREFIX_TEXT, SUFFIX_TEXT, max_new_tokens=8)  # the adapter does change it
    with pytest.raises(Qwen2Error, match="no adapter named 'y'"):
        served.infill(PREFIX_TEXT, SUFFIX_TEXT, adapter="y")


@pytest.mark.parametrize("args, kwargs, message", [
    ((5, "x"), {}, "^the prefix to infill between must be a string, not int$"),
    (("x", None), {}, "^the suffix to infill between must be a string, not NoneType$"),
    ((["a", "b"], ["c"]), {}, "^prefix and suffix must be two strings, or two non-empty lists of strings of one length$"),
    ((["a"], "c"), {}, "^prefix and suffix must be two strings, or two non-empty lists"),
    (([], []), {}, "^prefix and suffix must be two strings, or two non-empty lists"),
    ((["a"], ["c"]), {"stream": True}, r"^stream=True takes one prefix and suffix, not lists$"),
    (("a", "\ud800"), {}, r"^the text is not valid Unicode: character 0 is a lone surrogate \(U\+D800\)"),
    (("a", "b"), {"temperature": -1}, "^invalid sampling parameter: temperature"),
])
def test_bad_input_is_a_one_line_error(base_model, real_tokenizer, args, kwargs, message):
    qwen = Qwen2(base_model, real_tokenizer, source="tiny")
    with pytest.raises(Qwen2Error, match=message):
        qwen.infill(*args, **kwargs)


def test_a_model_without_fim_tokens_says_so():
    tokenizer = Tokenizer.from_gguf_metadata(small_tokenizer_metadata())
    qwen = Qwen2(random_model(tiny_config(vocab_size=len(tokenizer))), tokenizer, source="no-fim")
    with pytest.raises(Qwen2Error, match=r"no fill-in-the-middle tokens \(<\|fim_prefix\|>, <\|fim_suffix\|>, "
                                         r"<\|fim_middle\|> missing\)"):
        qwen.infill("def f():", "\n")


# ---- the command line and the server -----------------------------------------------------------

def test_cli_generate_with_suffix_prints_the_middle(base_model, real_tokenizer, monkeypatch, capsys):
    qwen, _ = ending_with(base_model, real_tokenizer, "<|file_sep|>")
    monkeypatch.setattr(cli.model_args, "load_model", lambda args: qwen)
    assert cli.main(["generate", PREFIX_TEXT, "--suffix", SUFFIX_TEXT, "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out == qwen.infill(PREFIX_TEXT, SUFFIX_TEXT, max_new_tokens=16) + "\n"


@pytest.fixture(scope="module")
def served(base_model, real_tokenizer):
    qwen, _ = ending_with(base_model, real_tokenizer, "<|fim_pad|>")
    with serve_in_background(create_app(qwen, max_batch=4, max_model_len=128)) as url:
        yield qwen, url, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_server_suffix_round_trip(served):
    qwen, url, client = served
    expected = qwen.infill(PREFIX_TEXT, SUFFIX_TEXT, max_new_tokens=16)
    r = client.completions.create(model="tiny", prompt=PREFIX_TEXT, suffix=SUFFIX_TEXT, max_tokens=16, temperature=0)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"  # stopped at <|fim_pad|>
    prompt = FimTokens.of(qwen.tokenizer).prompt(qwen.tokenizer, PREFIX_TEXT, SUFFIX_TEXT)
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens < 16
    chunks = list(client.completions.create(model="tiny", prompt=PREFIX_TEXT, suffix=SUFFIX_TEXT, max_tokens=16,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected and chunks[-1].choices[0].finish_reason == "stop"
    prefixes = [c[0] for c in CASES[:3]]
    r = client.completions.create(model="tiny", prompt=prefixes, suffix="\n", max_tokens=8, temperature=0)
    assert [c.text for c in r.choices] == [qwen.infill(p, "\n", max_new_tokens=8) for p in prefixes]
    plain = client.completions.create(model="tiny", prompt=PREFIX_TEXT, max_tokens=8, temperature=0)
    assert plain.choices[0].text == qwen.generate(PREFIX_TEXT, max_new_tokens=8)  # no suffix: a continuation


def test_server_suffix_errors(served, real_tokenizer):
    qwen, url, client = served
    with pytest.raises(openai.BadRequestError, match="suffix needs the prompt as text") as info:
        client.completions.create(model="tiny", prompt=[1, 2, 3], suffix="x", max_tokens=2)
    assert info.value.body["param"] == "prompt"
    schema = httpx.get(url + "/openapi.json").json()["components"]["schemas"]["CompletionRequest"]
    assert "fill in the middle" in schema["properties"]["suffix"]["description"]

    tokenizer = Tokenizer.from_gguf_metadata(small_tokenizer_metadata())
    no_fim = Qwen2(random_model(tiny_config(vocab_size=len(tokenizer))), tokenizer, source="no-fim")
    with serve_in_background(create_app(no_fim, max_batch=1, max_model_len=64)) as other:
        response = httpx.post(other + "/v1/completions", json={"prompt": "def f():", "suffix": "\n", "max_tokens": 2})
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == "suffix" and "\n" not in error["message"]
        assert error["message"].startswith("suffix: this model's tokenizer has no fill-in-the-middle tokens "
                                           "(<|fim_prefix|>, <|fim_suffix|>, <|fim_middle|> missing)")
        after = httpx.post(other + "/v1/completions", json={"prompt": "the", "max_tokens": 2, "temperature": 0})
        assert after.status_code == 200 and json.loads(after.text)["choices"][0]["text"] == \
            no_fim.generate("the", max_new_tokens=2)  # it goes on serving


# ---- the benchmark's cases ---------------------------------------------------------------------

def test_the_benchmarks_cases_put_back_are_the_canonical_solutions():
    """benchmarks/experiments/fim_humaneval.py: for all 164 problems the removed line is the middle
    non-blank one, and the prefix and suffix around it give back the canonical solution exactly."""
    from benchmarks.experiments.fim_humaneval import fim_case, fim_texts
    from qwen2.eval.humaneval import load_problems

    problems = load_problems()
    assert len(problems) == 164
    for problem in problems:
        case = fim_case(problem)
        lines = problem["canonical_solution"].splitlines()
        nonblank = [i for i, line in enumerate(lines) if line.strip()]
        assert case.line == nonblank[len(nonblank) // 2] and case.removed == lines[case.line]
        prefix, suffix = fim_texts(problem, case)
        assert prefix + case.removed + "\n" + suffix == problem["prompt"] + problem["canonical_solution"]
        assert case.completion(case.removed) == problem["canonical_solution"]


# ---- the real model ------------------------------------------------------------------------------

@pytest.mark.real_model
def test_real_model_infills_the_missing_line(real_int4):
    """Qwen2.5-Coder-0.5B (int4) fills the body of a function from its name and a call below it (the
    instruct model writes on past the line rather than end the middle: one line is asked for)."""
    prefix = "def add(a, b):\n    "
    suffix = "\n\n\nprint(add(2, 3))\n"
    assert real_int4.infill(prefix, suffix, max_new_tokens=8, stop=["\n"]) == "return a + b"

