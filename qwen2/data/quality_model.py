"""Model-based quality scores, the Qwen2 report's "use of Qwen models to filter out low-quality data":

- perplexity: each document's mean negative log-likelihood per token under a small Qwen2 model
  (the first `max_tokens` tokens; exp of it is the perplexity);
- a classifier: logistic regression on the same model's mean last hidden state, trained on
  documents the user labels good (POS) and bad (NEG), scoring P(good).

One forward gives both. Documents are packed, several to a row of `max_tokens`, attention and RoPE
positions confined to each (the training forward's `document_ids`), so a short document costs its own
tokens and not a padded row, and gets the logits it would get alone.

A `ScoringModel` names a model and how to run it; the weights load on first use, once per process
(pipeline steps are pickled to their worker processes, which must not receive a loaded model).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import Qwen2Error

CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_CONFIG = "config.json"
CLASSIFIER_KIND = "qwen2-quality-classifier"


@dataclasses.dataclass(frozen=True)
class ScoringModel:
    """A model to score with: `source` as `qwen2.load` takes it, `quantize` (None, "int8", "int4",
    "int4-pure"), `dtype`; each document's first `max_tokens` tokens are scored, rows of packed
    documents go through the model `batch_tokens` tokens at a time."""
    source: str
    quantize: str | None = None
    dtype: str = "float32"
    max_tokens: int = 512
    batch_tokens: int = 4096

    def __post_init__(self):
        if os.path.exists(self.source):  # workers, and a classifier's config, may be elsewhere
            object.__setattr__(self, "source", os.path.abspath(self.source))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 2:
            raise Qwen2Error(f"max_tokens must be an integer >= 2, got {self.max_tokens!r}")
        if not isinstance(self.batch_tokens, int) or self.batch_tokens < self.max_tokens:
            raise Qwen2Error(f"batch_tokens ({self.batch_tokens}) must be at least max_tokens ({self.max_tokens})")

    def check(self) -> None:
        """Fail now, in one line, on bad load options or a model that cannot be found (workers load it later)."""
        from ..checkpoint import KNOWN_MODELS, resolve
        from ..options import LoadOptions

        LoadOptions(dtype=self.dtype, quantize=self.quantize)
        if self.source.lower() not in KNOWN_MODELS and not os.path.exists(self.source):
            resolve(self.source)  # raises the loader's own message

    def load(self):
        """The loaded model (a `qwen2.Qwen2`), once per process."""
        key = (self.source, self.quantize, self.dtype)
        if key not in _LOADED:
            from ..api import load

            model = load(self.source, quantize=self.quantize, dtype=self.dtype, executor="eager", progress=False)
            if model.tokenizer is None:
                raise Qwen2Error(f"{self.source} has no tokenizer; scoring text needs one")
            model.model.eval()
            _LOADED[key] = model
        return _LOADED[key]


_LOADED: dict = {}  # (source, quantize, dtype) -> Qwen2, in this process


@dataclasses.dataclass
class Scored:
    """One document's scores: `tokens` scored, `nll` the mean negative log-likelihood (nats) of tokens
    2..n given those before (None for a one-token document), `hidden` the mean last hidden state."""
    tokens: int
    nll: float | None
    hidden: torch.Tensor

    @property
    def perplexity(self) -> float | None:
        return None if self.nll is None else math.exp(self.nll)


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of document indices whose lengths sum to at most `capacity` each: first fit, longest
    first (few rows, little padding)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, left in enumerate(room):
            if lengths[i] <= left:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def final_hidden(model, ids: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """The normed last hidden states (B, T, C) of packed rows: the Transformer's forward without the
    lm_head, so the logits can be made a row at a time (a row's are T x 151,936 floats)."""
    inputs = model.prepare(ids, document_ids=doc_ids)
    x = inputs.x
    for i, block in enumerate(model.model.layers):
        x = block(x, inputs.cos, inputs.sin, inputs.masks[i], inputs.cache, i)
    return model.model.norm(x)


@torch.no_grad()
def score_ids(model, documents: Sequence[Sequence[int]], max_tokens: int, batch_tokens: int,
              likelihood: bool = True) -> list[Scored]:
    """Scores of token-id documents under `model` (a Transformer), each truncated to `max_tokens`.
    likelihood=False gives the hidden states alone (`nll` None): no logits are made, and those are
    most of the work for a small model (151,936 of them per token)."""
    documents = [list(d)[:max_tokens] for d in documents]
    if any(not d for d in documents):
        raise Qwen2Error("cannot score an empty document (no tokens)")
    rows = pack([len(d) for d in documents], max_tokens)
    out: list[Scored | None] = [None] * len(documents)
    per_forward = max(1, batch_tokens // max_tokens)
    for start in range(0, len(rows), per_forward):
        group = rows[start:start + per_forward]
        width = max(sum(len(documents[i]) for i in row) for row in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        doc_ids = torch.full((len(group), width), -1, dtype=torch.long)  # padding: a document of its own
        spans: list[list[tuple[int, int, int]]] = []  # per row: (document, begin, end)
        for r, row in enumerate(group):
            spans.append([])
            at = 0
            for i in row:
                n = len(documents[i])
                ids[r, at:at + n] = torch.tensor(documents[i])
                doc_ids[r, at:at + n] = i
                spans[r].append((i, at, at + n))
                at += n
        ids = ids.to(model.device)
        hidden = final_hidden(model, ids, doc_ids.to(model.device))
        for r, row_spans in enumerate(spans):
            if likelihood:
                logits = model.lm_head(hidden[r, :row_spans[-1][2]]).float()  # (T, V): position t predicts t + 1
            for i, a, b in row_spans:
                nll = F.cross_entropy(logits[a:b - 1], ids[r, a + 1:b]).item() if likelihood and b - a > 1 else None
                out[i] = Scored(b - a, nll, hidden[r, a:b].float().mean(0).cpu())
    return out


def score_texts(spec: ScoringModel, texts: Sequence[str], likelihood: bool = True) -> list[Scored]:
    """`score_ids` of texts, tokenized by the model's tokenizer; at most the model's positions a document."""
    loaded = spec.load()
    max_tokens = min(spec.max_tokens, loaded.config.max_position_embeddings)
    return score_ids(loaded.model, [loaded.tokenizer.encode(t) for t in texts], max_tokens, spec.batch_tokens,
                     likelihood)


# ---- the classifier -------------------------------------------------------------------------------

@dataclasses.dataclass
class Classifier:
    """Logistic regression on standardised mean hidden states: P(good) = sigmoid(w . (h - mean) / std + b).
    `config` says which model's hidden states it reads, and how it was trained."""
    weight: torch.Tensor  # (C,)
    bias: torch.Tensor  # ()
    mean: torch.Tensor  # (C,)
    std: torch.Tensor  # (C,)
    config: dict

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return ((hidden.float() - self.mean) / self.std) @ self.weight + self.bias

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        """P(good) of each row of `hidden` (N, C)."""
        return torch.sigmoid(self.logits(hidden))

    def scoring_model(self) -> ScoringModel:
        c = self.config
        return ScoringModel(c["model"], c.get("quantize"), c.get("dtype", "float32"), c["max_tokens"])

    def save(self, out_dir: str) -> None:
        """classifier.safetensors (the tensors) and config.json, no pickle; the directory appears
        only when complete."""
        from safetensors.torch import save_file

        from ..fileio import atomic_dir

        tensors = {"weight": self.weight.contiguous(), "bias": self.bias.reshape(1).contiguous(),
                   "mean": self.mean.contiguous(), "std": self.std.contiguous()}
        with atomic_dir(out_dir) as tmp:
            save_file(tensors, os.path.join(tmp, CLASSIFIER_WEIGHTS))
            with open(os.path.join(tmp, CLASSIFIER_CONFIG), "w", encoding="utf-8") as f:
                f.write(json.dumps(self.config, indent=1) + "\n")

    @classmethod
    def load(cls, path: str) -> "Classifier":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        config_path, weights_path = os.path.join(path, CLASSIFIER_CONFIG), os.path.join(path, CLASSIFIER_WEIGHTS)
        if not os.path.isfile(config_path) or not os.path.isfile(weights_path):
            raise Qwen2Error(f"{path}: not a quality classifier (no {CLASSIFIER_CONFIG} and {CLASSIFIER_WEIGHTS}); "
                             "make one with `qwen2 data train-classifier`")
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
            tensors = load_file(weights_path)
        except (json.JSONDecodeError, SafetensorError, OSError) as e:
            raise Qwen2Error(f"{path}: unreadable classifier: {e}") from None
        if not isinstance(config, dict) or config.get("kind") != CLASSIFIER_KIND or \
                set(tensors) != {"weight", "bias", "mean", "std"}:
            raise Qwen2Error(f"{path}: not a quality classifier ({CLASSIFIER_CONFIG} kind is not {CLASSIFIER_KIND!r})")
        return cls(tensors["weight"], tensors["bias"][0], tensors["mean"], tensors["std"], config)


_CLASSIFIERS: dict = {}  # path -> Classifier, in this process


def load_classifier(path: str) -> Classifier:
    """`Classifier.load`, once per process."""
    if path not in _CLASSIFIERS:
        _CLASSIFIERS[path] = Classifier.load(path)
    return _CLASSIFIERS[path]


def fit_classifier(good: torch.Tensor, bad: torch.Tensor, steps: int = 300, lr: float = 0.05,
                   weight_decay: float = 1e-2, seed: int = 0) -> tuple[Classifier, dict]:
    """Logistic regression of good (N, C) against bad (M, C) hidden states: features standardised on
    the training set, both classes weighing half of the loss (a 1:10 imbalance would otherwise
    teach "always good"), L2-regularised (hidden sizes exceed the examples), full-batch Adam for
    `steps` steps from a seeded start. Returns the classifier (config without the model fields) and
    its training metrics."""
    if len(good) == 0 or len(bad) == 0:
        raise Qwen2Error(f"training a classifier needs good and bad documents, got {len(good)} good and {len(bad)} bad")
    x = torch.cat([good, bad]).float()
    y = torch.cat([torch.ones(len(good)), torch.zeros(len(bad))])
    mean, std = x.mean(0), x.std(0, correction=0).clamp_min(1e-6)
    z = (x - mean) / std
    sample_weight = torch.where(y > 0, 0.5 / len(good), 0.5 / len(bad))
    gen = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(x.shape[1], generator=gen)).requires_grad_()
    bias = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(z @ weight + bias, y, reduction="none") * sample_weight).sum()
        (loss + weight_decay * weight.square().sum()).backward()
        optimizer.step()
    classifier = Classifier(weight.detach(), bias.detach(), mean, std, {})
    with torch.no_grad():
        scores = classifier.score(x)
    metrics = {"train_loss": round(loss.item(), 4),
               "train_accuracy": round(((scores > 0.5).float() == y).float().mean().item(), 4),
               "train_auc": round(roc_auc(scores.tolist(), y.tolist()), 4)}
    return classifier, metrics


# ---- ROC ------------------------------------------------------------------------------------------

def roc_auc(scores: Sequence[float], labels: Sequence[int | bool]) -> float:
    """The area under the ROC curve of `scores` for the positive `labels`: the probability that a
    random positive scores above a random negative, ties counting half (Mann-Whitney U)."""
    pairs = sorted(zip(scores, labels), key=lambda p: p[0])
    positives = sum(1 for _, y in pairs if y)
    negatives = len(pairs) - positives
    if not positives or not negatives:
        raise Qwen2Error("ROC AUC needs both positive and negative examples")
    rank_sum, i = 0.0, 0
    while i < len(pairs):  # average ranks over ties
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        rank = (i + 1 + j) / 2
        rank_sum += rank * sum(1 for _, y in pairs[i:j] if y)
        i = j
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def roc_curve(scores: Sequence[float], labels: Sequence[int | bool]) -> tuple[list[float], list[float], list[float]]:
    """(false positive rates, true positive rates, thresholds): a point for each distinct score, from
    the highest down; predicting positive at score >= threshold."""
    pairs = sorted(zip(scores, labels), key=lambda p: -p[0])
    positives = sum(1 for _, y in pairs if y)
    negatives = len(pairs) - positives
    fpr, tpr, thresholds = [0.0], [0.0], [math.inf]
    tp = fp = 0
    for k, (score, y) in enumerate(pairs):
        tp += bool(y)
        fp += not y
        if k + 1 == len(pairs) or pairs[k + 1][0] != score:
            fpr.append(fp / max(1, negatives))
            tpr.append(tp / max(1, positives))
            thresholds.append(score)
    return fpr, tpr, thresholds
