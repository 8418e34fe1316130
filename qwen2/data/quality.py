"""`qwen2 data filter`: quality filtering as the Qwen2 report does it, heuristic rules and model scores.

The verb is a datatrove pipeline of two steps between the shared reader and writer (qwen2/data/shards.py):

    QualityAnnotator   every document gets metadata "quality": the heuristics' measured values
                       (quality_heuristics.py), and with a model its perplexity and with a
                       classifier its score (quality_model.py), kept or not, so a threshold can be
                       chosen afterwards from the output and the removed records;
    QualityFilter      the rules in order, each a datatrove filter or a limit on those values; the
                       first that fails drops the document with its reason (stats.json counts them,
                       --removed keeps them).

One filter step for all rules, not one per rule: the removed records go to one exclusion writer,
and datatrove's C4 filter, which rewrites the text it keeps, sees a copy.

`train_classifier` makes the classifier `--classifier DIR` reads: logistic regression on a small
Qwen2's mean hidden states of good (POS) and bad (NEG) documents.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterator, Sequence

from ..errors import Qwen2Error
from . import quality_heuristics as heuristics
from .quality_model import CLASSIFIER_KIND, Classifier, ScoringModel, fit_classifier, load_classifier, score_texts
from .shards import RunOptions


def _pipeline_step():
    from datatrove.pipeline.base import PipelineStep

    return PipelineStep


def _base_filter():
    from datatrove.pipeline.filters.base_filter import BaseFilter

    return BaseFilter


class QualityAnnotator(_pipeline_step()):
    """Adds metadata["quality"] to every document: the measured values of the heuristic `rules`; with
    `scorer`, "tokens" (scored), "nll" (mean per token, nats) and "perplexity"; with `classifier` (a
    directory), "classifier_score", P(good). Documents go through the model `batch_size` at a time;
    the model and classifier load on the first batch, in the process that runs the step."""

    name = "quality"
    type = "📊 - ANNOTATOR"

    def __init__(self, rules: Sequence[str] = (), scorer: ScoringModel | None = None, classifier: str | None = None,
                 batch_size: int = 32):
        super().__init__()
        if classifier is not None and scorer is None:
            raise Qwen2Error("a classifier scores a model's hidden states: give the model too")
        self.rules = tuple(rules)
        self.scorer = scorer
        self.classifier = classifier
        self.batch_size = batch_size

    def run(self, data, rank: int = 0, world_size: int = 1):
        from datatrove.utils.batching import batched

        for batch in batched(data, self.batch_size):
            with self.track_time("batch"):
                self.annotate(batch)
            for doc in batch:
                self.stat_update("documents")
                yield doc

    def annotate(self, docs: list) -> None:
        values = [heuristics.measure(doc.text, self.rules) for doc in docs]
        if self.scorer is not None:
            scored = score_texts(self.scorer, [doc.text for doc in docs])
            for v, s in zip(values, scored):
                v.update(tokens=s.tokens, nll=_round(s.nll), perplexity=_round(s.perplexity))
            if self.classifier is not None:
                import torch

                scores = load_classifier(self.classifier).score(torch.stack([s.hidden for s in scored]))
                for v, p in zip(values, scores.tolist()):
                    v["classifier_score"] = round(p, 6)
        for doc, v in zip(docs, values):  # scores an earlier run added stay unless measured again
            earlier = doc.metadata.get("quality")
            doc.metadata["quality"] = {**earlier, **v} if isinstance(earlier, dict) else v


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


class QualityFilter(_base_filter()):
    """The quality rules as one datatrove filter: each of `checks` (datatrove filters, or
    `quality_heuristics.Limit`s on the annotated values) sees the document in turn; the first that
    fails drops it with its reason."""

    name = "quality filter"

    def __init__(self, checks: Sequence, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.checks = list(checks)

    def filter(self, doc) -> bool | tuple[bool, str]:
        from datatrove.data import Document

        probe = Document(text=doc.text, id=doc.id, metadata=doc.metadata)  # C4 rewrites the text it keeps
        for check in self.checks:
            result = check.filter(probe)
            if result is True:
                continue
            if isinstance(result, tuple) and not result[0]:
                return False, result[1]
            if not result:
                return False, type(check).__name__
        return True


@dataclasses.dataclass
class FilterSettings:
    """What `qwen2 data filter` keeps: the heuristic `rules` (quality_heuristics.parse_heuristics
    names); with `scorer`, perplexity at most `max_perplexity`; with `classifier` (a directory),
    a score at least `min_score`. A model or classifier without a threshold only annotates."""
    rules: tuple[str, ...] = heuristics.PRESETS["default"]
    scorer: ScoringModel | None = None
    classifier: str | None = None
    max_perplexity: float | None = None
    min_score: float | None = None
    batch_size: int = 32

    def __post_init__(self):
        if self.classifier is not None:  # worker processes may start elsewhere
            self.classifier = os.path.abspath(self.classifier)
        if self.max_perplexity is not None:
            if self.scorer is None:
                raise Qwen2Error("--max-perplexity needs --model: the model whose perplexity is measured")
            if not math.isfinite(self.max_perplexity) or self.max_perplexity <= 1:
                raise Qwen2Error(f"--max-perplexity must be a number above 1, got {self.max_perplexity}")
        if self.min_score is not None:
            if self.classifier is None:
                raise Qwen2Error("--min-score needs --classifier DIR (train one with `qwen2 data train-classifier`)")
            if not 0 <= self.min_score <= 1:
                raise Qwen2Error(f"--min-score is a probability, between 0 and 1; got {self.min_score}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise Qwen2Error(f"--batch-size must be an integer >= 1, got {self.batch_size!r}")

    def checks(self) -> list:
        checks = heuristics.filters(self.rules)
        if self.max_perplexity is not None:
            checks.append(heuristics.Limit("perplexity", (("perplexity", ">", self.max_perplexity),)))
        if self.min_score is not None:
            checks.append(heuristics.Limit("classifier_score", (("classifier_score", "<", self.min_score),)))
        return checks


def resolve_models(model: str | None, classifier: str | None, quantize: str | None = None,
                   dtype: str = "float32", max_tokens: int | None = None) -> ScoringModel | None:
    """The ScoringModel the flags name, checked now (one line) rather than in a worker: `model`, or
    the classifier's own (its config names the model its hidden states came from; another model's
    would not fit it)."""
    if classifier is not None:
        trained = Classifier.load(classifier).scoring_model()
        if model is not None and ScoringModel(model).source != trained.source:
            raise Qwen2Error(f"{classifier} was trained on {trained.source}'s hidden states; score with that "
                             "model (leave out --model)")
        spec = dataclasses.replace(trained, quantize=quantize if quantize is not None else trained.quantize,
                                   max_tokens=trained.max_tokens if max_tokens is None else max_tokens)
    elif model is not None:
        spec = ScoringModel(model, quantize, dtype, 512 if max_tokens is None else max_tokens)
    else:
        return None
    spec.check()
    return spec


def filter_shards(inputs: Sequence[str], out_dir: str, settings: FilterSettings | None = None,
                  options: RunOptions = RunOptions()) -> dict:
    """Annotate and filter the shards `inputs` into `out_dir` (see the module docstring; default
    settings: the default heuristics, no model); the stats."""
    from .shards import removed_writer, run

    settings = FilterSettings() if settings is None else settings
    steps = [QualityAnnotator(settings.rules, settings.scorer, settings.classifier, settings.batch_size),
             QualityFilter(settings.checks(), removed_writer(out_dir) if options.removed else None)]
    return run(steps, inputs, out_dir, options, verb="filter")


# ---- training the classifier ----------------------------------------------------------------------

def read_texts(inputs: Sequence[str], limit: int | None = None, skip_bad: bool = False) -> Iterator[str]:
    """The texts of the records in shards `inputs` (files or directories), in order, at most `limit`."""
    from .shards import RecordReader, shard_paths

    reader = RecordReader(shard_paths(inputs), skip_bad=skip_bad)
    for n, doc in enumerate(reader.run()):
        if limit is not None and n >= limit:
            return
        yield doc.text


def hidden_states(spec: ScoringModel, texts: Iterator[str], batch_size: int = 32, progress: bool = False):
    """The mean last hidden states (N, C) of `texts`, `batch_size` documents a forward batch (no logits:
    the classifier reads only these)."""
    import torch

    from ..progress import progress_bar

    rows = []
    batch: list[str] = []
    with progress_bar(unit="doc", desc="hidden states", disable=not progress) as bar:
        for text in texts:
            batch.append(text)
            if len(batch) == batch_size:
                rows += [s.hidden for s in score_texts(spec, batch, likelihood=False)]
                bar.update(len(batch))
                batch = []
        if batch:
            rows += [s.hidden for s in score_texts(spec, batch, likelihood=False)]
            bar.update(len(batch))
    if not rows:
        return torch.zeros(0, spec.load().config.hidden_size)
    return torch.stack(rows)


def train_classifier(good: Sequence[str], bad: Sequence[str], spec: ScoringModel, out_dir: str,
                     max_docs: int | None = None, steps: int = 300, lr: float = 0.05, weight_decay: float = 1e-2,
                     seed: int = 0, batch_size: int = 32, skip_bad: bool = False, progress: bool = False) -> dict:
    """Train the classifier on the shards `good` (POS) and `bad` (NEG), at most `max_docs` of each,
    and write it to `out_dir` (see `Classifier.save`; an earlier classifier there is replaced, any other
    directory refused). Returns its config."""
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        Classifier.load(out_dir)  # raises unless it is a classifier
    spec.check()
    pos = hidden_states(spec, read_texts(good, max_docs, skip_bad), batch_size, progress)
    neg = hidden_states(spec, read_texts(bad, max_docs, skip_bad), batch_size, progress)
    classifier, metrics = fit_classifier(pos, neg, steps=steps, lr=lr, weight_decay=weight_decay, seed=seed)
    classifier.config = {"kind": CLASSIFIER_KIND, "model": spec.source, "quantize": spec.quantize,
                         "dtype": spec.dtype, "max_tokens": spec.max_tokens, "hidden_size": pos.shape[1],
                         "positives": len(pos), "negatives": len(neg), "steps": steps, "lr": lr,
                         "weight_decay": weight_decay, "seed": seed, **metrics}
    classifier.save(out_dir)
    return classifier.config
