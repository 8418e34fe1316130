"""`qwen2 data pipeline CONFIG.yaml`: the data verbs as one run over a corpus, from a config file.

    input: corpus/                  # shards or directories of them (a list is fine too)
    output: clean/
    steps:                          # in order; each with the options its verb takes, flags without "--"
      - dedup: {near: 0.8}
      - filter: {heuristics: default}
      - langid: {keep: [en, zh, de, fr]}
      - decontaminate: {against: [humaneval]}

Each step is its verb's own function (dedup.dedup, quality.filter_shards, langid.langid,
decontaminate.decontaminate), reading the previous step's output and writing OUTPUT/NN-verb/, a
directory of shards as that verb writes it. So a pipeline is exactly the verbs run one after another
by hand, and:

- a killed run resumes: a step whose stats.json exists is done and skipped; the step that was
  running resumes at the stage and shard where it stopped, as its verb does. A step whose settings
  changed since (or that follows one not yet done) is refused with the directory to delete;
- the last step's directory is the output (stats.json names it). The steps' directories stay apart,
  rather than the output's shards being written into OUTPUT itself, because readers take a
  directory's shards recursively: OUTPUT/NN-last is the directory to hand on;
- OUTPUT/stats.json, written when every step has finished, holds each step's stats and the totals:
  documents and bytes in (the first step's) and out (the last's), removed documents by reason;
- where it runs is not in the config: `--executor local --workers N` (processes, the default) or
  `--executor ray --address HOST:PORT`, the same config either way.

Every setting is checked before anything runs or is written, each problem a one-line error naming
the config file and the step: a typo in the fourth step is not found after an hour of dedup.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import shutil
import time
from typing import Callable, Sequence

from ..errors import Qwen2Error
from ..fileio import atomic_file, write_text_atomic

PIPELINE_STATE = ".pipeline"  # OUTPUT/.pipeline: the run's record (inputs, steps) and removed records


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a step, as a YAML key: the verb function's `keyword`, the `kind` of value it
    takes ("number", "integer", "flag", "text", "names": a list or a comma-separated string,
    "paths": a list or one string, "shares": {code: weight} or "en=0.5,zh=0.3", or a tuple of the
    allowed strings), and for numbers the least (`low`) and greatest (`high`) value."""
    keyword: str
    kind: str | tuple[str, ...]
    low: float | None = None
    high: float | None = None

    def convert(self, value):
        """`value` as the verb function takes it; ValueError saying what was expected."""
        kind = self.kind
        if value is None:
            return None  # the verb's default
        if isinstance(kind, tuple):
            if value not in kind:
                raise ValueError(f"one of {', '.join(kind)}")
            return value
        if kind in ("number", "integer"):
            wanted = "an integer" if kind == "integer" else "a number"
            if isinstance(value, bool) or not isinstance(value, int if kind == "integer" else (int, float)) \
                    or not math.isfinite(value):
                raise ValueError(wanted + self._range())
            if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
                raise ValueError(wanted + self._range())
            return float(value) if kind == "number" else value
        if kind == "flag":
            if not isinstance(value, bool):
                raise ValueError("true or false")
            return value
        if kind == "text":
            if not isinstance(value, str) or not value:
                raise ValueError("a string")
            return value
        if kind in ("names", "paths"):
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not items or not all(isinstance(v, str) and v for v in items):
                raise ValueError("a list of strings" + (" or a comma-separated string" if kind == "names" else ""))
            return ",".join(items) if kind == "names" else items
        if kind == "shares":
            if isinstance(value, dict):
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()):
                    raise ValueError("language: weight pairs such as {en: 0.5, zh: 0.3, other: 0.2}")
                return ",".join(f"{code}={weight}" for code, weight in value.items())
            if not isinstance(value, str):
                raise ValueError("language: weight pairs such as {en: 0.5, zh: 0.3, other: 0.2}")
            return value
        raise AssertionError(kind)

    def _range(self) -> str:
        if self.low is not None and self.high is not None:
            return f" from {self.low:g} to {self.high:g}"
        return f" >= {self.low:g}" if self.low is not None else ""


Runner = Callable[[Sequence[str], str, "object"], dict]  # (inputs, out_dir, RunOptions) -> stats


@dataclasses.dataclass(frozen=True)
class StepKind:
    """A verb a pipeline can run: its options (YAML keys, each the verb's command-line flag without
    "--") and `plan`, which checks the converted settings and returns the run (inputs, out, options)."""
    options: dict[str, Option]
    plan: Callable[..., Runner]


