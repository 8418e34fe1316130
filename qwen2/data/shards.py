"""Record shards, streamed through datatrove: what every `qwen2 data` verb reads, runs and writes.

A corpus is shards of records, JSONL (optionally .gz) or Parquet, one record per line or row:
`{"id": ..., "text": ..., any other fields}`. A verb is a datatrove pipeline

    RecordReader(input shards)  ->  the verb's steps (datatrove blocks)  ->  RecordWriter(OUT)

run by datatrove's executors with one task per input shard, so:

- memory is bounded by a shard's documents in flight, never by the corpus;
- a killed run resumes where it stopped: datatrove marks each finished task in OUT/.datatrove/,
  and a rerun skips those shards;
- an output shard appears under its name only when its task has finished (written as
  NAME.partial, renamed at the end), and OUT/stats.json only when every shard has;
- every input field is kept: datatrove's Document holds id and text, the rest rides in its
  metadata and is written back at the top level.

stats.json counts documents and bytes in and out, and the removed documents by reason (datatrove's
filters count `dropped_<reason>`); `removed=FILE` keeps each removed record with its
`filter_reason`, as datatrove's exclusion writers write them.

Bad input is a one-line error naming the file and line (malformed JSON, a record without a
"text" string, an empty shard, a missing file), or with `skip_bad=True` a count in stats.json.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import time
from typing import Iterable, Sequence

from ..errors import Qwen2Error
from ..fileio import atomic_file, write_text_atomic
from ..progress import progress_bar
from . import PIPELINE_EXECUTORS

SHARD_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
STATE_DIR = ".datatrove"  # datatrove's logging dir: completion marks, per-task stats and logs
PARTIAL = ".partial"


def shard_paths(inputs: Sequence[str]) -> list[str]:
    """The shard files named by `inputs` (files, or directories read for *.jsonl, *.jsonl.gz, *.parquet),
    sorted within each directory; a missing path is an error."""
    files = []
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                           if p.endswith(SHARD_SUFFIXES) and os.path.isfile(p) and f"{os.sep}." not in p[len(path):])
            if not found:
                raise Qwen2Error(f"{path}: no shards (*.jsonl, *.jsonl.gz, *.parquet) in this directory")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise Qwen2Error(f"{path}: no such file or directory")
    if not files:
        raise Qwen2Error("no input shards given")
    return [os.path.abspath(f) for f in files]


def _reader_base():
    from datatrove.pipeline.readers import JsonlReader

    return JsonlReader


class RecordReader(_reader_base()):
    """datatrove's JSONL reader over an explicit list of shards (task i reads shards i, i + tasks, ...),
    strict about bad records: each is an error naming the file and line, or with `skip_bad` counted
    (`bad_records`, `empty_shards`) and left out. The id defaults to FILE:LINE."""

    name = "qwen2 records"

    def __init__(self, files: Sequence[str], skip_bad: bool = False, progress: bool = False):
        super().__init__(os.path.dirname(files[0]) or ".", compression="infer", add_file_path=False)
        self.files = list(files)
        self.skip_bad = skip_bad
        self.progress = progress

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if data:
            yield from data
        mine = self.files[rank::world_size]
        # One bar per task, over its shards' bytes on disk (compressed ones count as they are stored)
        with progress_bar(total=sum(os.path.getsize(f) for f in mine), unit="B", unit_scale=True,
                          desc=f"shard {rank + 1}/{world_size}", disable=not self.progress) as bar:
            for path in mine:
                for doc in self.read_file(path):
                    self.update_doc_stats(doc)
                    self.stat_update("documents")
                    self.stat_update("bytes", value=len(doc.text.encode("utf-8")))
                    yield doc
                self.stat_update("input_files")
                bar.update(os.path.getsize(path))

    def read_file(self, filepath: str):
        records = _parquet_rows(filepath) if filepath.endswith(".parquet") else jsonl_rows(filepath)
        lines = 0
        for line, record in records:
            lines += 1
            with self.track_time():
                problem = _record_problem(record)
                if problem:
                    self._bad(f"{filepath}:{line}: {problem}")
                    continue
                record = dict(record)
                text = record.pop("text")
                doc_id = record.pop("id", None)
                document = self.get_document_from_dict({"text": text, "id": f"{os.path.basename(filepath)}:{line}"
                                                        if doc_id is None else doc_id, "metadata": record},
                                                       filepath, line)
            if document is None:  # empty text: datatrove drops those; we count them as removed
                self.stat_update("dropped_empty_text")
                continue
            yield document
        if lines == 0:
            self._bad(f"{filepath}: an empty shard (no records)", stat="empty_shards")

    def _bad(self, message: str, stat: str = "bad_records") -> None:
        if not self.skip_bad:
            raise Qwen2Error(f"{message}; fix the input or pass --skip-bad to count and skip such records")
        self.stat_update(stat)


def _record_problem(record) -> str | None:
    if isinstance(record, str):  # the JSON could not be parsed: the parser's message
        return record
    if not isinstance(record, dict):
        return f"a record must be a JSON object, got {type(record).__name__}"
    if "text" not in record:
        return 'a record without "text"'
    if not isinstance(record["text"], str):
        return f'"text" must be a string, got {type(record["text"]).__name__}'
    try:
        record["text"].encode("utf-8")
    except UnicodeEncodeError:  # JSON may escape a lone surrogate ("\ud800"), which no UTF-8 file can hold
        return '"text" is not valid Unicode (a lone surrogate)'
    return None


def jsonl_rows(path: str) -> Iterable[tuple[int, object]]:
    """(line number from 1, parsed record or the parse error's message) per non-blank line."""
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="strict") as f:
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as e:
                    yield number, f"not valid JSON: {e.msg} (column {e.colno})"
        except UnicodeDecodeError as e:
            yield number + 1, f"not UTF-8 ({e.reason})"


