"""Distributed training (qwen2/train/distributed.py): a 2-process torchrun (gloo) run logs the same
loss curve as 1 process with the same global batch, under DDP and under FSDP2; an FSDP2 run killed
mid-way resumes from its gathered checkpoint onto the same curve and exports the same model."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import qwen2
from qwen2.cli import main
from qwen2.tokenizer import Tokenizer

from ggufs import save_random_model_dir, small_tokenizer_metadata
from test_train import CHATS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random model with the small byte-level tokenizer, chat data, and the shared options:
    per step 2 micro-batches of a global batch of 2 rows (1 process x 2 rows, or 2 x 1)."""
    root = tmp_path_factory.mktemp("dist")
    tokenizer = Tokenizer.from_gguf_metadata(small_tokenizer_metadata())
    save_random_model_dir(root / "model", tokenizer)
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    (root / "train.toml").write_text(f'model = "{root / "model"}"\ndata = "{root / "chat.jsonl"}"\ngrad_accum = 2\n'
                                     "max_steps = 4\nlr = 1e-2\nmin_lr = 1e-3\nseq_len = 128\nsave_every = 2\n")
    one = str(root / "one")
    assert main(["train", "sft", "-c", str(root / "train.toml"), f"output_dir={one}", "batch_size=2"]) == 0
    return root, one


def torchrun(args, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    env.pop("QWEN2_PROGRESS", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "qwen2.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def curve(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "log.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def assert_same_curve(theirs, ours):
    assert [r["step"] for r in theirs] == [r["step"] for r in ours] == [1, 2, 3, 4]
    for a, b in zip(theirs, ours):
        assert a["tokens"] == b["tokens"] and a["lr"] == b["lr"]  # the same rows, the same schedule
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5
    assert ours[-1]["loss"] < ours[0]["loss"] - 1  # it trains


def assert_same_model(dir_a, dir_b):
    a, b = qwen2.load(dir_a, progress=False).model, qwen2.load(dir_b, progress=False).model
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-5), name


def test_ddp_two_processes_follow_the_one_process_curve(setup):
    root, one = setup
    out = str(root / "ddp")
    run = torchrun(["train", "sft", "-c", str(root / "train.toml"), f"output_dir={out}", "batch_size=1",
                    "distributed=ddp"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("done: step 4") == 1  # rank 0 alone reports
    assert_same_curve(curve(one), curve(out))
    assert_same_model(os.path.join(one, "model"), os.path.join(out, "model"))


def test_fsdp2_killed_and_resumed_follows_the_one_process_curve(setup):
    root, one = setup
    out = str(root / "fsdp2")
    args = ["train", "sft", "-c", str(root / "train.toml"), f"output_dir={out}", "batch_size=1", "distributed=fsdp2"]
    crash = torchrun(args, {"QWEN2_TRAIN_KILL_AFTER_STEP": "3"})
    assert crash.returncode != 0
    assert os.listdir(os.path.join(out, "checkpoints")) == ["step-00000002"]  # gathered and written by rank 0
    assert [r["step"] for r in curve(out)] == [1, 2, 3]
    resumed = torchrun(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_same_curve(curve(one), curve(out))
    assert_same_model(os.path.join(one, "model"), os.path.join(out, "model"))


def test_many_processes_need_a_distributed_mode(setup):
    root, _ = setup
    run = torchrun(["train", "sft", "-c", str(root / "train.toml"), f"output_dir={root / 'none'}", "batch_size=1"])
    assert run.returncode != 0
    assert "error: launched as 2 processes but distributed is \"none\"; set distributed=ddp" in run.stderr