def filter_settings(heuristics: str = "default", model: str | None = None, quantize: str | None = None,
                    dtype: str = "float32", max_tokens: int | None = None, batch_size: int = 32,
                    max_perplexity: float | None = None, classifier: str | None = None,
                    min_score: float | None = None):
    """The `quality.FilterSettings` of `qwen2 data filter`'s options (the command line and a pipeline's
    filter step both make them here): the heuristic rules by name, and the scoring model checked now
    (one line) rather than in a worker."""
    from .quality import FilterSettings, resolve_models
    from .quality_heuristics import parse_heuristics

    return FilterSettings(parse_heuristics(heuristics), resolve_models(model, classifier, quantize, dtype, max_tokens),
                          classifier, max_perplexity, min_score, batch_size)


def _plan_dedup(near: float | None = None) -> Runner:
    from .dedup import DEFAULT_NEAR, dedup

    return lambda inputs, out, options: dedup(inputs, out, near=DEFAULT_NEAR if near is None else near,
                                              options=options)


def _plan_filter(**settings) -> Runner:
    from .quality import filter_shards

    checked = filter_settings(**{k: v for k, v in settings.items() if v is not None})
    return lambda inputs, out, options: filter_shards(inputs, out, checked, options)


def _plan_langid(languages=None, keep=None, balance=None, balance_by=None, seed=None) -> Runner:
    from .langid import check_codes, langid, parse_codes, parse_shares, resolve_languages

    # what langid() checks when it starts, checked before the first step runs
    detected = resolve_languages(languages)
    kept = None if keep is None else parse_codes(keep)
    if kept is not None:
        check_codes(kept, set(detected), "the detection set holds; add them to languages")
    if balance is not None:
        parse_shares(balance, kept or detected)
    return lambda inputs, out, options: langid(inputs, out, languages=languages, keep=keep, balance=balance,
                                               by=balance_by or "bytes", seed=seed or 0, options=options)


def _plan_decontaminate(against=None, ngram=None, min_matches=None, mark_only=None) -> Runner:
    from .decontaminate import BUILT_IN, NGRAM, build_index, decontaminate

    against = list(BUILT_IN) if against is None else against
    ngram = NGRAM if ngram is None else ngram
    build_index(against, ngram)  # the sets and files exist and give n-grams
    return lambda inputs, out, options: decontaminate(inputs, out, against=against, n=ngram,
                                                      min_matches=min_matches or 1, mark_only=bool(mark_only),
                                                      options=options)


QUANTIZE = ("int8", "int4", "int4-pure")
STEPS: dict[str, StepKind] = {
    "dedup": StepKind({"near": Option("near", "number", 0, 1)}, _plan_dedup),
    "filter": StepKind({"heuristics": Option("heuristics", "names"), "model": Option("model", "text"),
                        "quantize": Option("quantize", QUANTIZE), "dtype": Option("dtype", "text"),
                        "max-tokens": Option("max_tokens", "integer", 2),
                        "batch-size": Option("batch_size", "integer", 1),
                        "max-perplexity": Option("max_perplexity", "number"),
                        "classifier": Option("classifier", "text"), "min-score": Option("min_score", "number", 0, 1)},
                       _plan_filter),
    "langid": StepKind({"languages": Option("languages", "names"), "keep": Option("keep", "names"),
                        "balance": Option("balance", "shares"),
                        "balance-by": Option("balance_by", ("bytes", "documents")),
                        "seed": Option("seed", "integer")}, _plan_langid),
    "decontaminate": StepKind({"against": Option("against", "paths"), "ngram": Option("ngram", "integer", 1),
                               "min-matches": Option("min_matches", "integer", 1),
                               "mark-only": Option("mark_only", "flag")}, _plan_decontaminate),
}


@dataclasses.dataclass
class Step:
    """A step of a config: the verb `name`, its `settings` (YAML keys as written in the config's
    canonical spelling, values converted: what the resume check compares) and its checked `run`."""
    name: str
    settings: dict
    run: Runner


@dataclasses.dataclass
class PipelineConfig:
    path: str
    inputs: list[str]
    output: str
    steps: list[Step]

    def step_dir(self, index: int) -> str:
        """OUTPUT/NN-verb of the step at `index` (from 0)."""
        return os.path.join(os.path.abspath(self.output), f"{index + 1:02d}-{self.steps[index].name}")


