"""A reward model: the decoder with a scalar head on its last token, trained on preference pairs
with the Bradley-Terry loss, -log sigmoid(r(chosen) - r(rejected)), as InstructGPT and TRL's
RewardTrainer do; what online DPO ranks its samples with (`reward = "model:DIR"`).

Saved as transformers' Qwen2ForSequenceClassification with one label: the decoder's weights
(`model.*`, no lm_head) and `score.weight` (1, C), which `from_pretrained` loads as it is and scores
the same. Like transformers, the reward of a sequence is the head on its last real token.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import Qwen2Error
from ..model import Transformer
from . import data as D
from .forward import forward

ARCHITECTURE = "Qwen2ForSequenceClassification"


class RewardModel(Transformer):
    """The decoder whose output layer is a (C -> 1) `score` head read at each sequence's last real
    token: (B, T) ids -> (B,) rewards."""

    def __init__(self, config):
        super().__init__(config)
        self.lm_head = nn.Identity()  # the decoder's output is then the final normed hidden state
        self.score = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, activation_checkpointing: bool = False) -> torch.Tensor:
        """Right-padded rows: attention_mask or document_ids (PAD_DOCUMENT) mark the real tokens."""
        hidden = super().forward(input_ids, attention_mask=attention_mask, document_ids=document_ids,
                                 activation_checkpointing=activation_checkpointing)  # (B, T, C)
        if attention_mask is not None:
            real = attention_mask.bool()
        elif document_ids is not None:
            real = document_ids != D.PAD_DOCUMENT
        else:
            real = torch.ones_like(input_ids, dtype=torch.bool)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (positions * real).argmax(dim=-1)  # (B,) the last real token, as transformers finds it
        return self.score(hidden[torch.arange(len(last), device=last.device), last]).squeeze(-1)  # (B,)


def from_language_model(lm: Transformer, seed: int = 0, std: float = 0.02) -> RewardModel:
    """A reward model with `lm`'s decoder and a fresh N(0, std) head (transformers' initialisation),
    drawn from `seed`."""
    model = RewardModel(lm.config)
    decoder = {k: v for k, v in lm.state_dict().items() if not k.startswith("lm_head.")}
    missing, unexpected = model.load_state_dict(decoder, strict=False)
    if unexpected or set(missing) != {"score.weight"}:
        raise Qwen2Error(f"cannot make a reward model of this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=torch.Generator().manual_seed(seed)) * std)
    return model.to(lm.device)


def is_reward_dir(path: str | os.PathLike) -> bool:
    import json

    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config, encoding="utf-8") as f:
        return ARCHITECTURE in (json.load(f).get("architectures") or [])


def save_reward_model(path: str, model: RewardModel, tokenizer, overwrite: bool = False) -> None:
    """An HF directory of Qwen2ForSequenceClassification (one label) holding `model`."""
    from ..checkpoint.hf import write_hf_dir

    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        raise Qwen2Error("a reward model needs a padding token (transformers finds each row's last token by it)")
    hf_config = model.config.to_hf_dict() | {"architectures": [ARCHITECTURE], "id2label": {"0": "LABEL_0"},
                                             "label2id": {"LABEL_0": 0}, "pad_token_id": pad}
    write_hf_dir(path, hf_config, {k: v.detach() for k, v in model.state_dict().items()}, tokenizer, overwrite=overwrite)


def load_reward_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(RewardModel, tokenizer) of a directory `save_reward_model` (or transformers) wrote."""
    from ..checkpoint.hf import load_hf_dir

    path = os.fspath(path)
    if not is_reward_dir(path):
        raise Qwen2Error(f"{path} is not a reward model (its config.json names no {ARCHITECTURE}); "
                         "train one with qwen2 train reward")
    config, state_dict, tokenizer, _ = load_hf_dir(path)
    model = RewardModel(config)
    if set(state_dict) != set(model.state_dict()):
        missing = sorted(set(model.state_dict()) - set(state_dict))
        raise Qwen2Error(f"{path} does not hold a reward model's weights (missing {missing[:3]}); "
                         "it needs the decoder and a score head of shape (1, hidden_size)")
    if state_dict["score.weight"].shape != model.score.weight.shape:
        raise Qwen2Error(f"{path}: score.weight has shape {tuple(state_dict['score.weight'].shape)}; a reward "
                         f"model has one label, (1, {config.hidden_size})")
    model.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return model.to(device).eval(), tokenizer


class PairwiseReward:
    """The Bradley-Terry objective on preference batches (each micro-batch: B chosen rows, then
    their B rejected rows): the summed -log sigmoid(r_chosen - r_rejected); logs the pair accuracy
    (chosen scored higher) and the mean margin."""

    def __init__(self, activation_checkpointing: bool):
        self.activation_checkpointing = activation_checkpointing

    def count(self, batch) -> int:
        return batch.rows.input_ids.shape[0] // 2

    def tokens(self, batch) -> int:
        return batch.rows.num_tokens

    def loss(self, model, batch):
        rewards = forward(model, batch.rows.input_ids, batch.rows.doc_ids, self.activation_checkpointing).float()
        chosen, rejected = rewards.chunk(2)  # (B,), (B,)
        margin = chosen - rejected
        return -F.logsigmoid(margin).sum(), {"accuracy": float((margin > 0).sum()), "margin": float(margin.detach().sum())}


def score_replies(model: RewardModel, tokenizer, conversations: list[list[dict]], batch: int = 8) -> list[float]:
    """The reward of each conversation (its last turn the reply), rendered with the chat template."""
    rewards = []
    with torch.no_grad():
        for start in range(0, len(conversations), batch):
            rows = [D.Row(ids := tokenizer.encode(tokenizer.apply_chat_template(c)), ids, [0] * len(ids))
                    for c in conversations[start:start + batch]]
            b = D.collate(rows, tokenizer.pad_token_id).to(model.score.weight.device)
            rewards += model(b.input_ids, document_ids=b.doc_ids).float().tolist()
    return rewards


class TrainedReward:
    """Online DPO's reward from a reward model: the score of the task's prompt with the response as
    the assistant's reply."""

    def __init__(self, model: RewardModel, tokenizer):
        self.model, self.tokenizer = model.requires_grad_(False), tokenizer

    def __call__(self, task, response: str) -> float:
        return score_replies(self.model, self.tokenizer, [task.messages + [{"role": "assistant", "content": response}]])[0]