def _parquet_rows(path: str) -> Iterable[tuple[int, object]]:
    """(row number from 1, row as a dict) of a Parquet file, a record batch at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise Qwen2Error(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
    number = 0
    for batch in pq.ParquetFile(path).iter_batches():
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _writer_base():
    from datatrove.pipeline.writers import JsonlWriter

    return JsonlWriter


class RecordWriter(_writer_base()):
    """datatrove's JSONL writer, writing records as they were read (metadata back at the top level),
    one shard per task (`NNNNN.jsonl`), each visible under its name only once its task finished."""

    name = "qwen2 records"

    def __init__(self, output_folder: str):
        super().__init__(output_folder, output_filename="${rank}.jsonl" + PARTIAL, compression=None,
                         adapter=_as_record)

    def write(self, document, rank: int = 0, **kwargs):
        self.stat_update("bytes", value=len(document.text.encode("utf-8")))
        super().write(document, rank, **kwargs)

    def _get_output_filename(self, document, rank: int | str = 0, **kwargs) -> str:
        # datatrove fills the name from the record's fields too: a field named "rank" would rename the shard
        return self.output_filename.substitute(rank=str(rank).zfill(5))

    def __exit__(self, exc_type, exc, tb):
        names = list(self.output_mg.get_open_files())
        self.close()
        if exc_type is None:  # a failed task leaves its .partial file; its rerun writes it again
            for name in names:
                self.output_folder.mv(name, name.removesuffix(PARTIAL))


def _as_record(writer, document) -> dict:
    """A Document as the record it was read from: id, text, then every other field."""
    return {"id": document.id, "text": document.text, **document.metadata}


@dataclasses.dataclass
class RunOptions:
    """How a verb's pipeline runs: `workers` processes on this machine (executor "local"), or a Ray
    cluster (executor "ray", at `ray_address`); `skip_bad` counts bad records instead of stopping;
    `removed`: a JSONL file for every removed record, with its reason; `progress`: a bar per task."""
    workers: int = 1
    executor: str = "local"
    ray_address: str | None = None
    skip_bad: bool = False
    removed: str | None = None
    progress: bool = True

    def __post_init__(self):
        if not isinstance(self.workers, int) or self.workers < 1:
            raise Qwen2Error(f"workers must be an integer >= 1, got {self.workers!r}")
        if self.executor not in PIPELINE_EXECUTORS:
            raise Qwen2Error(f"unknown executor {self.executor!r}; use {' or '.join(PIPELINE_EXECUTORS)}")


def removed_writer(out_dir: str):
    """The exclusion writer a verb's filters get when removed records are kept (see `run`)."""
    return RecordWriter(os.path.join(out_dir, STATE_DIR, "removed"))


