"""LoRA adapters served per request (qwen2.adapters): a batch's rows on different adapters, or none,
each equal to its own merged model alone; the generation loop, the engine and the server choosing
them by name; bad adapters refused at load time in one line.

The adapters: two trained by `qwen2.train.sft` (lora=true) on different tiny tasks, and one in HF
PEFT's layout written by peft itself (by hand, after PEFT's documented key names, where peft is not
installed). Each test's reference is the merged model W + scale * B @ A, the update computed here
from the adapter's files (ours) or by peft (`get_delta_weight`), not by qwen2.adapters."""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen2
import qwen2.train
from ggufs import save_random_model_dir, small_tokenizer_metadata, tiny_config
from qwen2 import cli
from qwen2.api import Qwen2
from qwen2.errors import Qwen2Error
from qwen2.runtime.generate import SamplingParams
from qwen2.serve.app import create_app, serve_in_background
from qwen2.serve.engine import Delta, Engine, Request
from qwen2.tokenizer import Tokenizer

PROMPTS = ["the cat", "in a tin of", "a thin hat", "then the end"]
CHAT = [{"role": "user", "content": "the cat in the hat"}]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("QWEN2_PROGRESS", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # peft must never look anything up


@dataclass
class Adapter:
    """An adapter directory and the update of each linear it adapts, (out, in), as the test knows it."""
    path: str
    deltas: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    """A tiny random model (head_dim 16, so the native decode executor runs it; untied, so lm_head may
    be adapted) with a 264-token byte-level tokenizer and ChatML template."""
    tokenizer = Tokenizer.from_gguf_metadata(small_tokenizer_metadata())
    config = tiny_config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, tie_word_embeddings=False)
    return save_random_model_dir(tmp_path_factory.mktemp("base") / "model", tokenizer, config)


def trained(base_dir: str, out, chats: list, **lora) -> Adapter:
    """`qwen2 train sft` with LoRA for a few steps; the update read back from its files here."""
    data = out / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats), encoding="utf-8")
    result = qwen2.train.sft({"model": base_dir, "data": str(data), "output_dir": str(out / "run"), "lora": True,
                              "lr": 2e-2, "batch_size": 2, "max_steps": 3, "seq_len": 64, "merge_lora": False,
                              "save_every": 1000, **lora})
    config = json.loads(open(os.path.join(result.adapter_dir, "adapter_config.json")).read())
    tensors = load_file(os.path.join(result.adapter_dir, "adapter.safetensors"))
    scale = config["alpha"] / config["r"]
    deltas = {m: scale * tensors[f"{m}.lora_B"] @ tensors[f"{m}.lora_A"] for m in config["modules"]}
    return Adapter(result.adapter_dir, deltas)


PEFT_TARGETS = ["k_proj", "o_proj", "gate_proj", "up_proj"]
PEFT_R, PEFT_ALPHA, PEFT_RANK_PATTERN, PEFT_ALPHA_PATTERN = 6, 9.0, {"up_proj": 3}, {"o_proj": 20.0}


def peft_written(base_dir: str, path) -> Adapter:
    """A LoRA adapter saved by peft's `save_pretrained` (random nonzero A and B, per-module rank and
    alpha patterns); the update is peft's own `get_delta_weight`."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    model = transformers.Qwen2ForCausalLM.from_pretrained(base_dir)
    config = peft.LoraConfig(r=PEFT_R, lora_alpha=PEFT_ALPHA, target_modules=PEFT_TARGETS, init_lora_weights=False,
                             rank_pattern=PEFT_RANK_PATTERN, alpha_pattern=PEFT_ALPHA_PATTERN)
    wrapped = peft.get_peft_model(model, config)
    wrapped.save_pretrained(str(path))
    prefix = "base_model.model."
    deltas = {name.removeprefix(prefix): module.get_delta_weight("default").detach().clone()
              for name, module in wrapped.named_modules() if isinstance(module, peft.tuners.lora.Linear)}
    return Adapter(str(path), deltas)


def peft_by_hand(base_dir: str, path) -> Adapter:
    """The same adapter in PEFT's documented layout, written without peft."""
    config = json.loads(open(os.path.join(base_dir, "config.json")).read())
    hidden, width, heads, kv = (config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                     "num_key_value_heads"))
    shapes = {"k_proj": (hidden, hidden // heads * kv), "o_proj": (hidden, hidden), "gate_proj": (hidden, width),
              "up_proj": (hidden, width)}
    gen = torch.Generator().manual_seed(3)
    tensors, deltas = {}, {}
    for layer in range(config["num_hidden_layers"]):
        for attr, (n_in, n_out) in shapes.items():
            module = f"model.layers.{layer}.{'self_attn' if attr in ('k_proj', 'o_proj') else 'mlp'}.{attr}"
            r, alpha = PEFT_RANK_PATTERN.get(attr, PEFT_R), PEFT_ALPHA_PATTERN.get(attr, PEFT_ALPHA)
            A, B = 0.1 * torch.randn(r, n_in, generator=gen), 0.1 * torch.randn(n_out, r, generator=gen)
            tensors[f"base_model.model.{module}.lora_A.weight"] = A
            tensors[f"base_model.model.{module}.lora_B.weight"] = B
            deltas[module] = alpha / r * B @ A
    os.makedirs(path)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": PEFT_R, "lora_alpha": PEFT_ALPHA, "target_modules": PEFT_TARGETS,
                   "rank_pattern": PEFT_RANK_PATTERN, "alpha_pattern": PEFT_ALPHA_PATTERN, "use_rslora": False,
                   "bias": "none", "modules_to_save": None}, f)
    return Adapter(str(path), deltas)