def load_config(path: str) -> PipelineConfig:
    """The pipeline of the YAML file `path`, every step's settings checked (see the module docstring).
    Each problem is a one-line error naming the file, the step and what to fix."""
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise Qwen2Error(f"{path}: the config must be a mapping with input, output and steps, not "
                         f"{type(raw).__name__}")
    unknown = sorted(set(raw) - {"input", "output", "steps"}, key=str)
    if unknown:
        raise Qwen2Error(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; a pipeline config has input, "
                         "output and steps (how it runs is given on the command line: --executor, --workers)")
    for key in ("input", "output", "steps"):
        if key not in raw:
            raise Qwen2Error(f"{path}: no {key!r}; a pipeline config has input (shards or directories), output (a "
                             "directory) and steps (a list such as [dedup, filter])")
    inputs = [raw["input"]] if isinstance(raw["input"], str) else raw["input"]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) and i for i in inputs):
        raise Qwen2Error(f"{path}: input must be a path (file or directory of shards) or a list of them")
    if not isinstance(raw["output"], str) or not raw["output"]:
        raise Qwen2Error(f"{path}: output must be a directory path")
    if not isinstance(raw["steps"], list) or not raw["steps"]:
        raise Qwen2Error(f"{path}: steps must be a list of steps, e.g. [dedup, {{filter: {{heuristics: default}}}}]")
    steps = [_step(path, number, entry) for number, entry in enumerate(raw["steps"], 1)]
    return PipelineConfig(os.path.abspath(path), inputs, raw["output"], steps)


