"""Structured output: replies that must match a JSON schema, a regular expression or a Lark grammar.

The grammar engine is llguidance's (an Earley parser over a derivative-based lexer, walking the
tokenizer's byte trie): given the text so far, it says which tokens keep the reply a prefix of some
matching text, and once the grammar is complete it allows only the end-of-sequence ids. Here:

  `GrammarSpec`         what a request asks for (`json_schema_spec`, `regex_spec`, `lark_spec`), as
                        llguidance's grammar text
  `compile_constraint`  the spec checked against the model's tokenizer and compiled once (cached per
                        grammar and tokenizer); a schema that is not valid, a regex that cannot compile
                        or can match no text -> one-line Qwen2Error, before any generation
  `Constraint.start()`  a `RowConstraint`: one row's parser, which masks that row's logits (every
                        token the grammar cannot take next at -inf, and every row of the embedding
                        beyond the tokenizer's ids) and then takes the token chosen
  `constrained_choice`  `next_token` over logits each row's constraint has masked: what
                        `decode_steps(choose=...)` and the serving engine's sequences take, chosen once
                        when the request is built

Only the logits are touched, so it composes with any model, quantised or not, and with any sampling.
"""
from __future__ import annotations

import collections
import json
import math
import threading
import weakref
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import Qwen2Error
from .generate import next_token

# JSON as `json.dumps` writes it: one space after "," and ":", no other whitespace. A small model
# left free to put whitespace between tokens can spend its whole budget on newlines.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT = {"type": "object"}  # OpenAI's response_format {"type": "json_object"}
GRAMMAR_CACHE_SIZE = 128  # compiled grammars kept per tokenizer (a server sees the same schemas again)
KINDS = ("json_schema", "regex", "grammar")  # the keyword arguments that ask for a constraint


def _llguidance():
    try:
        import llguidance
        import llguidance.torch  # noqa: F401 (the bitmask helpers)
    except ImportError:
        raise Qwen2Error("structured output (json_schema=, regex=, grammar=, response_format, tool_choice) needs "
                         "llguidance; install it with pip install llguidance (or pip install -e '.[structured]')") \
            from None
    return llguidance


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint as llguidance's grammar text; `what` names it in error messages."""
    what: str
    grammar: str


