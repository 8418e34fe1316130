"""Training a byte-level BPE tokenizer the way Qwen2's is built.

Qwen2's tokenizer is a byte-level BPE: text is NFC-normalised, cut into pieces by its split regex
(`qwen2.tokenizer.SPLIT_REGEX`: words, numbers digit by digit, punctuation, whitespace runs), each
piece mapped to byte-level characters, and merges learnt within the pieces. `train_tokenizer`
learns such merges from texts with the `tokenizers` library and returns them as a
`qwen2.tokenizer.Tokenizer`, so a model trained from scratch is read by the same code that reads
Qwen2's own 151,936-token vocabulary, only with a vocabulary sized for the model.
"""
from __future__ import annotations

import json

from ..errors import Qwen2Error
from ..tokenizer import SPLIT_REGEX, AddedTokenSpec, Tokenizer

END_OF_DOCUMENT = "<|endoftext|>"  # the trained vocabulary's one special token: Qwen2's document separator
PIECE_CHARS = 100_000  # texts are fed to the trainer in pieces this long: bounded memory per item


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens (<|endoftext|> included, and its eos) learnt from
    `texts`, with Qwen2's normaliser and pre-tokeniser. The merges are learnt within the pieces
    Qwen2's split regex makes, so applying them with qwen2's pipeline gives the trainer's tokens;
    that is checked on a sample, and a mismatch is an error rather than a silently other tokenizer."""
    from tokenizers import Regex, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    if not any(texts):
        raise Qwen2Error("train_tokenizer needs some text to learn merges from; all texts are empty")
    backend = Backend(BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_DOCUMENT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Only the word cut at each piece's end is counted differently from the whole text.
    backend.train_from_iterator((t[i:i + PIECE_CHARS] for t in texts for i in range(0, len(t), PIECE_CHARS)),
                                trainer)
    model = json.loads(backend.to_str())["model"]
    vocab = dict(model["vocab"])
    eod = vocab.pop(END_OF_DOCUMENT)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Tokenizer(vocab, merges, [AddedTokenSpec(eod, END_OF_DOCUMENT, True)], eos_token=END_OF_DOCUMENT,
                          vocab_size=vocab_size)
    sample = texts[0][:20_000] + END_OF_DOCUMENT + texts[-1][-20_000:]
    if tokenizer.encode(sample) != backend.encode(sample).ids:  # merges learnt in pieces we never make
        raise Qwen2Error("the trained BPE tokenises differently in qwen2's pipeline; its pre-tokeniser must be Qwen2's")
    return tokenizer
