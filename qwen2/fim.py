"""Fill-in-the-middle prompts: the code between a prefix and a suffix, as Qwen2.5-Coder was trained for it.

    <|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>  ->  the model writes the middle

The three markers are the tokenizer's own added tokens, looked up by content (their ids differ
between tokenizers that have them at all). The prompt is built in ids: each marker is its single id,
and the prefix and suffix are encoded as plain text (`Tokenizer.encode_plain`), so a marker's string
inside the user's code stays text and cannot open or close a part of the prompt. For text without
markers the ids equal the tokenizer's encoding of the whole prompt string.

The model ends the middle with `<|endoftext|>`, or with one of the markers of its repository-level
format (`<|fim_pad|>`, `<|file_sep|>`, `<|repo_name|>`) when it runs on; generation stops at each
of these that the vocabulary has, besides the model's own end ids. `FimTokens` is used by
`Qwen2.infill`, `qwen2 generate --suffix` and the server's `/v1/completions` `suffix`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import Qwen2Error

PREFIX, SUFFIX, MIDDLE = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"
# Tokens that end a middle: the end of the file, or the start of what follows it in a repository prompt.
END_TOKENS = ("<|endoftext|>", "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>")


@dataclass(frozen=True)
class FimTokens:
    """A tokenizer's fill-in-the-middle ids: the three markers, and the end ids it has."""
    prefix: int
    suffix: int
    middle: int
    ends: tuple[int, ...]

    @classmethod
    def of(cls, tokenizer) -> "FimTokens":
        """The FIM ids of `tokenizer`; Qwen2Error naming the markers it lacks."""
        ids = {marker: tokenizer.token_to_id(marker) for marker in (PREFIX, SUFFIX, MIDDLE)}
        missing = [marker for marker, i in ids.items() if i is None]
        if missing:
            raise Qwen2Error(f"this model's tokenizer has no fill-in-the-middle tokens ({', '.join(missing)} missing); "
                             "infilling needs a model trained for it, such as Qwen2.5-Coder")
        ends = tuple(i for i in map(tokenizer.token_to_id, END_TOKENS) if i is not None)
        return cls(ids[PREFIX], ids[SUFFIX], ids[MIDDLE], ends)

    def prompt(self, tokenizer, prefix: str, suffix: str) -> list[int]:
        """The ids of `<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>`."""
        for name, text in (("prefix", prefix), ("suffix", suffix)):
            if not isinstance(text, str):
                raise Qwen2Error(f"the {name} to infill between must be a string, not {type(text).__name__}")
        return [self.prefix, *tokenizer.encode_plain(prefix), self.suffix, *tokenizer.encode_plain(suffix),
                self.middle]

    def stop_ids(self, eos_ids: Sequence[int]) -> list[int]:
        """`eos_ids` (the model's) and the FIM end ids, each once."""
        return list(dict.fromkeys([*eos_ids, *self.ends]))
