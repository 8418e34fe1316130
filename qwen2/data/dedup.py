"""Deduplication: exact copies (a hash of the normalised text) and near copies (MinHash LSH), keeping
the first document of each cluster in input order.

Both are datatrove's multi-stage dedups, run stage by stage over the shards (see shards.py), each
stage with its own task marks under OUT/.datatrove/<stage>, so a killed run resumes at the stage and
shard where it stopped:

    exact-signatures   one task per shard: a 64-bit hash of each document's normalised text
    exact-duplicates   one task: merge the sorted hashes; every copy after the first is a duplicate
    near-signatures    one task per shard: the MinHash signature of the documents left, in bands
    near-buckets       one task per band: documents whose band is equal are candidate pairs
    near-clusters      one task: union the pairs into clusters; all but the earliest document go
    (final)            one task per shard: read again, drop both kinds, write OUT/NNNNN.jsonl

"Normalised" is Unicode NFC, case folded, whitespace runs collapsed to one space: copies that
differ only in spacing, line ends or letter case are exact duplicates. The near stages see only the
documents the exact stage kept, so every removal has one reason, `exact_duplicate` or
`near_duplicate` (stats.json, and `filter_reason` in the --removed file).

Why "the first" needs care: datatrove documents are numbered (task, index in the task) and task i
reads shard i, so that order is input order. datatrove's exact finder keeps the highest priority
then lowest index (not lowest task), and its clustering keeps the root of a union by size (possibly
a later copy), so both are adjusted below to keep the earliest.

Memory: the signature and filter stages hold one shard's hashes at a time; the clustering holds the
documents that have near copies (as datatrove's does), not the corpus.
"""
from __future__ import annotations

import json
import math
import os
import struct
import time
import unicodedata
from string import Template
from typing import Sequence

import regex
from datatrove.pipeline.dedup import MinhashConfig, MinhashDedupBuckets, MinhashDedupFilter, MinhashDedupSignature
from datatrove.pipeline.dedup.exact_dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature,
                                                  ExactFindDedups)
from datatrove.pipeline.dedup.minhash import MinhashDedupCluster
from datatrove.utils.binaryio import read_tuples_from_file
from datatrove.utils.hashing import HashConfig
from datatrove.utils.text import TextNormConfig
from datatrove.utils.word_tokenizers import WordTokenizer

from ..errors import Qwen2Error
from ..fileio import write_text_atomic
from . import shards

EXACT, NEAR = "exact_duplicate", "near_duplicate"   # the reasons in stats.json and --removed
DEFAULT_NEAR = 0.8      # Jaccard similarity of word 5-gram shingles at which a document is a near copy
SHINGLE_WORDS = 5
TARGET_RECALL = 0.99    # chance that LSH pairs two documents exactly at the threshold
MAX_HASHES = 256        # signature length budget: cost is linear in it (hashing, disk, bucket merges)
MAX_SHARDS = 65535      # the exact stage ranks shards by a 16-bit priority
# 64-bit SHA-1 prefixes: datatrove's default, xxhash, hashes only bytes in xxhash >= 4, and both stages hash str
HASH = HashConfig(precision=64, hash_fc="sha1")


def normalise(text: str) -> str:
    """The text an exact duplicate shares: NFC, case folded, whitespace runs made one space."""
    return " ".join(unicodedata.normalize("NFC", text).casefold().split())


def lsh_probability(jaccard: float, bands: int, rows: int) -> float:
    """The chance that MinHash LSH with `bands` bands of `rows` hashes makes two documents of Jaccard
    similarity `jaccard` a candidate pair: each hash agrees with probability `jaccard`, a band
    agrees when all its rows do, the pair is found when any band agrees: 1 - (1 - J^rows)^bands."""
    return 1 - (1 - jaccard ** rows) ** bands


def lsh_shape(threshold: float, target: float = TARGET_RECALL, budget: int = MAX_HASHES) -> tuple[int, int]:
    """(bands, rows) for a Jaccard `threshold`: for each band width, the fewest bands that find a pair
    at the threshold with probability `target`; of those that fit in `budget` hashes, the widest
    bands, because the S-curve 1 - (1 - J^rows)^bands is steepest there (fewest pairs below the
    threshold found).

    At the default 0.8 this gives 26 bands x 8 rows (208 hashes):
        P(found) = 0.9915 at J = 0.8, 0.998 at 0.85, 0.79 at 0.7, 0.36 at 0.6, 0.10 at 0.5, 0.017 at 0.4.
    datatrove's default, 14 x 8, finds only 92 % of pairs at J = 0.8; 9 rows would need 32 bands
    (288 hashes) for the same 99 %."""
    best = (1, 1)
    for rows in range(1, budget + 1):
        miss = 1 - threshold ** rows
        bands = 1 if miss <= 0 else math.ceil(math.log(1 - target) / math.log(miss))
        if bands * rows > budget:
            break
        best = (bands, rows)
    return best


