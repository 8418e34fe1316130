"""Training (qwen2/train/): every piece against an independent computation, on tiny models.

- the SFT loss mask, read back as token strings of the real tokenizer's chat rendering;
- packing: each packed document's logits equal the document alone;
- LoRA: zero B changes nothing, merged equals unmerged, adapters round-trip through safetensors;
- the DPO loss against the formula evaluated by hand with `math`;
- a training step's loss and gradients against transformers' Qwen2ForCausalLM;
- the directory pre-training from scratch starts from; a run's log and options read back;
- a run SIGKILLed mid-way and resumed logs bit-identical losses to an uninterrupted run;
- bad records reported with file and line, fatal or skipped by flag; config errors in one line.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import qwen2
import qwen2.train
from qwen2.cli import main
from qwen2.config import Qwen2Config
from qwen2.errors import Qwen2Error
from qwen2.model import parameter_counts
from qwen2.tokenizer import Tokenizer
from qwen2.train import data as D
from qwen2.train.config import DataSource, TrainConfig, data_sources, from_dict, load_config, to_dict
from qwen2.train.dpo import dpo_loss, sequence_log_probs
from qwen2.train.forward import forward
from qwen2.train.lora import apply_lora, load_adapters, lora_layers, merge_lora, save_adapters
from qwen2.train.loop import Trainer, lr_at
from qwen2.train.mixture import Mixture
from qwen2.train.run import LanguageModelling, load_model, save_initial_model
from qwen2.train.run_dir import check_same_run, mean_loss_up_to, read_log, tokens_seen_by_step

from ggufs import random_model, save_random_model_dir, small_tokenizer_metadata, tiny_config

transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.delenv("QWEN2_PROGRESS", raising=False)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> str:
    """A tiny random model with a 264-token byte-level tokenizer (ChatML specials, default template)."""
    tokenizer = Tokenizer.from_gguf_metadata(small_tokenizer_metadata())
    return save_random_model_dir(tmp_path_factory.mktemp("small") / "model", tokenizer)


def write_lines(path, lines) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


CHATS = [
    {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "the cat"},
                  {"role": "assistant", "content": "the hat"}, {"role": "user", "content": "in a tin"},
                  {"role": "assistant", "content": "a thin tin"}]},
    {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "the end"}]},
    {"messages": [{"role": "user", "content": "in the"}, {"role": "assistant", "content": "heat"}]},
]


# ---- SFT loss mask ------------------------------------------------------------------------------

def labelled_spans(row: D.Row) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, label in enumerate(row.labels + [D.IGNORE_INDEX]):
        if label != D.IGNORE_INDEX and start is None:
            start = i
        elif label == D.IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_sft_mask_is_exactly_the_assistant_turns_and_their_im_end(real_tokenizer):
    replies = ["Sure.\n\n  Here is `x = 1`.", "Ça marche — 42 ✓"]
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Set x."},
                {"role": "assistant", "content": replies[0]}, {"role": "user", "content": "Encore?"},
                {"role": "assistant", "content": replies[1]}]
    row = D.render_chat(real_tokenizer, messages)
    text = real_tokenizer.apply_chat_template(messages)
    assert row.input_ids == real_tokenizer.encode(text)  # the tokens inference sees
    assert all(label in (D.IGNORE_INDEX, token) for label, token in zip(row.labels, row.input_ids))
    spans = labelled_spans(row)
    assert [real_tokenizer.decode(row.input_ids[s:e]) for s, e in spans] == [r + "<|im_end|>" for r in replies]
    for s, e in spans:  # the header before is not trained, nor the newline after <|im_end|>
        assert real_tokenizer.decode(row.input_ids[:s]).endswith("<|im_start|>assistant\n")
        assert real_tokenizer.decode(row.input_ids[e:e + 1]) == "\n"
    # DPO responses: only the last turn
    last = D.render_chat(real_tokenizer, messages, train_on="last")
    assert labelled_spans(last) == spans[-1:]


def test_a_generation_prompt_is_the_sft_row_up_to_the_trained_reply(real_tokenizer):
    """What generation sends after SFT (the chat template up to the reply) is exactly what SFT
    trained the reply after: evaluation continues where the labels start."""
    messages = [{"role": "user", "content": "What is 47 - 58?"}, {"role": "assistant", "content": "#### -11"}]
    assert D.check_messages(messages) is None
    row = D.render_chat(real_tokenizer, messages)
    labelled = [t for t, label in zip(row.input_ids, row.labels) if label != D.IGNORE_INDEX]
    assert real_tokenizer.decode(labelled) == "#### -11<|im_end|>"  # the loss is on the reply alone
    prompt = real_tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    first = row.labels.index(next(label for label in row.labels if label != D.IGNORE_INDEX))
    assert real_tokenizer.encode(prompt) == row.input_ids[:first]


# ---- packing --------------------------------------------------------------------------------------

def test_packed_documents_do_not_see_each_other():
    model = random_model(tiny_config(vocab_size=300))
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 290, (n,), generator=gen).tolist() for n in (5, 9, 3, 12)]
    eod, pad = 299, 298
    rows = D.pack_documents(docs, seq_len=16, eod_id=eod, pad_id=pad)
    assert sum(r.doc_ids.count(D.PAD_DOCUMENT) for r in rows) == 16 * len(rows) - sum(len(d) + 1 for d in docs)
    batch = D.collate(rows, pad)
    with torch.no_grad():
        packed = forward(model, batch.input_ids, batch.doc_ids)
        causal_only = forward(model, batch.input_ids)
    segments = 0
    for b, row in enumerate(rows):
        for doc in set(row.doc_ids) - {D.PAD_DOCUMENT}:
            where = [i for i, d in enumerate(row.doc_ids) if d == doc]
            alone = model(batch.input_ids[b:b + 1, where])[0]
            assert (packed[b, where] - alone).abs().max().item() <= 1e-5
            # the first token of a document is no target; the rest predict their own document
            assert row.labels[where[0]] == D.IGNORE_INDEX
            assert [row.labels[i] for i in where[1:]] == [row.input_ids[i] for i in where[1:]]
            segments += 1
    assert segments > len(docs)  # some document was cut across rows and continued as its own segment
    assert (packed - causal_only).abs().max().item() > 1e-3  # without the document mask they differ


@pytest.mark.parametrize("extension", ["sliding-window", "dynamic-yarn"])
def test_training_forward_equals_the_model_with_long_context_options(extension):
    """The training forward keeps the model's own attention rules: sliding-window layers slide, and
    dynamic YaRN decides by the row's length as Transformer.forward does."""
    if extension == "sliding-window":
        config = tiny_config(vocab_size=300, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    else:
        config = tiny_config(vocab_size=300, max_position_embeddings=8, rope_scaling={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "dynamic": True})
    model = random_model(config)
    ids = torch.randint(0, 290, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (forward(model, ids) - model(ids)).abs().max().item() <= 1e-5


def test_training_refuses_dual_chunk_attention():
    model = random_model(tiny_config(vocab_size=300, dual_chunk_attention_config={"chunk_size": 8, "local_size": 2}))
    with pytest.raises(Qwen2Error, match="train without it"):
        forward(model, torch.zeros(1, 4, dtype=torch.long))


# ---- LoRA -------------------------------------------------------------------------------------------

def test_lora_zero_b_merge_and_adapter_round_trip(tmp_path):
    config = tiny_config()
    model = random_model(config)
    ids = torch.randint(0, config.vocab_size, (2, 11))
    with torch.no_grad():
        base = model(ids)
    names = apply_lora(model, ["q_proj", "v_proj", "model.layers.1.mlp.*"], r=4, alpha=8.0)
    assert len(names) == 2 * 2 + 3
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        assert torch.equal(model(ids), base)  # B = 0: exactly the base model
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.1)
        adapted = model(ids)
    assert (adapted - base).abs().max().item() > 1e-2
    save_adapters(model, tmp_path / "adapter")
    fresh = random_model(config)
    load_adapters(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(ids), adapted)
        merged = merge_lora(model)(ids)
    assert not lora_layers(model)
    assert (merged - adapted).abs().max().item() <= 1e-5
    with pytest.raises(Qwen2Error, match="'nope_proj' match no linear layer"):
        apply_lora(random_model(config), ["q_proj", "nope_proj"])


# ---- DPO ----------------------------------------------------------------------------------------------

def test_dpo_loss_equals_the_hand_computed_value():
    beta = 0.1
    pc, pr, rc, rr = [-12.5, -3.0], [-15.0, -1.0], [-13.0, -3.5], [-14.0, -2.0]
    out = dpo_loss(*(torch.tensor(v, dtype=torch.float64) for v in (pc, pr, rc, rr)), beta)
    for i in range(2):
        z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i]))
        assert out.losses[i].item() == pytest.approx(math.log(1 + math.exp(-z)), abs=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * (pc[i] - rc[i]), abs=1e-12)
        assert out.rejected_rewards[i].item() == pytest.approx(beta * (pr[i] - rr[i]), abs=1e-12)
    assert out.metrics()["accuracy"] == 1.0  # pair 0 wins (z = 0.15), pair 1 loses (z = -0.05)


