"""Training a byte-level BPE tokenizer the way Qwen2's is built.

Qwen2's tokenizer is a byte-level BPE: text is NFC-normalised, cut into pieces by its split regex
(`qwen2.tokenizer.SPLIT_REGEX`: contractions, words, numbers digit by digit, punctuation,
whitespace runs), each piece mapped to GPT-2's 256 printable byte characters, and merges learnt
within the pieces. Its vocabulary is the 256 bytes, then one token per merge in merge order
(151,643 tokens), then the control tokens: `<|endoftext|>` = 151643, `<|im_start|>`,
`<|im_end|>` (and in Qwen2.5 the tool, fill-in-the-middle and vision tokens after those).

`train_tokenizer` learns such merges from texts with the `tokenizers` library's BpeTrainer and
lays the vocabulary out the same way, so a model trained from scratch is read by the same
`qwen2.tokenizer.Tokenizer` that reads Qwen2's own vocabulary, only with a vocabulary sized for
the model. `train_tokenizer_dir` is `qwen2 data train-tokenizer`: it streams JSONL / text /
Parquet shards into the trainer, writes a directory that qwen2, `qwen2 train pretrain` and
transformers' `AutoTokenizer` load, and measures bytes per token per language on held-out records
next to the real Qwen2 tokenizer.
"""
from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator

from ..errors import Qwen2Error
from ..tokenizer import CHATML_TEMPLATE, SPLIT_REGEX, AddedTokenSpec, Tokenizer