def minhash_config(threshold: float = DEFAULT_NEAR) -> MinhashConfig:
    """datatrove's MinHash settings for a Jaccard threshold: word 5-gram shingles of datatrove's
    simplified text (lower case, no punctuation, no diacritics, whitespace collapsed) but with its
    numbers kept: datatrove's default turns every number into 0, which makes two chunks of a table
    of test values or constants (different content, 0.1 Jaccard) look like near copies (0.74).
    Against plain whitespace-split lower-case 5-grams (planted.py's measure) the near copies' Jaccard
    hardly moves (mean 0.871 here vs 0.866 there on 565 planted pairs): dropping punctuation only
    makes `word,` and `word` one word. 64-bit hashes; the band shape of `lsh_shape`."""
    bands, rows = lsh_shape(threshold)
    return MinhashConfig(n_grams=SHINGLE_WORDS, num_buckets=bands, hashes_per_bucket=rows, seed=1,
                         norm_config=TextNormConfig(norm_numbers=False), hash_config=HASH)


class Words(WordTokenizer):
    """Words for shingles, in any language and without a model: runs of non-space characters, and
    each character of the scripts written without spaces (Chinese, Japanese, Thai, ...), where a
    5-gram of characters plays the part of five words. (datatrove's per-language tokenizers need
    spaCy and a known language; the corpus is mixed and unlabelled here.)"""

    UNSPACED = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}\p{Tibetan}"
    PATTERN = regex.compile(rf"[{UNSPACED}]|[^\s{UNSPACED}]+")

    def word_tokenize(self, text: str) -> list[str]:
        return self.PATTERN.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


def signature_step(output_folder: str, config: MinhashConfig) -> MinhashDedupSignature:
    """datatrove's MinHash signature stage, shingling with `Words`."""
    return MinhashDedupSignature(output_folder, config, language=Words())


def jaccard(a: str, b: str, config: MinhashConfig | None = None) -> float:
    """The Jaccard similarity of two texts' shingle sets, exactly as the MinHash stage shingles them:
    what its LSH estimates, and what `--near` is a threshold on."""
    step = signature_step(os.devnull, config or minhash_config())
    sa, sb = (set(step.get_shingles(t).ravel().tolist()) for t in (a, b))
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


# ---- datatrove's stages, adjusted to keep the first of each cluster ------------------------------

def _normalised_text(document) -> str:
    return normalise(document.text)


EXACT_CONFIG = ExactDedupConfig(content_getter=_normalised_text, hash_config=HASH)


class _ExactSignature(ExactDedupSignature):
    """datatrove's exact signature, with each document's priority its shard's place in the input
    (earlier shard, higher priority): the finder keeps the highest priority, then the lowest index
    in the shard, so it keeps the copy read first."""

    def run(self, data, rank: int = 0, world_size: int = 1):
        self.priority = MAX_SHARDS - rank
        return super().run(data, rank, world_size)

    def get_hashes(self, doc, doc_idx: int):
        return [(self.hash_fc(self.config.content_getter(doc)), self.priority, doc_idx)]


class _ExactFilter(ExactDedupFilter):
    """datatrove's exact filter, which also writes each kept document's `duplicate_count`: the
    record goes on as it was read (any `duplicate_count` of its own put back)."""

    name = EXACT

    def run(self, data, rank: int = 0, world_size: int = 1):
        absent = object()
        own = [absent]

        def remember(documents):  # the filter yields a kept document before it reads the next one
            for doc in documents:
                own[0] = doc.metadata.get("duplicate_count", absent)
                yield doc

        for doc in super().run(remember(data), rank, world_size):
            if own[0] is absent:
                del doc.metadata["duplicate_count"]
            else:
                doc.metadata["duplicate_count"] = own[0]
            yield doc


class _KeepFirstCluster(MinhashDedupCluster):
    """datatrove's clustering of the candidate pairs, keeping each cluster's earliest document
    (lowest task, then lowest index in it). datatrove's own keeps the root of a union by size, which
    is a later copy whenever the later ones were joined first."""

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if world_size != 1:
            raise Qwen2Error("the near-duplicate clustering runs as one task")
        parent: dict[tuple[int, int], tuple[int, int]] = {}  # a later document -> an earlier one of its cluster

        def root(node):
            top = node
            while top in parent:
                top = parent[top]
            while node != top:  # path compression
                parent[node], node = top, parent[node]
            return top

        with self.track_time():
            for name in self.input_folder.list_files(glob_pattern="*.dups"):
                with self.input_folder.open(name, "rb") as f:
                    for f1, d1, f2, d2 in read_tuples_from_file(f, "4I", lines_to_buffer=self.lines_to_buffer):
                        a, b = root((f1, d1)), root((f2, d2))
                        if a != b:
                            parent[max(a, b)] = min(a, b)
            with self.output_folder.get_output_file_manager(mode="wb") as out:
                for task, index in sorted(parent):  # every node with a parent is removed; in order per task
                    out.write(f"{task:06d}.remove", struct.pack("<I", index))
                    self.stat_update("to_remove")