def _read_yaml(path: str):
    try:
        import yaml
    except ImportError:
        raise Qwen2Error(f"reading {path} needs PyYAML: pip install -e '.[data]'") from None
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise Qwen2Error(f"cannot read the pipeline config {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise Qwen2Error(f"{path} is not a UTF-8 text file; a pipeline config is YAML") from None
    except yaml.YAMLError as e:
        raise Qwen2Error(f"{path} is not valid YAML ({' '.join(str(e).split())})") from None


def _step(path: str, number: int, entry) -> Step:
    """One entry of `steps`: a verb name, or {verb: {option: value, ...}}."""
    if isinstance(entry, str):
        name, given = entry, {}
    elif isinstance(entry, dict) and len(entry) == 1:
        [(name, given)] = entry.items()
        given = {} if given is None else given
    else:
        raise Qwen2Error(f"{path}: step {number} must be a verb name or {{verb: {{option: value}}}}, e.g. "
                         f"{{dedup: {{near: 0.8}}}}; got {entry!r}")
    where = f"{path}: step {number} ({name})"
    if name not in STEPS:
        raise Qwen2Error(f"{path}: step {number}: unknown step {name!r}; the steps are {', '.join(STEPS)}")
    if not isinstance(given, dict):
        raise Qwen2Error(f"{where}: its options must be a mapping such as {{option: value}}, not {given!r}")
    kind = STEPS[name]
    settings, keywords = {}, {}
    for key, value in given.items():
        canonical = str(key).replace("_", "-")
        option = kind.options.get(canonical)
        if option is None:
            raise Qwen2Error(f"{where}: unknown option {key!r}; {name} takes {', '.join(kind.options)}")
        try:
            keywords[option.keyword] = option.convert(value)
        except ValueError as e:
            raise Qwen2Error(f"{where}: {canonical} must be {e}, got {value!r}") from None
        settings[canonical] = keywords[option.keyword]
    try:
        run = kind.plan(**keywords)
    except Qwen2Error as e:
        raise Qwen2Error(f"{where}: {e}") from None
    return Step(name, settings, run)


def run_pipeline(config: PipelineConfig, options=None) -> dict:
    """Run the steps of `config` (see the module docstring) with the run options `options` (a
    shards.RunOptions: executor, workers, skip_bad, removed, progress). Returns OUTPUT/stats.json."""
    from . import shards

    options = options or shards.RunOptions()
    if options.executor == "ray":  # before anything is written: a dead address is one line, in seconds
        shards.connect_ray(options.ray_address)
    start = time.perf_counter()
    files = shards.shard_paths(config.inputs)
    out = os.path.abspath(config.output)
    if os.path.isfile(out):
        raise Qwen2Error(f"{out} is a file; a pipeline's output is a directory")
    _check_resume(config, files)
    if os.path.exists(os.path.join(out, "stats.json")):  # an earlier run's: rewritten when this one ends
        os.remove(os.path.join(out, "stats.json"))
    removed_dir = os.path.join(out, PIPELINE_STATE, "removed")
    step_stats, inputs = [], files
    for index, step in enumerate(config.steps):
        step_dir = config.step_dir(index)
        where = f"step {index + 1} ({step.name})"
        removed = os.path.join(removed_dir, os.path.basename(step_dir) + ".jsonl") if options.removed else None
        done = os.path.join(step_dir, "stats.json")
        if os.path.exists(done):
            if removed and not os.path.exists(removed):
                raise Qwen2Error(f"{step_dir} was made without --removed; rerun into another output directory to "
                                 "keep the removed records, or leave out --removed")
            with open(done, encoding="utf-8") as f:
                stats = json.load(f)
        else:
            if index and not glob.glob(os.path.join(inputs[0], "*.jsonl")):
                raise Qwen2Error(f"{where}: step {index} left no records ({inputs[0]} holds no shards)")
            if removed:
                os.makedirs(removed_dir, exist_ok=True)
            try:
                stats = step.run(inputs, step_dir, dataclasses.replace(options, removed=removed))
            except Qwen2Error as e:
                raise Qwen2Error(f"{where}: {e}") from None
        step_stats.append({"step": os.path.basename(step_dir), "settings": step.settings, **stats})
        inputs = [step_dir]
    stats = _totals(config, step_stats, time.perf_counter() - start)
    if options.removed:
        stats["removed_file"] = _gather(sorted(glob.glob(os.path.join(removed_dir, "*.jsonl"))), options.removed)
    write_text_atomic(os.path.join(out, "stats.json"), json.dumps(stats, indent=1) + "\n")
    return stats


def _check_resume(config: PipelineConfig, files: list[str]) -> None:
    """Record the run in OUTPUT/.pipeline/run.json; refuse to resume over other inputs, into a step
    directory made with other settings, or past a step not yet done (a later directory is then
    another run's)."""
    out = os.path.abspath(config.output)
    record_path = os.path.join(out, PIPELINE_STATE, "run.json")
    recorded = {"inputs": files, "steps": {}}
    if os.path.exists(record_path):
        with open(record_path, encoding="utf-8") as f:
            recorded = json.load(f)
        if recorded["inputs"] != files:
            raise Qwen2Error(f"{out} holds a pipeline run over other input shards; give the same input to resume "
                             "it, or choose another output directory")
    unfinished = None
    for index, step in enumerate(config.steps):
        step_dir = config.step_dir(index)
        if not os.path.isdir(step_dir):
            unfinished = unfinished or step_dir
            continue
        name = os.path.basename(step_dir)
        if recorded["steps"].get(name) != step.settings:
            raise Qwen2Error(f"{step_dir} was made with other settings ({recorded['steps'].get(name)}); delete it "
                             "and the steps after it to run them again, or choose another output directory")
        if unfinished:
            raise Qwen2Error(f"{step_dir} belongs to another run ({unfinished} is not done); delete it and the steps "
                             "after it, or choose another output directory")
        if not os.path.exists(os.path.join(step_dir, "stats.json")):
            unfinished = step_dir
    os.makedirs(os.path.dirname(record_path), exist_ok=True)
    steps = {os.path.basename(config.step_dir(i)): step.settings for i, step in enumerate(config.steps)}
    write_text_atomic(record_path, json.dumps({"inputs": files, "steps": steps}, indent=1) + "\n")


def _totals(config: PipelineConfig, steps: list[dict], seconds: float) -> dict:
    """OUTPUT/stats.json: in as the first step read, out as the last wrote, removals summed by reason."""
    first, last = steps[0], steps[-1]
    removed: dict[str, int] = {}
    for step in steps:
        for reason, n in step.get("removed", {}).items():
            removed[reason] = removed.get(reason, 0) + n
    return {"verb": "pipeline", "config": config.path, "output": config.step_dir(len(steps) - 1),
            "shards": first["shards"], "documents_in": first["documents_in"], "bytes_in": first["bytes_in"],
            "documents_out": last["documents_out"], "bytes_out": last["bytes_out"], "removed": removed,
            "bad_records": first.get("bad_records", 0), "empty_shards": first.get("empty_shards", 0),
            "seconds": round(seconds, 2), "steps": steps}


def _gather(files: list[str], path: str) -> str:
    """The steps' removed records, in step order, in one JSONL file written atomically."""
    with atomic_file(path, "w", encoding="utf-8") as out:
        for name in files:
            with open(name, encoding="utf-8") as f:
                shutil.copyfileobj(f, out)
    return os.path.abspath(path)


def summary(stats: dict) -> str:
    """Lines for the terminal: one per step (documents in and out, removed by reason) and the totals."""
    lines = []
    for step in stats["steps"]:
        removed = ", ".join(f"{reason} {n}" for reason, n in step.get("removed", {}).items()) or "none removed"
        lines.append(f"{step['step']}: {step['documents_in']} in, {step['documents_out']} out ({removed}) "
                     f"in {step['seconds']:.1f} s")
    share = stats["bytes_out"] / stats["bytes_in"] if stats["bytes_in"] else 0.0
    lines.append(f"{stats['documents_in']} documents in, {stats['documents_out']} out ({share:.1%} of the bytes "
                 f"kept) in {stats['seconds']:.1f} s")
    return "\n".join(lines)