def test_sequence_log_probs_score_the_response_tokens_only():
    # vocabulary of 3; logits at position t predict the label at t + 1
    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [3.0, 0.0, 0.0], [0.5, 0.5, 0.0]]])
    labels = torch.tensor([[D.IGNORE_INDEX, D.IGNORE_INDEX, 2, 0]])  # prompt, prompt, response, response

    def log_softmax(row, k):
        return row[k] - math.log(sum(math.exp(x) for x in row))

    expected = log_softmax([1.0, 1.0, 1.0], 2) + log_softmax([3.0, 0.0, 0.0], 0)
    assert sequence_log_probs(logits, labels).item() == pytest.approx(expected, abs=1e-6)


# ---- a training step against transformers ---------------------------------------------------------

def hf_twin(model):
    theirs = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**model.config.to_hf_dict()))
    theirs.load_state_dict(model.state_dict(), strict=False)
    return theirs.train()


def fixed_batch(vocab_size: int) -> D.Batch:
    gen = torch.Generator().manual_seed(3)
    rows = []
    for n, prompt in ((13, 4), (9, 0), (6, 2)):
        ids = torch.randint(0, vocab_size, (n,), generator=gen).tolist()
        rows.append(D.Row(ids, [D.IGNORE_INDEX] * prompt + ids[prompt:], [0] * n))
    return D.collate(rows, pad_id=0)