class _NearFilter(MinhashDedupFilter):
    name = NEAR


class _Removed(shards.RecordWriter):
    """The removed records of one reason, where `--removed` gathers them: a file per shard and reason
    (two dedup filters share a task), each record with its `filter_reason` (datatrove's dedup
    filters give none)."""

    def __init__(self, out_dir: str, reason: str):
        super().__init__(shards.removed_writer(out_dir).output_folder.path)
        self.output_filename = Template("${rank}." + reason + ".jsonl" + shards.PARTIAL)
        self.reason = reason

    def write(self, document, rank: int = 0, **kwargs):
        document.metadata["filter_reason"] = self.reason
        super().write(document, rank, **kwargs)


# ---- the verb -------------------------------------------------------------------------------------

def dedup(inputs: Sequence[str], out_dir: str, near: float = DEFAULT_NEAR,
          options: shards.RunOptions = shards.RunOptions()) -> dict:
    """Remove exact and (unless `near` is 0) near duplicates from the shards `inputs`, writing the
    rest to `out_dir`, one shard per input shard, records unchanged and in order. `near`: the Jaccard
    similarity of word 5-gram shingles from which documents are near copies. Returns stats.json."""
    if not 0 <= near <= 1:
        raise Qwen2Error(f"--near must be a Jaccard similarity between 0 and 1 (0: exact duplicates only), got {near}")
    start = time.perf_counter()
    files, out_dir = shards.prepare(inputs, out_dir)
    if len(files) > MAX_SHARDS:
        raise Qwen2Error(f"dedup reads at most {MAX_SHARDS} shards at a time, got {len(files)}; merge some")
    state = os.path.join(out_dir, shards.STATE_DIR)
    config = minhash_config(near) if near else None
    settings = {"near": near, "bands": config.num_buckets if config else 0,
                "rows": config.hashes_per_bucket if config else 0, "shingle_words": SHINGLE_WORDS}
    _check_settings(os.path.join(state, "dedup.json"), settings)

    def stage(name: str, pipeline: list, tasks: int) -> None:
        shards.execute(pipeline, tasks, options, os.path.join(state, name))

    def read():
        return shards.RecordReader(files, options.skip_bad, options.progress)

    def work(name: str) -> str:
        os.makedirs(os.path.join(state, name, "data"), exist_ok=True)  # datatrove lists them even when empty
        return os.path.join(state, name, "data")

    stage("exact-signatures", [read(), _ExactSignature(work("exact-signatures"), EXACT_CONFIG)], len(files))
    stage("exact-duplicates", [ExactFindDedups(work("exact-signatures"), work("exact-duplicates"), EXACT_CONFIG)], 1)

    def exact_filter(removed: bool):
        return _ExactFilter(work("exact-duplicates"), EXACT_CONFIG,
                            exclusion_writer=_Removed(out_dir, EXACT) if removed else None)

    steps = [exact_filter(bool(options.removed))]
    if config:
        stage("near-signatures", [read(), exact_filter(False), signature_step(work("near-signatures"), config)],
              len(files))
        stage("near-buckets", [MinhashDedupBuckets(work("near-signatures"), work("near-buckets"), config=config)],
              config.num_buckets)
        stage("near-clusters", [_KeepFirstCluster(work("near-buckets"), work("near-clusters"), config=config)], 1)
        steps.append(_NearFilter(work("near-clusters"),
                                 exclusion_writer=_Removed(out_dir, NEAR) if options.removed else None))
    stats = shards.run(steps, files, out_dir, options, verb="dedup")
    stats = {**stats, "dedup": settings, "seconds": round(time.perf_counter() - start, 2)}
    write_text_atomic(os.path.join(out_dir, "stats.json"), json.dumps(stats, indent=1) + "\n")
    return stats


def _check_settings(path: str, settings: dict) -> None:
    """Record the run's settings; refuse to resume a run made with others (its finished stages
    would be reused)."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            earlier = json.load(f)
        if earlier != settings:
            raise Qwen2Error(f"{os.path.dirname(os.path.dirname(path))} holds a dedup run with --near "
                             f"{earlier.get('near')}; give the same --near to resume it, or choose another "
                             "output directory")
    else:
        write_text_atomic(path, json.dumps(settings) + "\n")


def summary(stats: dict) -> str:
    """One line for the terminal: documents in and out, and removed by reason."""
    removed = stats.get("removed", {})
    share = 1 - stats["bytes_out"] / stats["bytes_in"] if stats["bytes_in"] else 0.0
    return (f"{stats['documents_in']} documents in, {stats['documents_out']} out: {removed.get(EXACT, 0)} exact and "
            f"{removed.get(NEAR, 0)} near duplicates removed ({share:.1%} of the bytes) in {stats['seconds']:.1f} s")