@pytest.fixture(scope="module")
def adapters(base_dir, tmp_path_factory) -> dict[str, Adapter]:
    out = tmp_path_factory.mktemp("adapters")
    (out / "a").mkdir(), (out / "b").mkdir()
    try:
        import peft  # noqa: F401
        pft = peft_written(base_dir, out / "p")
    except ImportError:
        pft = peft_by_hand(base_dir, out / "p")
    def task(prompt: str, reply: str) -> list:
        return [[{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]] * 2

    return {
        "a": trained(base_dir, out / "a", task("the cat", "the hat"), lora_r=4,
                     lora_targets=["q_proj", "v_proj", "down_proj", "lm_head"]),
        "b": trained(base_dir, out / "b", task("in a tin", "a thin tin"), lora_r=8,
                     lora_alpha=4.0),  # all seven block linears, another rank and scale
        "p": pft,
    }


@pytest.fixture(scope="module")
def served(base_dir, adapters) -> Qwen2:
    return qwen2.load(base_dir, adapters={name: a.path for name, a in adapters.items()})


def merged(base_dir: str, adapter: Adapter | None) -> Qwen2:
    """The base model alone, or with `adapter`'s updates added to its weights."""
    m = qwen2.load(base_dir)
    if adapter is not None:
        with torch.no_grad():
            for module, delta in adapter.deltas.items():
                m.model.get_submodule(module).weight += delta
    return m


@pytest.fixture(scope="module")
def references(base_dir, adapters) -> dict:
    return {name: merged(base_dir, adapters.get(name)) for name in ("a", "b", None, "p")}


def rows_logits(decoder, ids: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Logits of a prefill of `ids` (B, T) and then of a decode step per column of `steps` (B, S): (B, 1 + S, V)."""
    with torch.inference_mode():
        cache = decoder.new_cache(ids.shape[0], ids.shape[1] + steps.shape[1])
        out = [decoder(ids, cache=cache, last_only=True)]
        for s in range(steps.shape[1]):
            out.append(decoder(steps[:, s:s + 1], cache=cache))
    return torch.cat(out, dim=1)


# ---- a mixed batch, row by row ------------------------------------------------------------------

def test_mixed_batch_rows_equal_their_merged_models(served, references):
    """Rows on adapter a, adapter b, the base model and the PEFT adapter in one batch: prefill and
    decode steps (the native executor, adapted blocks' linears in Python) equal each merged model
    alone within 1e-4, while each adapter moves its row's logits well past that."""
    assert served.decoder.name == "native" and sorted(served.adapters.names) == ["a", "b", "p"]
    names = list(references)
    gen = torch.Generator().manual_seed(0)
    ids, steps = torch.randint(0, 264, (4, 7), generator=gen), torch.randint(0, 264, (4, 3), generator=gen)
    served.adapters.select(names)
    try:
        mixed = rows_logits(served.decoder, ids, steps)
    finally:
        served.adapters.select(None)
    base = rows_logits(references[None].decoder, ids, steps)
    for row, name in enumerate(names):
        alone = rows_logits(references[name].decoder, ids[row:row + 1], steps[row:row + 1])
        assert (mixed[row] - alone[0]).abs().max().item() <= 1e-4, name
        if name is not None:
            assert (alone[0] - base[row]).abs().max().item() > 1e-2, name  # the adapter does change the row
    unselected = rows_logits(served.decoder, ids, steps)  # no adapter chosen: the base model, exactly
    assert (unselected - base).abs().max().item() <= 1e-5


def decode_and_verify(decoder, ids: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows_logits`, and the logits of `steps` as verification rows (each attending as a one-token
    step) after a prefill of `ids`."""
    with torch.inference_mode():
        cache = decoder.new_cache(ids.shape[0], ids.shape[1] + steps.shape[1])
        decoder(ids, cache=cache, last_only=True)
        cache.exact_rows = True
        return rows_logits(decoder, ids, steps), decoder(steps, cache=cache)


@pytest.mark.parametrize("names", [["a", "b", None, "p"], [None, "b", "b", None]], ids=["every-adapter", "one-active"])
def test_native_block_adds_the_updates_as_the_adapted_modules_do(served, names, monkeypatch):
    """The native executor adds each linear's low-rank update inside its one-call decode step
    (decode_layers, kernels/decode_block.cpp): its logits equal the block's own modules (the adapted
    linears in Python, around the native attention) bit for bit, with every adapter active or one
    (gathered), for one-token steps and for verification rows."""
    from qwen2.runtime import native as N

    gen = torch.Generator().manual_seed(1)
    ids, steps = torch.randint(0, 264, (4, 7), generator=gen), torch.randint(0, 264, (4, 3), generator=gen)
    one_call = []
    real = N.NativeDecoder.one_call
    monkeypatch.setattr(N.NativeDecoder, "one_call", lambda self, *args: one_call.append(real(self, *args)) or
                        one_call[-1])
    served.adapters.select(names)
    try:
        native = decode_and_verify(served.decoder, ids, steps)
        assert one_call == [True] * 4  # the three steps and the verification rows: every block in one call
        monkeypatch.setattr(N, "block_weights", lambda block, rows: None)  # each block's own modules
        modules = decode_and_verify(served.decoder, ids, steps)
    finally:
        served.adapters.select(None)
    assert torch.equal(native[0], modules[0]) and torch.equal(native[1], modules[1])


def test_peft_adapter_equals_peft_over_transformers(served, adapters, base_dir):
    """The PEFT adapter's row equals peft's own model (unmerged) on transformers' Qwen2."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    theirs = peft.PeftModel.from_pretrained(transformers.Qwen2ForCausalLM.from_pretrained(base_dir),
                                            adapters["p"].path).eval()
    ids = torch.randint(0, 264, (2, 9))
    served.adapters.select(["p", "p"])
    try:
        with torch.inference_mode():
            ours = served.decoder(ids)
    finally:
        served.adapters.select(None)
    with torch.inference_mode():
        reference = theirs(ids).logits
    assert (ours - reference).abs().max().item() <= 1e-4


# ---- generation: the loop and the engine --------------------------------------------------------

def test_generate_with_an_adapter_per_prompt_equals_each_merged_model(served, references):
    names = list(references)
    texts = served.generate(PROMPTS, adapter=names, max_new_tokens=10)
    assert texts == [references[n].generate(p, max_new_tokens=10) for p, n in zip(PROMPTS, names)]
    assert len(set(texts)) > 1
    assert served.generate(PROMPTS[0], adapter="a", max_new_tokens=10) == texts[0]
    assert served.generate(PROMPTS[2], max_new_tokens=10) == texts[2]  # no adapter= : the base model
    assert "".join(served.generate(PROMPTS[1], adapter="b", max_new_tokens=10, stream=True)) == texts[1]
    with pytest.raises(Qwen2Error, match="no adapter named 'nope'; loaded: 'a', 'b', 'p'"):
        served.generate(PROMPTS[0], adapter="nope")
    with pytest.raises(Qwen2Error, match="adapter= has 2 names for 4 prompts"):
        served.generate(PROMPTS, adapter=["a", "b"])


def test_engine_rows_on_different_adapters_equal_each_merged_models_greedy_output(served, references):
    """The serving engine decodes every live row in one forward: rows on a, b, the base and p, joining
    at different steps, each equal to its merged model's greedy text alone."""
    engine = Engine(served.decoder, served.tokenizer, served.eos_ids, max_batch=4, max_model_len=64,
                    adapters=served.adapters)
    texts: dict[int, str] = {}
    jobs = list(zip(PROMPTS, references, (12, 6, 10, 9)))

    def request(i: int, prompt: str, name, n: int) -> Request:
        def emit(events):
            for e in events:
                if isinstance(e, Delta):
                    texts[i] = texts.get(i, "") + e.text
        return Request(served.tokenizer.encode(prompt), SamplingParams(max_new_tokens=n), emit, adapter=name)

    queue = [request(i, *job) for i, job in enumerate(jobs)]
    with torch.inference_mode():
        engine._step(queue[:2])
        for _ in range(3):
            engine._step([])
        engine._step(queue[2:])
        while engine.rows:
            engine._step([])
    assert [texts.get(i, "") for i in range(len(jobs))] == \
        [references[name].generate(p, max_new_tokens=n) for p, name, n in jobs]
    with pytest.raises(Qwen2Error, match="no adapter named 'nope'"):
        engine.submit(Request([1, 2], SamplingParams(max_new_tokens=2), lambda events: None, adapter="nope"))


# ---- the server ---------------------------------------------------------------------------------

def test_served_through_the_openai_client_by_model_name(served, references):
    app = create_app(served, model_name="base", max_batch=4, max_model_len=96)
    with serve_in_background(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        listed = client.models.list().data
        assert [m.id for m in listed] == ["base", "a", "b", "p"]
        assert all(m.model_extra["parent"] == "base" for m in listed[1:])
        schema = httpx.get(url + "/openapi.json").json()["components"]["schemas"]
        assert "LoRA adapter" in schema["ChatCompletionRequest"]["properties"]["model"]["description"]

        replies: dict = {}

        def ask(name):  # concurrent requests: their rows share decode steps
            reply = client.chat.completions.create(model=name or "base", messages=CHAT, max_tokens=8, temperature=0)
            replies[name] = (reply.model, reply.choices[0].message.content)

        threads = [threading.Thread(target=ask, args=(name,)) for name in references]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert replies == {name: (name or "base", references[name].chat(CHAT, max_new_tokens=8))
                           for name in references}
        text = client.completions.create(model="b", prompt=PROMPTS[1], max_tokens=6).choices[0].text
        assert text == references["b"].generate(PROMPTS[1], max_new_tokens=6)

        with pytest.raises(openai.NotFoundError, match="model 'nope' does not exist; this server serves 'base' and "
                                                       "the adapters 'a', 'b', 'p'"):
            client.chat.completions.create(model="nope", messages=CHAT, max_tokens=4)
        again = client.chat.completions.create(model="a", messages=CHAT, max_tokens=8)  # still serving
        assert again.choices[0].message.content == replies["a"][1]
    with pytest.raises(Qwen2Error, match="adapter 'a' has the base model's name"):
        create_app(served, model_name="a")


# ---- bad adapters: one line at load time --------------------------------------------------------

def copy_adapter(source: str, path, edit_config=None, edit_tensors=None) -> str:
    """A copy of adapter directory `source` with its config and tensors edited."""
    os.makedirs(path)
    config = json.loads(open(os.path.join(source, "adapter_config.json")).read())
    weights = next(f for f in os.listdir(source) if f.endswith(".safetensors"))
    tensors = load_file(os.path.join(source, weights))
    if edit_config:
        edit_config(config)
    if edit_tensors:
        edit_tensors(tensors)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, weights))
    return str(path)


def test_bad_adapters_are_one_line_errors_at_load_time(base_dir, adapters, tmp_path):
    ours, peft_dir = adapters["a"].path, adapters["p"].path
    q = "model.layers.0.self_attn.q_proj"
    peft_k = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"

    def wider(t):
        t[f"{q}.lora_A"] = torch.zeros(4, 63)

    def renamed(t):
        t["model.layers.7.self_attn.q_proj.lora_A"], t["model.layers.7.self_attn.q_proj.lora_B"] = \
            t.pop(f"{q}.lora_A"), t.pop(f"{q}.lora_B")

    def modules_renamed(c):
        c["modules"] = [m.replace(q, "model.layers.7.self_attn.q_proj") for m in c["modules"]]

    def rank_3(t):
        t[peft_k] = t[peft_k][:3]

    def dora(t):
        t["base_model.model.model.layers.0.self_attn.k_proj.lora_magnitude_vector"] = torch.ones(32)

    cases = {
        "wide": (copy_adapter(ours, tmp_path / "wide", edit_tensors=wider),
                 rf"adapter 'wide': tensor '{q}.lora_A' has shape \(4, 63\) and its B \(64, 4\), but {q} maps 64 to 64 "
                 "features: was it trained on another model\\?"),
        "absent": (copy_adapter(ours, tmp_path / "absent", edit_tensors=renamed, edit_config=modules_renamed),
                   "adapter 'absent': tensor 'model.layers.7.self_attn.q_proj.lora_A' adapts "
                   "'model.layers.7.self_attn.q_proj', which the base model does not have"),
        "rank": (copy_adapter(peft_dir, tmp_path / "rank", edit_tensors=rank_3),
                 rf"adapter 'rank': tensor '{peft_k}' has shape \(3, 64\), of rank 3, but adapter_config.json "
                 "says r=6"),
        "ranks": (copy_adapter(ours, tmp_path / "ranks", edit_config=lambda c: c.update(r=8)),
                  "adapter 'ranks': tensor '.*' has shape \\(4, \\d+\\), of rank 4, but adapter_config.json says r=8"),
        "target": (copy_adapter(peft_dir, tmp_path / "target",
                                edit_config=lambda c: c.update(target_modules=["c_attn"])),
                   "adapter 'target': target module 'c_attn' is not a linear the base model has"),
        "dora": (copy_adapter(peft_dir, tmp_path / "dora", edit_tensors=dora),
                 "adapter 'dora': tensor '.*lora_magnitude_vector' is not a LoRA A or B weight"),
        "dora-config": (copy_adapter(peft_dir, tmp_path / "dora-config", edit_config=lambda c: c.update(use_dora=True)),
                        "adapter 'dora-config': DoRA is not supported"),
    }
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    (pickled / "adapter_model.bin").write_bytes(b"not read")
    cases["pickled"] = (str(pickled), "adapter 'pickled': .* holds adapter_model.bin, a pickle, which is never loaded "
                                      ".*convert it to adapter_model.safetensors")
    for name, (path, message) in cases.items():
        with pytest.raises(Qwen2Error, match=message) as raised:
            qwen2.load(base_dir, adapters={name: path})
        assert "\n" not in str(raised.value), name
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(Qwen2Error, match="adapter 'empty': .* holds no adapter weights"):
        qwen2.load(base_dir, adapters={"empty": str(tmp_path)})
    with pytest.raises(Qwen2Error, match="adapter 'missing': .* is not a directory"):
        qwen2.load(base_dir, adapters={"missing": str(tmp_path / "missing")})
    with pytest.raises(Qwen2Error, match="LoRA adapters are not served with executor='compiled'"):
        qwen2.load(base_dir, adapters={"a": ours}, executor="compiled")
    m = qwen2.load(base_dir, adapters={"a": ours})
    with pytest.raises(Qwen2Error, match="an adapter named 'a' is already loaded"):
        m.add_adapter("a", ours)
    with pytest.raises(Qwen2Error, match="cannot be saved"):
        m.save(tmp_path / "saved")
    with pytest.raises(Qwen2Error, match="no adapter named 'a': this model has no LoRA adapters loaded"):
        qwen2.load(base_dir).generate("x", adapter="a")


def test_serve_refuses_a_bad_adapter_at_start_up_in_one_line(base_dir, adapters, tmp_path, capsys):
    bad = copy_adapter(adapters["b"].path, tmp_path / "bad",
                       edit_tensors=lambda t: t.update({"lm_head.lora_A": torch.zeros(8, 64),
                                                        "lm_head.lora_B": torch.zeros(300, 8)}),
                       edit_config=lambda c: c["modules"].append("lm_head"))
    assert cli.main(["serve", "--model", base_dir, "--port", "0", "--lora", f"good={adapters['a'].path}",
                     "--lora", f"bad={bad}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: adapter 'bad': tensor 'lm_head.lora_A' has shape (8, 64) and its B (300, 8), but lm_head "
                   "maps 64 to 264 features: was it trained on another model?")
    assert cli.main(["serve", "--model", base_dir, "--port", "0", "--lora", "noequals"]) == 1
    assert capsys.readouterr().err.strip() == ("error: --lora 'noequals': give NAME=DIR, e.g. --lora "
                                               "sql=runs/sql-lora/adapter")


def test_each_adapter_has_rank_slots_of_its_own(served):
    """a (r=4), b (r=8) and p (r=6, and 3 on up_proj) are stacked one after another in slots as wide as
    each one's highest rank; a lower rank is zero-padded within its slots, and a linear an adapter
    does not adapt holds zeros in them."""
    q_proj, up_proj = served.model.model.layers[0].self_attn.q_proj, served.model.model.layers[0].mlp.up_proj
    assert type(q_proj).__name__ == "MultiLoRALinear" and tuple(q_proj.A.shape) == (4 + 8 + 6, 64)
    assert served.adapters._ranks == [4, 8, 6]
    assert q_proj.A[:4].abs().sum(1).min() > 0 and q_proj.A[4:12].abs().sum(1).min() > 0  # a and b, every slot
    assert q_proj.A[12:].abs().sum() == 0  # p adapts no q_proj
    assert up_proj.A[12:15].abs().sum(1).min() > 0 and up_proj.A[15:].abs().sum() == 0  # p's rank 3 there