@pytest.mark.parametrize("tied", [False, True])
def test_training_step_loss_and_gradients_equal_transformers(tied):
    model = random_model(tiny_config(tie_word_embeddings=tied)).train()
    theirs = hf_twin(model)
    batch = fixed_batch(model.config.vocab_size)
    real = (batch.doc_ids != D.PAD_DOCUMENT).long()
    expected = theirs(input_ids=batch.input_ids, attention_mask=real, labels=batch.labels)
    expected.loss.backward()
    objective = LanguageModelling(activation_checkpointing=False)
    loss, _ = objective.loss(model, batch)
    (loss / objective.count(batch)).backward()
    assert abs((loss / objective.count(batch)).item() - expected.loss.item()) <= 1e-6
    theirs_params = dict(theirs.named_parameters())
    for name, p in model.named_parameters():
        assert (p.grad - theirs_params[name].grad).abs().max().item() <= 1e-5, name
    # the Trainer's logged step loss is that same number, and the same grads drive the update
    cfg = TrainConfig(output_dir="unused", grad_clip=0.0, lr=1e-3, min_lr=1e-3, weight_decay=0.0)
    fresh = random_model(tiny_config(tie_word_embeddings=tied))
    record = Trainer(cfg, fresh, objective, lambda m: batch, torch.device("cpu")).train_step()
    assert abs(record["loss"] - expected.loss.item()) <= 1e-6
    assert record["tokens"] == int(real.sum())