def run(steps: Sequence, inputs: Sequence[str], out_dir: str, options: RunOptions = RunOptions(),
        verb: str = "") -> dict:
    """Read the shards `inputs`, pass the documents through `steps` (datatrove pipeline steps), write
    the survivors to `out_dir`, one output shard per input shard. Returns the stats written to
    `out_dir`/stats.json. A rerun after a crash skips the shards already done."""
    files, out_dir = prepare(inputs, out_dir)
    state = os.path.join(out_dir, STATE_DIR)
    start = time.perf_counter()
    execute([RecordReader(files, options.skip_bad, options.progress), *steps, RecordWriter(out_dir)],
            len(files), options, state)
    stats = summarise(state, len(files), time.perf_counter() - start, verb)
    if options.removed:
        stats["removed_file"] = _gather_removed(os.path.join(state, "removed"), options.removed)
    write_text_atomic(os.path.join(out_dir, "stats.json"), json.dumps(stats, indent=1) + "\n")
    return stats


def prepare(inputs: Sequence[str], out_dir: str) -> tuple[list[str], str]:
    """The input shards and the absolute output directory, made; refuses to resume a run in `out_dir`
    over other inputs (task i is input shard i: other inputs would mix two runs' shards)."""
    files = shard_paths(inputs)
    out_dir = os.path.abspath(out_dir)
    if os.path.isfile(out_dir):
        raise Qwen2Error(f"{out_dir} is a file; the output is a directory of shards")
    state = os.path.join(out_dir, STATE_DIR)
    os.makedirs(state, exist_ok=True)
    record = os.path.join(state, "inputs.json")
    if os.path.exists(record):
        with open(record, encoding="utf-8") as f:
            if json.load(f) != files:
                raise Qwen2Error(f"{out_dir} holds a run over other input shards; give the same inputs to resume "
                                 "it, or choose another output directory")
    else:
        write_text_atomic(record, json.dumps(files, indent=1) + "\n")
    if os.path.exists(os.path.join(out_dir, "stats.json")):  # an earlier run's: rewritten when this one ends
        os.remove(os.path.join(out_dir, "stats.json"))
    return files, out_dir


def execute(pipeline: Sequence, tasks: int, options: RunOptions, logging_dir: str) -> None:
    """Run a datatrove pipeline as `tasks` tasks on datatrove's local executor (`options.workers`
    processes) or its Ray executor, skipping the tasks an earlier run finished. A bad record (or any
    failure) in a worker process comes back as its one-line Qwen2Error."""
    from loguru import logger

    logger.disable("datatrove")  # its per-file and per-task log: the bars and stats.json say it here
    try:
        if options.executor == "ray":
            executor = _ray_executor(pipeline, tasks, options, logging_dir)
        else:
            executor = QuietLocalExecutor(pipeline, tasks=tasks, workers=min(options.workers, tasks),
                                           logging_dir=logging_dir, skip_completed=True)
        executor.run()
        if options.executor == "ray":  # datatrove's Ray executor logs a failed task and carries on
            _raise_failed_tasks(executor, tasks, logging_dir)
    except Qwen2Error:
        raise
    except Exception as e:
        raise Qwen2Error(_one_line(e)) from None
    finally:
        logger.enable("datatrove")


def _local_executor_base():
    from datatrove.executor import LocalPipelineExecutor

    return LocalPipelineExecutor


class QuietLocalExecutor(_local_executor_base()):
    """datatrove's local executor without its log on the terminal, in its worker processes too
    (`execute` silences the calling one): the bars show progress, a failure comes back as one line."""

    def _launch_run_for_rank(self, rank: int, ranks_q, completed=None, completed_lock=None):
        from loguru import logger

        logger.disable("datatrove")
        return super()._launch_run_for_rank(rank, ranks_q, completed, completed_lock)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__


RAY_CONNECT_TIMEOUT = 5.0  # seconds to wait for a Ray cluster's port to answer


def connect_ray(address: str | None = None) -> None:
    """Join the Ray cluster at `address` ("HOST:PORT", "ray://HOST:PORT", "auto"; None: the one
    RAY_ADDRESS names, or a new local one), once per process. A named address is tried with a plain
    TCP connect first: ray.init retries a dead address for minutes, and the error should come in
    seconds, before any output is written."""
    try:
        import ray
    except ImportError:
        raise Qwen2Error("--executor ray needs Ray: pip install -e '.[data-ray]'") from None
    if ray.is_initialized():
        return
    if address and address not in ("auto", "local"):
        _check_ray_port(address)
    try:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    except Exception as e:
        raise Qwen2Error(f"cannot reach a Ray cluster at {address or 'the default address'}: "
                         f"{_one_line(e)}") from None