def json_schema_spec(schema: dict | str, what: str = "json_schema") -> GrammarSpec:
    """Replies that are JSON values valid under `schema` (a dict, or its JSON text)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise Qwen2Error(f"{what} is not valid JSON ({e}); give a JSON schema object") from None
    if not isinstance(schema, dict):
        raise Qwen2Error(f"{what} must be a JSON schema object (a dict), got {type(schema).__name__}")
    try:
        grammar = _llguidance().LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
    except (ValueError, TypeError) as e:
        raise Qwen2Error(f"{what} is not a usable JSON schema: {_one_line(str(e))}") from None
    return GrammarSpec(what, grammar)


def regex_spec(pattern: str, what: str = "regex") -> GrammarSpec:
    """Replies that match `pattern` as a whole (Rust `regex` syntax, which Python's mostly shares)."""
    if not isinstance(pattern, str):
        raise Qwen2Error(f"{what} must be a string, got {type(pattern).__name__}")
    return GrammarSpec(what, _llguidance().LLMatcher.grammar_from_regex(pattern))


def lark_spec(source: str, what: str = "grammar") -> GrammarSpec:
    """Replies in the language of a Lark grammar (llguidance's dialect: `start:` is the whole reply,
    `%json {...}` embeds a JSON schema, `<name>` is a special token)."""
    if not isinstance(source, str):
        raise Qwen2Error(f"{what} must be the text of a Lark grammar, got {type(source).__name__}")
    return GrammarSpec(what, _llguidance().LLMatcher.grammar_from_lark(source))


def requested_spec(json_schema=None, regex=None, grammar=None) -> GrammarSpec | None:
    """The one constraint a request asks for by keyword (None: none); two at once is an error."""
    given = [k for k, v in zip(KINDS, (json_schema, regex, grammar)) if v is not None]
    if len(given) > 1:
        raise Qwen2Error(f"give one of json_schema, regex or grammar, not {' and '.join(given)}")
    if json_schema is not None:
        return json_schema_spec(json_schema)
    if regex is not None:
        return regex_spec(regex)
    if grammar is not None:
        return lark_spec(grammar)
    return None


# ---- compiling against a tokenizer ---------------------------------------------------------------

@dataclass
class _Compiled:
    """llguidance's tokenizer for one (Tokenizer, end ids) and the grammars compiled for it, the most
    recently used last: each grammar's matcher before its first token, which rows copy."""
    tokenizer: object
    grammars: collections.OrderedDict


_compiled: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # our Tokenizer -> {end ids: _Compiled}
_lock = threading.Lock()  # the server compiles on worker threads


def ll_tokenizer(tokenizer, eos_ids: Sequence[int]):
    """llguidance's view of our tokenizer: built from its tokenizer.json text (no transformers) with
    the model's end ids, once per tokenizer (~1 s on Qwen2's 151k tokens)."""
    return _compiled_for(tokenizer, eos_ids).tokenizer


def _compiled_for(tokenizer, eos_ids: Sequence[int]) -> _Compiled:
    llg = _llguidance()
    key = tuple(eos_ids)
    with _lock:
        built = _compiled.setdefault(tokenizer, {})  # dies with the tokenizer, its grammars with it
        if key not in built:
            built[key] = _Compiled(llg.LLTokenizer(tokenizer._backend.to_str(), eos_token=list(key) or None),
                                   collections.OrderedDict())
        return built[key]


def grammar_token(tokenizer, eos_ids: Sequence[int], text: str) -> str:
    """How a Lark grammar writes `text`: as the special token `<text>` where the tokenizer has one
    (llguidance matches special tokens by name only; a string literal equal to one lets its mask and
    its parser disagree), else as a string literal."""
    token_id = tokenizer.token_to_id(text)
    if token_id is not None and ll_tokenizer(tokenizer, eos_ids).is_special_token(token_id):
        return text
    return json.dumps(text)


def compile_constraint(spec: GrammarSpec, tokenizer, eos_ids: Sequence[int], vocab_size: int) -> "Constraint":
    """`spec` compiled for this tokenizer, its end ids and a model whose logits have `vocab_size`
    entries. A grammar llguidance refuses, or one no text can match, is a Qwen2Error naming `spec.what`."""
    compiled = _compiled_for(tokenizer, eos_ids)
    lltok, grammars = compiled.tokenizer, compiled.grammars
    with _lock:
        matcher = grammars.get(spec.grammar)
        if matcher is not None:
            grammars.move_to_end(spec.grammar)
    if matcher is None:
        matcher = _llguidance().LLMatcher(lltok, spec.grammar, log_level=0)
        if matcher.is_error():
            raise Qwen2Error(f"{spec.what} cannot be used: {_one_line(matcher.get_error())}")
        _check_matches_something(matcher, lltok, spec.what)
        with _lock:
            grammars[spec.grammar] = matcher
            while len(grammars) > GRAMMAR_CACHE_SIZE:
                grammars.popitem(last=False)
    return Constraint(spec, matcher, lltok.vocab_size, vocab_size)


def _check_matches_something(matcher, lltok, what: str) -> None:
    """A grammar that allows neither a first token nor an empty reply matches no text at all."""
    bits = _llguidance().torch.allocate_token_bitmask(1, lltok.vocab_size)
    _llguidance().torch.fill_next_token_bitmask(matcher, bits)
    if matcher.is_error() or not (matcher.is_accepting() or _allowed_ids(bits, lltok.vocab_size).any()):
        raise Qwen2Error(f"{what} matches no text at all; give one that some text can match")


def _allowed_ids(bits: torch.Tensor, n: int) -> np.ndarray:
    """llguidance's bitmask (int32 words, bit i of word w = token 32 w + i) as n booleans."""
    return np.unpackbits(bits.numpy().view(np.uint8), bitorder="little")[:n].astype(bool)


def _one_line(message: str) -> str:
    """llguidance's error text, which may quote the grammar over several lines with a caret, as one line."""
    lines = [line.strip() for line in message.splitlines()]
    kept = [line for line in lines if line and set(line) != {"^"} and not line.split("|")[0].strip().isdigit()
            and not line.startswith(("<state>", "<grammar>"))]
    text = " ".join(kept[:4]) or "unknown error"
    return text if len(text) <= 400 else text[:397] + "..."


class Constraint:
    """A compiled constraint, shared by every row that asks for it; `start()` gives a row its parser."""

    def __init__(self, spec: GrammarSpec, matcher, tokenizer_vocab: int, vocab_size: int):
        self.spec, self._matcher = spec, matcher
        self.tokenizer_vocab, self.vocab_size = tokenizer_vocab, vocab_size

    def start(self) -> "RowConstraint":
        return RowConstraint(self._matcher.deep_copy(), self.tokenizer_vocab, self.vocab_size)

    def __repr__(self) -> str:
        return f"Constraint({self.spec.what})"


class RowConstraint:
    """One row's parser state: which tokens it allows next (`allowed_into`, `mask`), then `accept`
    the token chosen."""

    def __init__(self, matcher, tokenizer_vocab: int, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._bits = _llguidance().torch.allocate_token_bitmask(1, tokenizer_vocab)
        self._n = min(tokenizer_vocab, vocab_size)

    def allowed_into(self, out: np.ndarray) -> None:
        """Write the tokens allowed next into `out` (vocab_size booleans). Rows of the embedding beyond
        the tokenizer's ids (151,936 against 151,665 for Qwen2.5's tokenizer.json) have no text: never."""
        _llguidance().torch.fill_next_token_bitmask(self.matcher, self._bits)
        out[:self._n] = _allowed_ids(self._bits, self._n)
        out[self._n:] = False

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (V,) -> a copy with every token the grammar cannot take next at -inf."""
        allowed = np.empty(self.vocab_size, dtype=bool)
        self.allowed_into(allowed)
        return masked_logits(logits, torch.from_numpy(allowed))

    def accept(self, token: int) -> None:
        """Advance past `token` (one the mask allowed). After the end, the end ids are all it allows."""
        if not self.matcher.consume_token(token):
            raise Qwen2Error(f"the constraint refused token {token} that its own mask allowed: "
                             f"{_one_line(self.matcher.get_error())}")

    @property
    def finished(self) -> bool:
        """The text so far is a complete match (an end id may follow)."""
        return self.matcher.is_accepting()


def masked_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    # -inf as a Python scalar: with a 0-d tensor there torch.where takes a path ~100x slower on CPU
    return torch.where(allowed.to(logits.device, non_blocking=True), logits, -math.inf)


def constrained_choice(rows: Sequence[RowConstraint | None]):
    """A `next_token` (same signature) for a batch whose row i is held by rows[i] (None: free):
    the logits masked by each row's constraint, in one op for the batch, then each constraint told
    its row's token."""
    held = [(i, row) for i, row in enumerate(rows) if row is not None]
    if not held:
        return next_token
    vocab_size = held[0][1].vocab_size
    allowed = np.ones((len(rows), vocab_size), dtype=bool)  # free rows stay all True
    allowed_t = torch.from_numpy(allowed)  # shares its memory

    def choose(logits: torch.Tensor, params, seen=None, generator=None) -> torch.Tensor:
        for i, row in held:
            row.allowed_into(allowed[i])
        tokens = next_token(masked_logits(logits, allowed_t), params, seen, generator)
        chosen = tokens.tolist()
        for i, row in held:
            row.accept(chosen[i])
        return tokens
    return choose


def row_constraints(n_rows: int, tokenizer, eos_ids: Sequence[int], vocab_size: int,
                    **requested) -> list[Constraint | None] | None:
    """The constraint of each of `n_rows` prompts from generate()'s json_schema= / regex= / grammar=:
    each one value for every row, or (several prompts) a list with one per row, None for a free row.
    None when nothing is asked. Everything is compiled (and checked) here, before any generation."""
    per_row: list[dict] = [{} for _ in range(n_rows)]
    for kind, value in requested.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            if len(value) != n_rows:
                raise Qwen2Error(f"{kind} has {len(value)} entries for {n_rows} prompt(s); give one per prompt "
                                 "or a single value for all")
            for row, item in enumerate(value):
                per_row[row][kind] = item
        else:
            for row in per_row:
                row[kind] = value
    if not any(v is not None for row in per_row for v in row.values()):
        return None
    compiled: dict[str, Constraint] = {}  # one compile per distinct spec in the batch
    out = []
    for row in per_row:
        spec = requested_spec(**row)
        if spec is not None and spec.grammar not in compiled:
            compiled[spec.grammar] = compile_constraint(spec, tokenizer, eos_ids, vocab_size)
        out.append(None if spec is None else compiled[spec.grammar])
    return out