def test_accumulation_and_activation_checkpointing_keep_the_gradients():
    batch = fixed_batch(1000)
    halves = [D.Batch(batch.input_ids[i:j], batch.labels[i:j], batch.doc_ids[i:j]) for i, j in ((0, 1), (1, 3))]

    def grads(micro_batches, checkpointing):
        model = random_model(tiny_config()).train()
        objective = LanguageModelling(checkpointing)
        total = sum(objective.count(mb) for mb in micro_batches)
        for mb in micro_batches:
            (objective.loss(model, mb)[0] / total).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    whole = grads([batch], False)
    for variant in (grads(halves, False), grads([batch], True)):
        for name, g in whole.items():
            assert (variant[name] - g).abs().max().item() <= 1e-6, name


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(lr=7e-6, min_lr=7e-7, warmup_steps=10, max_steps=111, schedule="cosine")
    assert lr_at(0, cfg) == pytest.approx(7e-7) and lr_at(9, cfg) == pytest.approx(7e-6)
    assert lr_at(10 + 50, cfg) == pytest.approx((7e-6 + 7e-7) / 2)  # cosine half-way through steps 10..110
    assert lr_at(110, cfg) == pytest.approx(7e-7)  # the last step is at the floor
    linear = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=5, schedule="linear")
    assert [lr_at(s, linear) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_tensorboard_events_hold_the_logged_records(tmp_path):
    """tensorboard=true: every numeric field of every logged record is a scalar at its step in the
    event file, read back with TensorBoard's own reader; log.jsonl and log.csv are written too."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from qwen2.train.loop import RunLog

    records = [{"step": s, "loss": 3.0 / s, "lr": 1e-4 * s, "grad_norm": 0.5 + s, "tokens": 64 * s, "note": "x"}
               for s in (1, 2, 5)]
    log = RunLog(str(tmp_path), tensorboard=True)
    for record in records:
        log.append(record)
    log.writer.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["train/grad_norm", "train/loss", "train/lr", "train/tokens"]
    for key in ("loss", "lr", "grad_norm", "tokens"):
        got = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert got == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in records], key
    assert log.records() == records
    assert open(tmp_path / "log.csv").read().splitlines()[0] == "step,loss,lr,grad_norm,tokens,note"


# ---- pre-training from scratch: the starting directory; a run's output directory read back ---------

def test_the_starting_directory_is_what_pretrain_takes(trained_bpe, project_prose, tmp_path):
    config = Qwen2Config(vocab_size=len(trained_bpe), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=trained_bpe.eos_token_id,
                         torch_dtype="float32")
    init_dir = str(tmp_path / "init")
    save_initial_model(init_dir, config, trained_bpe, seed=5)
    cfg = TrainConfig(model=init_dir, from_scratch=True, seed=5)
    m = load_model(cfg, torch.device("cpu"))  # what pretrain(from_scratch=true) starts from
    assert m.config.vocab_size == len(trained_bpe) and m.config.max_position_embeddings == 64
    counts = parameter_counts(config)
    assert counts["total"] == sum(p.numel() for p in m.model.parameters())
    assert counts["embedding"] == len(trained_bpe) * config.hidden_size
    saved = load_model(TrainConfig(model=init_dir), torch.device("cpu")).model.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in m.model.state_dict().items())  # the same seeded init
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in project_prose[:2]))
    report = D.DataReport(str(data))
    rows = D.pretraining_rows(m.tokenizer, str(data), 64, True, report)
    assert report.records == 2 and all(len(r) == 64 for r in rows)
    ends = [t for r in rows for t, doc in zip(r.input_ids, r.doc_ids)
            if doc != D.PAD_DOCUMENT and t == trained_bpe.eos_token_id]
    assert len(ends) == 2  # each document ends in <|endoftext|> (padding aside, which reuses its id)


def test_a_runs_log_read_back(tmp_path):
    assert read_log(str(tmp_path)) == []  # nothing logged yet
    log = [{"step": s, "loss": float(10 - s), "tokens": 100 + s} for s in range(1, 7)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    assert read_log(str(tmp_path)) == log
    assert tokens_seen_by_step(log) == [101, 203, 306, 410, 515, 621]
    assert mean_loss_up_to(log, 4, 2) == pytest.approx((7 + 6) / 2)
    assert mean_loss_up_to(log, 0, 2) is None
    # the trailing mean the experiments' plots smooth a loss curve with: [1, 3, 5, 7] over 2 steps
    ramp = [{"step": s, "loss": loss} for s, loss in enumerate([1.0, 3.0, 5.0, 7.0], start=1)]
    assert [mean_loss_up_to(ramp, s, 2) for s in range(1, 5)] == [1.0, 2.0, 4.0, 6.0]


def test_a_rerun_resumes_only_a_run_with_the_same_options(tmp_path):
    run = tmp_path / "run"
    options = {"model": str(tmp_path / "init"), "from_scratch": True, "data": str(tmp_path / "train.jsonl"),
               "output_dir": str(run), "max_steps": 6, "lr": 2e-3}
    check_same_run(str(run), options)  # no run there yet: nothing to compare
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps(to_dict(from_dict({**options, "resume": True}))))
    check_same_run(str(run), options)  # same options: resume
    saved = to_dict(from_dict({**options, "resume": True}))
    del saved["stages"], saved["eval_every"]  # a run made before these options existed had their defaults
    (run / "train_config.json").write_text(json.dumps(saved))
    check_same_run(str(run), options)
    with pytest.raises(Qwen2Error, match=r"other options \(lr: 0.002 -> 0.001\)"):
        check_same_run(str(run), {**options, "lr": 1e-3})


# ---- runs: resume after SIGKILL, SFT + LoRA, DPO ----------------------------------------------------

def run_cli(args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    env.pop("QWEN2_PROGRESS", None)
    return subprocess.run([sys.executable, "-m", "qwen2.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def losses(output_dir) -> list[tuple]:
    """Each logged step's record but its timing (tokens_per_s): loss, lr, grad norm, and with a
    mixture each source's share and held-out loss."""
    with open(os.path.join(output_dir, "log.jsonl"), encoding="utf-8") as f:
        return [(r["step"], r["loss"], r["lr"], r["grad_norm"],
                 sorted((k, v) for k, v in r.items() if k.startswith(("share/", "heldout_loss/"))))
                for r in map(json.loads, f)]


def documents(path, seed: int, count: int, words: str) -> str:
    """`count` documents of 3 to 14 words drawn from `words`, as pre-training JSONL."""
    gen = torch.Generator().manual_seed(seed)
    vocab = words.split()
    docs = [" ".join(vocab[int(i)] for i in torch.randint(0, len(vocab), (3 + n % 12,), generator=gen))
            for n in range(count)]
    return write_lines(path, [json.dumps({"text": d}) for d in docs])


def mixture_of_three(tmp_path) -> list[dict]:
    """Three sources of unlike words and document lengths, the first two with held-out files."""
    vocab = {"cats": "the cat sat in a hat then the cat ran", "tins": "a thin tin in the heat",
             "digits": "0 1 2 3 4 5 6 7 8 9"}
    sources = []
    for i, (name, words) in enumerate(vocab.items()):
        entry = {"path": documents(tmp_path / f"{name}.jsonl", i, 20 + 15 * i, words), "weight": [5, 3, 2][i]}
        if name != "digits":
            entry["heldout"] = documents(tmp_path / f"{name}-heldout.jsonl", 100 + i, 6, words)
        sources.append(entry)
    return sources


@pytest.mark.parametrize("task", ["pretrain", "pretrain-mixture", "pretrain-stages", "sft"])
def test_resume_after_sigkill_reproduces_the_losses_exactly(task, small_dir, tmp_path, capsys):
    data_option = None
    if task == "pretrain-stages":  # resumed inside the second stage: its longer rows and RoPE base come back
        data = tmp_path / "corpus.txt"
        data.write_text("<|endoftext|>".join(f"the cat {i} sat in the hat " * (1 + i % 4) for i in range(12)))
        extra = ["seq_len=16", "lr=3e-3", 'stages=[{"steps": 2}, {"steps": 6, "seq_len": 32, "rope_theta": 100.0}]']
        task = "pretrain"
    elif task == "pretrain":
        data = tmp_path / "corpus.txt"
        data.write_text("<|endoftext|>".join(f"the cat {i} sat in the hat " * (1 + i % 4) for i in range(12)))
        extra = ["seq_len=24", "lr=3e-3"]
    elif task == "pretrain-mixture":  # each source's share and held-out loss come back too
        tables = ("{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in entry.items()) + "}"
                  for entry in mixture_of_three(tmp_path))
        data_option = f"data = [{', '.join(tables)}]"
        extra = ["seq_len=24", "lr=3e-3", "eval_every=4"]
        task = "pretrain"
    else:  # LoRA with dropout: the RNG state must come back too
        data = write_lines(tmp_path / "chat.jsonl", [json.dumps(c) for c in CHATS])
        extra = ["lora=true", "lora_r=4", "lora_dropout=0.2", "lr=1e-2", "seq_len=128"]
    config = tmp_path / "train.toml"
    steps = "" if any(e.startswith("stages=") for e in extra) else "max_steps = 8\n"
    config.write_text(f'model = "{small_dir}"\n{data_option or f"data = {json.dumps(str(data))}"}\nbatch_size = 2\n'
                      f"grad_accum = 2\n{steps}save_every = 3\nwarmup_steps = 2\nmin_lr = 1e-4\n")
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    # Only the run to be killed needs a process of its own; the others run in this one.
    assert main(["train", task, "--config", str(config), f"output_dir={whole}", *extra]) == 0
    crash = run_cli(["train", task, "--config", str(config), f"output_dir={killed}", *extra],
                    {"QWEN2_TRAIN_KILL_AFTER_STEP": "5"})
    assert crash.returncode == -9, crash.stderr
    assert [s for s, *_ in losses(killed)] == [1, 2, 3, 4, 5]  # steps 4, 5 are past the checkpoint at 3
    assert os.listdir(os.path.join(killed, "checkpoints")) == ["step-00000003"]
    capsys.readouterr()
    assert main(["train", task, "--resume", "--config", str(config), f"output_dir={killed}", *extra]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert losses(killed) == losses(whole)  # bit-identical floats: losses, learning rates, grad norms
    assert len(losses(whole)) == 8 and losses(whole)[-1][1] < losses(whole)[0][1]
    if data_option:
        assert [dict(r[4])["heldout_loss/cats"] is not None for r in losses(whole)] == [s in (4, 8) for s in range(1, 9)]
    if not steps:
        log = read_log(whole)
        assert [(r["stage"], r["seq_len"], r["rope_theta"]) for r in log] == [(1, 16, 10000.0)] * 2 + [(2, 32, 100.0)] * 6
        assert json.load(open(os.path.join(whole, "model", "config.json")))["rope_theta"] == 100.0


# ---- data mixtures ----------------------------------------------------------------------------------

def real_tokens(row: D.Row) -> int:
    return len(row.doc_ids) - row.doc_ids.count(D.PAD_DOCUMENT)


def test_a_mixture_gives_each_source_its_weights_share_of_the_tokens():
    gen = torch.Generator().manual_seed(0)

    def source_rows(count: int, longest: int) -> list[D.Row]:  # unpacked: rows of unequal length
        docs = [list(range(1, 2 + int(n))) for n in torch.randint(0, longest, (count,), generator=gen)]
        return D.pack_documents(docs, seq_len=32, eod_id=0, pad_id=0, pack=False)

    rows = [source_rows(40, 30), source_rows(7, 5), source_rows(300, 12)]
    sources = [DataSource(f"{n}.jsonl", w, n) for n, w in zip("abc", (0.5, 0.3, 0.2))]
    mixture = Mixture(sources, rows, seed=3)
    read = 200 * 8  # 200 steps of 8 rows
    tokens = {}
    for i in range(read):
        row = mixture.row(i)
        source = next(s.name for s, r in zip(sources, rows) if any(row is x for x in r))
        assert source == mixture.source_of(i)
        tokens[source] = tokens.get(source, 0) + real_tokens(row)
    realised = {k: v / sum(tokens.values()) for k, v in tokens.items()}
    for source in sources:
        assert abs(realised[source.name] - source.weight) <= 0.02
        assert mixture.shares(read)[source.name] == pytest.approx(realised[source.name], abs=1e-12)
    # every source's rows are read in epochs: each row once before any twice
    b_reads = [next(j for j, x in enumerate(rows[1]) if x is mixture.row(i)) for i in range(read)
               if mixture.source_of(i) == "b"]
    assert sorted(b_reads[:7]) == list(range(7)) and sorted(b_reads[7:14]) == list(range(7))
    # one source reads its rows in the order a single-file run reads them
    single = Mixture(sources[:1], rows[:1], seed=3)
    order = D.ExampleOrder(len(rows[0]), 8, seed=3)
    assert [single.row(i) for i in range(96)] == [rows[0][j] for m in range(12) for j in order.micro_batch(m)]


def test_pretrain_on_a_mixture_logs_shares_and_held_out_losses(small_dir, tmp_path):
    sources = mixture_of_three(tmp_path)
    result = qwen2.train.pretrain({"model": small_dir, "data": sources, "output_dir": str(tmp_path / "run"),
                                   "seq_len": 16, "batch_size": 4, "max_steps": 200, "lr": 3e-3, "min_lr": 3e-4,
                                   "eval_every": 50, "log_every": 10})
    last = result.log[-1]
    assert last["step"] == 200
    for source, weight in zip(("cats", "tins", "digits"), (0.5, 0.3, 0.2)):
        assert abs(last[f"share/{source}"] - weight) <= 0.02
    heldout = [(r["step"], r["heldout_loss/cats"], r["heldout_loss/tins"]) for r in result.log
               if r["heldout_loss/cats"] is not None]
    assert [s for s, *_ in heldout] == [50, 100, 150, 200]
    assert "heldout_loss/digits" not in last  # no held-out file, no column
    assert heldout[-1][1] < heldout[0][1] and heldout[-1][2] < heldout[0][2]
    assert [s["name"] for s in result.data["sources"]] == ["cats", "tins", "digits"]
    assert [s["records"] for s in result.data["sources"]] == [20, 35, 50]
    # the held-out loss is the mean next-token loss of the held-out rows under the final model
    model = qwen2.load(result.model_dir, progress=False).model
    tokenizer = Tokenizer.from_dir(small_dir)
    rows = D.pretraining_rows(tokenizer, sources[1]["heldout"], 16, True, D.DataReport(sources[1]["heldout"]))
    batch = D.collate(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(batch.input_ids, document_ids=batch.doc_ids)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch.labels[:, 1:],
                                                 ignore_index=D.IGNORE_INDEX)
    assert heldout[-1][2] == pytest.approx(float(expected), rel=1e-5)


def test_each_stage_reads_its_data_at_its_length_with_its_position_encoding(small_dir, tmp_path):
    """A staged run's first stage is the run of that stage alone; the second reads its own data in
    longer rows, with the new RoPE base, which the saved model keeps."""
    short = documents(tmp_path / "short.jsonl", 0, 30, "the cat sat in a hat")
    long = documents(tmp_path / "long.jsonl", 1, 30, "a thin tin in the heat then the cat ran")
    common = {"model": small_dir, "batch_size": 2, "lr": 3e-3, "schedule": "constant", "save_every": 3}
    staged = qwen2.train.pretrain({**common, "data": short, "output_dir": str(tmp_path / "staged"), "stages": [
        {"steps": 3, "seq_len": 16}, {"steps": 3, "seq_len": 40, "data": long, "rope_theta": 1e6,
                                      "max_position_embeddings": 4096}]})
    first = qwen2.train.pretrain({**common, "data": short, "seq_len": 16, "max_steps": 3,
                                  "output_dir": str(tmp_path / "apart")})
    assert [r["loss"] for r in staged.log[:3]] == [r["loss"] for r in first.log]
    assert [r["tokens"] for r in staged.log] == [32] * 3 + [80] * 3  # rows of 16, then of 40 tokens
    saved = json.load(open(os.path.join(staged.model_dir, "config.json")))
    assert (saved["rope_theta"], saved["max_position_embeddings"]) == (1e6, 4096)
    assert [s["seq_len"] for s in staged.data["stages"]] == [16, 40]


def test_stage_and_position_options_and_their_errors(small_dir, tmp_path):
    cfg = load_config(None, ['stages=[{"steps": 2, "seq_len": 64}, {"steps": 5, "rope_theta": 1e6}]'])
    assert cfg.max_steps == 7  # the stages' sum
    with pytest.raises(Qwen2Error, match=r"max_steps \(9\) must be the sum of the stages' steps \(7\); leave"):
        load_config(None, ["max_steps=9", 'stages=[{"steps": 2}, {"steps": 5}]'])
    with pytest.raises(Qwen2Error, match=r"'stages' entry 2 has unknown key\(s\) 'hidden_size'; known keys: steps, "
                                         r"seq_len, data, max_position_embeddings, rope_theta"):
        load_config(None, ['stages=[{"steps": 2}, {"steps": 5, "hidden_size": 64}]'])
    with pytest.raises(Qwen2Error, match=r"'stages' entry 1: 'steps' must be an integer of at least 1, got 0"):
        load_config(None, ['stages=[{"steps": 0}]'])
    with pytest.raises(Qwen2Error, match=r"model_config may change hidden_size of a model trained from_scratch only; "
                                         r"a continued training may change its position encoding \(max_position_emb"):
        qwen2.train.pretrain({"model": small_dir, "data": documents(tmp_path / "d.jsonl", 0, 4, "a b"),
                              "output_dir": str(tmp_path / "run"), "model_config": {"hidden_size": 64}})


def test_mixture_options_and_their_errors(small_dir, tmp_path, capsys):
    toml = tmp_path / "mix.toml"
    toml.write_text('data = [{path = "web.jsonl", weight = 3}, {path = "code/py.jsonl.gz", weight = 1, '
                    'heldout = "py-val.jsonl"}]\n')
    cfg = load_config(toml)
    assert data_sources(cfg.data) == [DataSource("web.jsonl", 3.0, "web"), DataSource("code/py.jsonl.gz", 1.0, "py",
                                                                                      "py-val.jsonl")]
    cfg = load_config(None, ['data=[{"path": "a.jsonl", "weight": 0.7, "name": "A"}, {"path": "b.txt"}]'])
    assert [(s.name, s.weight) for s in data_sources(cfg.data)] == [("A", 0.7), ("b", 1.0)]
    assert data_sources(load_config(None, ["data=one.jsonl"]).data) == [DataSource("one.jsonl", 1.0, "one")]
    bad = {'[{"path": "a.jsonl", "weight": 0}]': r"entry 1 \(a.jsonl\): \"weight\" must be a positive number, got 0",
           '[{"path": "a.jsonl", "wieght": 2}]': r"entry 1 has unknown key\(s\) 'wieght'; known keys: path, weight",
           '[{"path": "a.jsonl"}, {"path": "x/a.jsonl"}]': r"names the source 'a' twice; give each entry its own name",
           '[{"weight": 1}]': r"entry 1 needs a \"path\"",
           '["a.jsonl"]': r"entry 1 must be a table"}
    for value, message in bad.items():
        with pytest.raises(Qwen2Error, match=message):
            load_config(None, [f"data={value}"])
    with pytest.raises(Qwen2Error, match=r"training data .*missing.jsonl does not exist"):
        qwen2.train.pretrain({"model": small_dir, "data": [{"path": str(tmp_path / "missing.jsonl")}],
                              "output_dir": str(tmp_path / "run")})
    prefs = write_lines(tmp_path / "prefs.jsonl", [json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})])
    assert main(["train", "dpo", f"model={small_dir}", f'data=[{{"path": "{prefs}"}}]',
                 f"output_dir={tmp_path / 'dpo'}"]) == 1
    assert capsys.readouterr().err.strip() == ('error: data mixtures and stages are for pretrain and sft; dpo reads '
                                               'one file: set data = "FILE.jsonl" and no stages')