END_OF_DOCUMENT = "<|endoftext|>"  # Qwen2's document separator: what pre-training packs between documents
CONTROL_TOKENS = (END_OF_DOCUMENT, "<|im_start|>", "<|im_end|>")  # Qwen2's, right after the merges
# Qwen2.5's added tokens after those, in its order: (content, special). The tool-call tags are not
# special in Qwen2.5 (decode(skip_special_tokens=True) keeps them, so a parser still sees them).
QWEN25_EXTRAS = (
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", True), ("<|fim_middle|>", True), ("<|fim_suffix|>", True), ("<|fim_pad|>", True),
    ("<|repo_name|>", True), ("<|file_sep|>", True),
)
BYTE_TOKENS = 256  # the byte alphabet every byte-level BPE vocabulary starts with
PIECE_CHARS = 100_000  # texts are fed to the trainer in pieces this long: bounded memory per item
HELD_OUT = 0.02  # the share of records kept from training to measure bytes per token on
HELD_OUT_BYTES = 1 << 20  # at most this much held-out text per language: enough for a stable ratio
SAMPLE_CHARS = 20_000  # how much of the first and last text checks qwen2's pipeline against the trainer's


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, qwen25_extras: bool = False) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens (the 256 bytes and the merges) learnt from `texts`
    with Qwen2's normaliser and pre-tokeniser, followed by Qwen2's control tokens (ids vocab_size,
    vocab_size + 1, ...; with `qwen25_extras` Qwen2.5's added tokens after them). A corpus with
    fewer distinct pairs than merges asked for gives fewer merges, and the control tokens follow them.

    `texts` may be any iterable (a generator streams: the trainer keeps only pair counts). The
    merges are learnt within the pieces Qwen2's split regex makes, so applying them with qwen2's
    pipeline gives the trainer's tokens; that is checked on a sample, and a mismatch is an error
    rather than a silently other tokenizer."""
    from tokenizers import Regex, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    check_vocab_size(vocab_size)
    backend = Backend(BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # The alphabet is given whole, so every byte has a token even if the corpus never uses it.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    sample = _EndsSample()
    backend.train_from_iterator(sample.watch(_pieces(texts)), trainer)
    if not sample.first:
        raise Qwen2Error("train_tokenizer needs some text to learn merges from; all texts are empty")

    model = json.loads(backend.to_str())["model"]
    vocab = model["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    added = [(content, True) for content in CONTROL_TOKENS] + (list(QWEN25_EXTRAS) if qwen25_extras else [])
    specs = [AddedTokenSpec(len(vocab) + i, content, special) for i, (content, special) in enumerate(added)]
    tokenizer = Tokenizer(vocab, merges, specs, eos_token=END_OF_DOCUMENT, pad_token=END_OF_DOCUMENT,
                          chat_template=CHATML_TEMPLATE)
    if any(tokenizer.encode(t) != backend.encode(t).ids for t in sample.texts):  # merges learnt in pieces we never make
        raise Qwen2Error("the trained BPE tokenises differently in qwen2's pipeline; its pre-tokeniser must be Qwen2's")
    return tokenizer


def check_vocab_size(vocab_size: int) -> None:
    """A byte-level BPE starts from the 256 bytes: a vocabulary of no more has no room for a merge."""
    if vocab_size <= BYTE_TOKENS:
        raise Qwen2Error(f"vocab size {vocab_size} leaves no merges: a byte-level BPE starts from the "
                         f"{BYTE_TOKENS} bytes, so ask for more than {BYTE_TOKENS}")


def _pieces(texts: Iterable[str]) -> Iterator[str]:
    """Each text in pieces of PIECE_CHARS; only the word cut at a piece's end is counted differently."""
    for text in texts:
        for i in range(0, len(text), PIECE_CHARS):
            yield text[i:i + PIECE_CHARS]


class _EndsSample:
    """The start of the first text and the end of the last one the trainer saw, kept while it
    streams, to check qwen2's pipeline against the trainer's on text it learnt from."""

    def __init__(self):
        self.first = self.last = ""

    def watch(self, pieces: Iterator[str]) -> Iterator[str]:
        for piece in pieces:
            if piece and not self.first:
                self.first = piece[:SAMPLE_CHARS]
            self.last = piece or self.last
            yield piece

    @property
    def texts(self) -> list[str]:
        return [self.first, self.last[-SAMPLE_CHARS:]]


# ---- qwen2 data train-tokenizer -------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    """A text to learn from, its language (the record's "language" field, None if it has none), and
    whether it is a whole file (never held out: a single text file would otherwise be kept from
    training by chance)."""
    text: str
    language: str | None
    whole_file: bool = False


def read_records(path: str) -> Iterator[Record]:
    """The texts of one input: a shard of records with a "text" field (JSONL, .gz or not, or
    Parquet), read by `qwen2.data.shards.RecordReader` like every `qwen2 data` verb's input
    (streamed; a bad record is a one-line error naming the file and line), or any other file as
    one UTF-8 text."""
    from .shards import SHARD_SUFFIXES, RecordReader

    if path.endswith(SHARD_SUFFIXES):
        for document in RecordReader([path]).run():
            language = document.metadata.get("language")
            yield Record(document.text, language if isinstance(language, str) else None)
    else:
        from ..fileio import read_text

        yield Record(read_text(path), None, whole_file=True)


def is_held_out(text: str, share: float) -> bool:
    """Whether a record is kept from training, by a hash of its text: the same records on every
    run and in any shard order, and a duplicate is never both trained on and measured."""
    return zlib.crc32(text.encode("utf-8", "surrogatepass")) < share * 2 ** 32


def train_tokenizer_dir(inputs: list[str], vocab_size: int, out: str, *, qwen25_extras: bool = False,
                        held_out: float = HELD_OUT, force: bool = False, progress: bool = True) -> dict:
    """`qwen2 data train-tokenizer`: train on the records of `inputs` (streamed, a progress bar over
    their bytes) and write `out` atomically: tokenizer.json and tokenizer_config.json (Qwen2's
    ChatML template, eos and pad `<|endoftext|>`), and stats.json, which it returns: what was read,
    the vocabulary, the time taken, and bytes per token per language on the held-out records, ours
    and the real Qwen2 tokenizer's when its files are in the qwen2 cache (no download)."""
    from ..fileio import atomic_dir, write_text_atomic
    from ..progress import progress_bar
    from .shards import shard_paths

    files = shard_paths(inputs)  # directories become their shards; a missing path is an error here
    check_vocab_size(vocab_size)
    if not 0 <= held_out < 1:
        raise Qwen2Error(f"the held-out share must be in [0, 1), got {held_out}")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise Qwen2Error(f"{out} is not empty; choose another --out or pass --force to replace it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise Qwen2Error(f"{out} is a file, not a directory; choose another --out")

    read = {"texts": 0, "bytes": 0, "held_out_texts": 0, "held_out_bytes": 0}
    held: dict[str, list[str]] = {}  # language -> held-out texts
    held_bytes: dict[str, int] = {}

    def training_texts(bar) -> Iterator[str]:
        for path in files:  # the bar counts each file's size: text bytes while in it, the rest at its end
            left = os.path.getsize(path)
            for record in read_records(path):
                size = len(record.text.encode("utf-8", "surrogatepass"))
                bar.update(min(size, left))
                left -= min(size, left)
                language = record.language or "unlabelled"
                if (not record.whole_file and is_held_out(record.text, held_out)
                        and held_bytes.get(language, 0) < HELD_OUT_BYTES):
                    held.setdefault(language, []).append(record.text)
                    held_bytes[language] = held_bytes.get(language, 0) + size
                    read["held_out_texts"] += 1
                    read["held_out_bytes"] += size
                    continue
                read["texts"] += 1
                read["bytes"] += size
                yield record.text
            bar.update(left)

    start = time.perf_counter()
    total = sum(os.path.getsize(p) for p in files)
    with progress_bar(total=total, desc="training tokenizer", unit="B", unit_scale=True,
                      disable=not progress) as bar:
        tokenizer = train_tokenizer(training_texts(bar), vocab_size, qwen25_extras=qwen25_extras)
    seconds = time.perf_counter() - start
    reference, reference_note = reference_tokenizer()
    stats = {
        "inputs": files,
        **read,
        "seconds": round(seconds, 3),
        "vocab_size": vocab_size,
        "bpe_tokens": min(spec.id for spec in tokenizer.added_tokens),
        "added_tokens": {spec.content: spec.id for spec in tokenizer.added_tokens},
        "total_tokens": len(tokenizer),
        "reference": reference_note,
        "bytes_per_token": bytes_per_token(held, tokenizer, reference),
    }
    with atomic_dir(out) as tmp:
        tokenizer.save(tmp)
        write_text_atomic(os.path.join(tmp, "stats.json"), json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    return stats


def bytes_per_token(texts: dict[str, list[str]], tokenizer: Tokenizer, reference: Tokenizer | None = None) -> dict:
    """{language: {"texts", "bytes", "ours", "qwen2"}}: UTF-8 bytes per token of `tokenizer` (and of
    `reference`, None without one) over each language's texts, and over all of them as "all"."""
    def ratio(tok: Tokenizer | None, group: list[str]) -> float | None:
        if tok is None:
            return None
        tokens = sum(len(tok.encode(t)) for t in group)
        return round(sum(len(t.encode("utf-8")) for t in group) / max(1, tokens), 4)

    groups = dict(sorted(texts.items()))
    if len(groups) != 1:
        groups["all"] = [t for group in texts.values() for t in group]
    return {language: {"texts": len(group), "bytes": sum(len(t.encode("utf-8")) for t in group),
                       "ours": ratio(tokenizer, group), "qwen2": ratio(reference, group)}
            for language, group in groups.items() if group}


def reference_tokenizer() -> tuple[Tokenizer | None, str]:
    """(the real Qwen2 tokenizer, where it came from) from the qwen2 cache: the converted default
    model's directory, else its GGUF's metadata. (None, why) when neither is there: stats are still
    written, and nothing is downloaded or assembled for them."""
    from ..checkpoint.registry import DEFAULT_MODEL, STAMP
    from ..fileio import cache_dir

    directory = os.path.join(cache_dir(), DEFAULT_MODEL)
    gguf = directory + ".gguf"
    try:
        if os.path.isfile(os.path.join(directory, STAMP)):
            return Tokenizer.from_dir(directory), f"{DEFAULT_MODEL} ({directory})"
        if os.path.isfile(gguf):
            from ..checkpoint.gguf import read_gguf

            return read_gguf(gguf)[2], f"{DEFAULT_MODEL} ({gguf})"
    except Qwen2Error as e:
        return None, f"not available: {e}"
    return None, (f"not available: {DEFAULT_MODEL} is not in the qwen2 cache ({cache_dir()}); "
                  "load it once with qwen2 to compare")


def summary(stats: dict) -> str:
    """What the command prints: the vocabulary, what was read, and bytes per token per language."""
    lines = [f"{stats['bpe_tokens']:,} BPE tokens + {len(stats['added_tokens'])} control tokens "
             f"from {stats['texts']:,} texts ({stats['bytes'] / 1e6:.1f} MB) in {stats['seconds']:.1f} s"]
    if stats["bpe_tokens"] < stats["vocab_size"]:
        lines.append(f"the corpus had pairs for {stats['bpe_tokens']:,} tokens only, not {stats['vocab_size']:,}")
    if stats["bytes_per_token"]:
        lines.append(f"bytes per token on {stats['held_out_texts']:,} held-out texts (ours / qwen2):")
        for language, row in stats["bytes_per_token"].items():
            theirs = f"{row['qwen2']:.2f}" if row["qwen2"] is not None else "-"
            lines.append(f"  {language:<12} {row['ours']:.2f} / {theirs}")
    if stats["reference"].startswith("not available"):
        lines.append(f"qwen2 reference {stats['reference']}")
    return "\n".join(lines)