def _check_ray_port(address: str) -> None:
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise Qwen2Error(f"Ray address {address!r} is not HOST:PORT (the head node's `ray start --head` prints it)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_TIMEOUT).close()
    except OSError as e:
        raise Qwen2Error(f"no Ray cluster answers at {address} ({e.strerror or e}); start one there with "
                         f"`ray start --head --port {port}`, give the address its head node printed, or leave out "
                         "--address to run on a local Ray instance") from None


def _ray_executor(pipeline, tasks: int, options: RunOptions, state: str):
    try:
        from datatrove.executor.ray import RayPipelineExecutor
    except ImportError:
        raise Qwen2Error("--executor ray needs Ray: pip install -e '.[data-ray]'") from None
    connect_ray(options.ray_address)
    return RayPipelineExecutor(pipeline, tasks=tasks, workers=options.workers, logging_dir=state,
                               skip_completed=True)


def _raise_failed_tasks(executor, tasks: int, state: str) -> None:
    """The first failed task's error as one line (from its log, which the Ray executor copies to
    `state`/logs), when any task did not finish."""
    failed = executor.get_incomplete_ranks(range(tasks))
    if not failed:
        return
    cause = ""
    try:
        with open(os.path.join(state, "logs", f"task_{failed[0]:05d}.log"), encoding="utf-8") as f:
            errors = [line for line in f if "Error: " in line and not line.startswith(" ")]
        if errors:
            cause = errors[-1].split("Error: ", 1)[1].strip()
    except OSError:
        pass
    raise Qwen2Error(cause or f"{len(failed)} of {tasks} tasks failed on the Ray cluster (their logs: "
                              f"{os.path.join(state, 'logs')}); a rerun retries them and skips the finished ones")


def summarise(state: str, tasks: int, seconds: float, verb: str = "") -> dict:
    """stats.json from datatrove's per-task stats (every task, this run's and earlier runs'): documents
    and bytes in (the reader's counters) and out (the writer's), removed documents by reason, bad
    records skipped."""
    steps = step_counters(state)
    first, last = (steps[0][1], steps[-1][1]) if steps else ({}, {})
    removed: dict[str, int] = {}
    for name, counters in steps:
        reasons = {k.removeprefix("dropped_"): v for k, v in counters.items() if k.startswith("dropped_")}
        if not reasons and counters.get("dropped"):  # a filter that gives no reason: its name is the reason
            reasons = {name: counters["dropped"]}
        for reason, n in reasons.items():
            removed[reason] = removed.get(reason, 0) + int(n)
    return {"verb": verb, "shards": tasks, "documents_in": int(first.get("documents", 0)),
            "bytes_in": int(first.get("bytes", 0)), "documents_out": int(last.get("total", 0)),
            "bytes_out": int(last.get("bytes", 0)), "removed": removed,
            "bad_records": int(first.get("bad_records", 0)), "empty_shards": int(first.get("empty_shards", 0)),
            "seconds": round(seconds, 2)}


def step_counters(state: str) -> list[tuple[str, dict[str, float]]]:
    """(step name, {counter: total over the tasks}) per pipeline step, in pipeline order."""
    steps: list[tuple[str, dict[str, float]]] = []
    for path in sorted(glob.glob(os.path.join(state, "stats", "*.json"))):
        with open(path, encoding="utf-8") as f:
            task = json.load(f)
        if not steps:
            steps = [(step["name"].split(": ", 1)[-1], {}) for step in task]
        for (_, counters), step in zip(steps, task):
            for key, value in step["stats"].items():
                counters[key] = counters.get(key, 0) + (value["total"] if isinstance(value, dict) else value)
    return steps


def _gather_removed(removed_dir: str, path: str) -> str:
    """Every removed record (the exclusion writers' shards) in one JSONL file, written atomically."""
    with atomic_file(path, "w", encoding="utf-8") as out:
        for shard in sorted(glob.glob(os.path.join(removed_dir, "*.jsonl"))):
            with open(shard, encoding="utf-8") as f:
                shutil.copyfileobj(f, out)
    return os.path.abspath(path)