def test_sft_lora_run_writes_adapters_and_a_merged_hf_model(small_dir, tmp_path):
    data = write_lines(tmp_path / "chat.jsonl", [json.dumps(c) for c in CHATS])
    result = qwen2.train.sft({"model": small_dir, "data": data, "output_dir": str(tmp_path / "run"), "lora": True,
                              "lora_r": 4, "lr": 1e-2, "min_lr": 1e-3, "batch_size": 3, "max_steps": 4,
                              "seq_len": 128})
    assert [r["step"] for r in result.log] == [1, 2, 3, 4]
    assert result.data == {"file": data, "records": 3, "skipped": 0, "truncated": 0}
    merged = qwen2.load(result.model_dir, progress=False).model
    base = qwen2.load(small_dir, progress=False).model
    adapted = qwen2.load(small_dir, progress=False).model
    load_adapters(adapted, result.adapter_dir)
    ids = torch.randint(0, 264, (1, 12))
    with torch.no_grad():
        assert (merged(ids) - adapted(ids)).abs().max().item() <= 1e-5
        assert (merged(ids) - base(ids)).abs().max().item() > 1e-4  # it did learn something
    theirs = transformers.Qwen2ForCausalLM.from_pretrained(result.model_dir)  # an HF checkpoint
    with torch.no_grad():
        assert (theirs(ids).logits - merged(ids)).abs().max().item() <= 1e-4


def test_dpo_starts_at_log2_with_the_policy_as_its_own_reference(small_dir, tmp_path):
    pairs = [{"prompt": "the cat", "chosen": "the hat", "rejected": "in a tin"},
             {"prompt": [{"role": "user", "content": "hi"}], "chosen": "the end", "rejected": "then"}]
    data = write_lines(tmp_path / "prefs.jsonl", [json.dumps(p) for p in pairs])
    options = {"model": small_dir, "data": data, "batch_size": 2, "max_steps": 3, "lr": 1e-2, "min_lr": 1e-2,
               "seq_len": 128, "beta": 0.5}
    for lora in (False, True):  # frozen copy as reference; LoRA: the base with adapters off
        log = qwen2.train.dpo(options, output_dir=str(tmp_path / f"run-{lora}"), lora=lora).log
        assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert log[0]["margin"] == pytest.approx(0.0, abs=1e-6)
        assert log[-1]["margin"] > 0 and log[-1]["loss"] < math.log(2)


# ---- bad records and bad options ------------------------------------------------------------------

def test_bad_records_are_reported_with_file_and_line(small_dir, tmp_path, capsys):
    lines = [json.dumps(CHATS[0]), "{not json", "", json.dumps({"messages": [{"role": "user", "content": "x"}]}),
             json.dumps(CHATS[1]), json.dumps(["a list"])]
    data = write_lines(tmp_path / "chat.jsonl", lines)
    tokenizer = Tokenizer.from_dir(small_dir)
    with pytest.raises(Qwen2Error, match=rf"bad record at {data}:2: invalid JSON .*on_bad_record=skip"):
        D.sft_rows(tokenizer, data, 64, D.DataReport(data, "fail"))
    report = D.DataReport(data, "skip")
    rows = D.sft_rows(tokenizer, data, 64, report)
    assert len(rows) == report.records == 2 and report.skipped == 3
    err = capsys.readouterr().err
    assert f"{data}:2: invalid JSON" in err and f"{data}:4: the conversation has no assistant message" in err
    assert f"{data}:6: a record must be a JSON object" in err
    # through the CLI: one error line, exit 1
    rc = main(["train", "sft", f"model={small_dir}", f"data={data}", f"output_dir={tmp_path / 'run'}"])
    assert rc == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: bad record at {data}:2: invalid JSON (Expecting property name enclosed in double quotes at column 2) "
        "(set on_bad_record=skip to skip such records)"]


def test_config_files_overrides_and_their_errors(tmp_path, capsys):
    toml = tmp_path / "a.toml"
    toml.write_text('data = "x.jsonl"\nlr = 1e-5\nlora_targets = ["q_proj", "v_proj"]\nmax_steps = 7\n')
    yaml_file = tmp_path / "a.yaml"
    yaml_file.write_text("data: x.jsonl\nlr: 1.0e-5\nlora_targets: [q_proj, v_proj]\nmax_steps: 7\n")
    for path in (toml, yaml_file):
        cfg = load_config(path, ["max_steps=9", "lora=true", "lora_targets=o_proj,up_proj", "min_lr=0"])
        assert (cfg.lr, cfg.max_steps, cfg.lora, cfg.lora_targets, cfg.min_lr) == (1e-5, 9, True, ["o_proj", "up_proj"], 0.0)
    toml.write_text("lrr = 1e-5\n")
    with pytest.raises(Qwen2Error, match=r"unknown training option\(s\) 'lrr' in .*a.toml; known options: model, data"):
        load_config(toml)
    with pytest.raises(Qwen2Error, match=r"training option 'max_steps' must be an integer, got 'ten'"):
        load_config(None, ["max_steps=ten"])
    with pytest.raises(Qwen2Error, match=r"training option 'lr' must be a number, got 'fast'"):
        load_config(None, {"lr": "fast"})
    with pytest.raises(Qwen2Error, match=r"schedule' must be one of cosine, linear, constant"):
        load_config(None, ["schedule=step"])
    assert main(["train", "pretrain", "lr=fast"]) == 1
    assert capsys.readouterr().err == "error: training option 'lr' must be a number, got 'fast'\n"


def test_a_record_holding_a_unicode_line_separator_is_one_record(small_dir, tmp_path):
    """JSONL lines end at "\\n" only; U+0085, U+2028 and U+2029 may stand unescaped inside a JSON string."""
    texts = ["mojibake \u0085 here", "a\u2028b\u2029c", "plain"]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\r\n" for t in texts), encoding="utf-8")
    report = D.DataReport(str(path))
    assert D.read_documents(str(path), report) == texts and report.records == 3
