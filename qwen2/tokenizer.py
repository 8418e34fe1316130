"""Qwen2's tokenizer: byte-level BPE on the Hugging Face `tokenizers` library, plus chat templates.

Encoding runs the same pipeline as transformers' `Qwen2Tokenizer`, token for token:

    text -> NFC -> cut by Qwen2's split regex -> each byte spelled as one of GPT-2's 256 printable
    characters -> BPE merges -> ids

Only the vocabulary, the merges and the added tokens come from the checkpoint (a GGUF's metadata or a
Hugging Face directory). The rest of the pipeline is fixed, because it is what the merges were learned
with; transformers' `Qwen2Tokenizer` likewise rebuilds it rather than trusting a tokenizer.json.

Added tokens (`<|im_start|>`, `<tool_call>`, ...) are matched whole before anything else, so they
never get cut into pieces. Each is *special* or not, as in the reference, which decides what
`decode(..., skip_special_tokens=True)` drops: GGUF control tokens are special, user-defined ones
(Qwen2.5's `<tool_call>` / `</tool_call>`) are not.

One deliberate difference from transformers: its GGUF loader forgets the NFC step (its saved and
reloaded copy of the same tokenizer has it again). We always apply NFC, so text that is not in NFC
(e.g. "e" + combining acute) encodes as Qwen2's tokenizer.json does, not as that loader does.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

from .errors import Qwen2Error
from .fileio import write_text_atomic

# Qwen2's pre-tokenisation: English contractions, letter runs (with one leading non-letter, e.g. a
# space), single digits (so numbers are spelt digit by digit), punctuation runs, newline runs, spaces.
SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The template of the first Qwen2 instruct models, for checkpoints that bring none.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Tokens that end a turn in every Qwen2 model (instruct models end replies with <|im_end|>, base
# models and raw completions with <|endoftext|>), so generation stops at either whatever the
# checkpoint names as its one EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>")

# llama.cpp's names for pre-tokenisers that use exactly SPLIT_REGEX.
QWEN2_PRE_TOKENIZERS = frozenset({"qwen2", "deepseek-r1-qwen", "megrez", "kormo", "f2llmv2"})

# GGUF `tokenizer.ggml.token_type` values that become added tokens.
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4

# Qwen2Tokenizer's defaults for a tokenizer_config.json that leaves a name out.
_HF_DEFAULT_NAMED = {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                     "unk_token": "<|endoftext|>"}


@dataclass(frozen=True)
class AddedTokenSpec:
    """A token matched whole in text before BPE runs. `special` ones are dropped by
    `decode(skip_special_tokens=True)`."""
    id: int
    content: str
    special: bool


class Tokenizer:
    """Qwen2's tokenizer. Build it with `from_gguf_metadata` or `from_dir`."""

    def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]],
                 added_tokens: Iterable[AddedTokenSpec] = (), *, eos_token: str = "<|endoftext|>",
                 pad_token: str | None = None, bos_token: str | None = None, unk_token: str | None = None,
                 chat_template: str | None = None, extra_eos_ids: Iterable[int] = (),
                 vocab_size: int | None = None, model_max_length: int | None = None):
        """`vocab` maps byte-level token spellings to ids; `merges` are BPE merge pairs, best first.
        The named tokens (`eos_token`, ...) are token contents; they are always special added tokens."""
        vocab = dict(vocab)
        added = {spec.id: spec for spec in added_tokens}
        self._named = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "unk_token": unk_token}
        for content in filter(None, self._named.values()):
            spec = _named_token_spec(content, vocab, added)
            added[spec.id] = spec
        for spec in added.values():  # an added token's id is the one it was given, even if not in `vocab`
            vocab[spec.content] = spec.id
        self._added = dict(sorted(added.items()))
        self._backend = _build_backend(vocab, merges, self._added.values())
        self._plain_backend = _without_added_tokens(self._backend)

        self.vocab_size = max(vocab_size or 0, max(vocab.values(), default=-1) + 1)
        self.eos_token_id = vocab[eos_token]
        self.pad_token_id = vocab[pad_token] if pad_token else self.eos_token_id
        self.bos_token_id = vocab[bos_token] if bos_token else None
        ends = [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
        self.eos_token_ids = list(dict.fromkeys([self.eos_token_id, *extra_eos_ids, *ends]))
        self.chat_template = chat_template
        self.model_max_length = model_max_length

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> "Tokenizer":
        """From GGUF metadata (see `qwen2.checkpoint.gguf.read_metadata`): llama.cpp's key names."""
        tokens, merges = _gguf_vocab_and_merges(meta)
        vocab = {token: i for i, token in enumerate(tokens)}
        token_types = meta.get("tokenizer.ggml.token_type") or ()
        if token_types and len(token_types) != len(tokens):
            raise Qwen2Error(f"GGUF tokenizer has {len(tokens)} tokens but {len(token_types)} token types; "
                             "the file is damaged, convert the model again")

        def named(key: str) -> str | None:
            token_id = meta.get(f"tokenizer.ggml.{key}")
            if token_id is None:
                return None
            if not 0 <= token_id < len(tokens):
                raise Qwen2Error(f"GGUF tokenizer.ggml.{key} = {token_id} is outside the vocabulary of "
                                 f"{len(tokens)} tokens; the file is damaged, convert the model again")
            return tokens[token_id]

        eos = named("eos_token_id") or next((t for t in END_OF_TURN_TOKENS if t in vocab), None)
        if eos is None:
            raise Qwen2Error("GGUF tokenizer names no end-of-sequence token (tokenizer.ggml.eos_token_id); "
                             "this is not a Qwen2 tokenizer, convert the model again with llama.cpp")
        extra_eos = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
        arch = meta.get("general.architecture", "qwen2")
        return cls(vocab, merges, _gguf_added_tokens(tokens, token_types),
                   eos_token=eos, pad_token=named("padding_token_id"), bos_token=named("bos_token_id"),
                   unk_token=named("unknown_token_id"), chat_template=meta.get("tokenizer.chat_template"),
                   extra_eos_ids=[i for i in extra_eos if 0 <= i < len(tokens)], vocab_size=len(tokens),
                   model_max_length=meta.get(f"{arch}.context_length"))

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """From a Hugging Face model directory: tokenizer.json (or vocab.json + merges.txt), with
        tokenizer_config.json, chat_template.jinja, generation_config.json and config.json if present."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise Qwen2Error(f"no such directory: {path}; pass a Hugging Face model directory")
        vocab, merges, added = _read_vocab_files(path)
        config = _read_json(path, "tokenizer_config.json") or {}
        added.update(_parse_added_tokens_decoder(config.get("added_tokens_decoder") or {}))
        named = {name: _token_content(config.get(name, default)) for name, default in _HF_DEFAULT_NAMED.items()}
        if named["eos_token"] is None:
            named["eos_token"] = _HF_DEFAULT_NAMED["eos_token"]
        model_config = _read_json(path, "config.json") or {}
        eos_ids = [*_ids(_read_json(path, "generation_config.json") or {}), *_ids(model_config)]
        return cls(vocab, merges, added.values(), **named, chat_template=_read_chat_template(path, config),
                   extra_eos_ids=eos_ids, vocab_size=model_config.get("vocab_size"),
                   model_max_length=_plausible_max_length(config.get("model_max_length")))

    # ---- saving -------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json into directory `path`, so that both
        `transformers.AutoTokenizer.from_pretrained(path)` and `Tokenizer.from_dir(path)` load this
        tokenizer again. Each file is replaced atomically."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        write_text_atomic(os.path.join(path, "tokenizer.json"), self._backend.to_str(pretty=True))
        write_text_atomic(os.path.join(path, "tokenizer_config.json"),
                      json.dumps(self._tokenizer_config(), indent=2, ensure_ascii=False))
        # transformers prefers chat_template.jinja over the config's template: keep an old one in step.
        jinja_path = os.path.join(path, "chat_template.jinja")
        if os.path.exists(jinja_path):
            if self.chat_template is None:
                os.remove(jinja_path)
            else:
                write_text_atomic(jinja_path, self.chat_template)

    def _tokenizer_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "tokenizer_class": "Qwen2Tokenizer",
            "add_bos_token": False,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "errors": "replace",
            "split_special_tokens": False,
            **self._named,
            "added_tokens_decoder": {
                str(spec.id): {"content": spec.content, "lstrip": False, "normalized": False, "rstrip": False,
                               "single_word": False, "special": spec.special}
                for spec in self._added.values()
            },
        }
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return config

    # ---- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. Added tokens written in the text (`<|im_start|>`) become their single
        id. Qwen2 adds no BOS or EOS."""
        return self._encoding(text).ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` as plain text: an added token's string in it (`<|fim_prefix|>`,
        `<|im_end|>`) is spelt out by BPE like any other text, never read as that token. For text
        from a user that goes between special ids of a prompt built in ids (fill-in-the-middle),
        which it must not be able to end or restructure."""
        return self._encoding(text, self._plain_backend).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode(text)` and, for each token, the [start, end) character span of `text` it came
        from (training uses them to find which tokens belong to which chat turn)."""
        encoding = self._encoding(text)
        return encoding.ids, [tuple(o) for o in encoding.offsets]

    def _encoding(self, text: str, backend: _Backend | None = None):
        if not isinstance(text, str):
            raise Qwen2Error(f"encode takes a str, not {type(text).__name__}")
        try:
            return (backend or self._backend).encode(text, add_special_tokens=False)
        except TypeError:  # tokenizers refuses lone surrogates; say where, not "TextInputSequence must be str"
            raise Qwen2Error(unicode_problem(text) or "tokenizers cannot encode this text") from None

    def decode(self, ids: Iterable[int] | int, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; bytes that do not form valid UTF-8 come out as U+FFFD."""
        if hasattr(ids, "tolist"):  # a tensor or array
            ids = ids.tolist()
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The token's spelling (byte-level alphabet, e.g. "Ġhello"), or None for an unknown id."""
        return self._backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    @property
    def added_tokens(self) -> list[AddedTokenSpec]:
        return list(self._added.values())

    def __len__(self) -> int:
        return self.vocab_size

    # ---- chat ---------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = False, tools: Sequence[Mapping[str, Any]] | None = None,
                            chat_template: str | None = None, **kwargs) -> str | list[int]:
        """Render a conversation with `chat_template`, by default the model's, as transformers does:
        same jinja settings and helpers, same variables (messages, tools, add_generation_prompt, the
        named special tokens, and any `kwargs`). A model without a template gets Qwen2's ChatML."""
        if not messages:
            raise Qwen2Error("cannot apply the chat template to an empty conversation; pass at least one message")
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise Qwen2Error("tools must be JSON-schema dicts ({'type': 'function', 'function': {...}})")
        # Like transformers: drop None fields, since templates test for a key's presence (content=None
        # from OpenAI-style messages would otherwise render as "None").
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        for position, message in enumerate(messages):  # name the message, not a place in the rendered prompt
            content = message.get("content")
            problem = unicode_problem(content) if isinstance(content, str) else None
            if problem:
                raise Qwen2Error(f"message {position} ({message.get('role')}): {problem}")
        named = {name: content for name, content in self._named.items() if content is not None}
        variables = {"documents": None, **named, **kwargs}
        template = _compile_template(chat_template or self.chat_template or CHATML_TEMPLATE)
        try:
            text = template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                   **variables)
        except Exception as e:  # jinja2 errors, and raise_exception() from the template itself
            raise Qwen2Error(f"the chat template rejected these messages: {e}") from None
        return self.encode(text) if tokenize else text


class StreamDecoder:
    """Incremental detokeniser for generation: `push` ids one at a time and get the text that became
    final. The pieces (plus `flush()` at the end) concatenate to `decode(all ids)`.

    A multi-byte character can be split across tokens; decoding the first part alone gives U+FFFD. So
    the ids since the last emitted piece are held back while their text ends in U+FFFD. Emitting only
    at complete characters is also what makes the concatenation exact: UTF-8 decoding restarts cleanly
    after a complete character, so decoding the pending ids alone gives the same text as decoding them
    after everything before."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._pending: list[int] = []

    def push(self, token_id: int) -> str:
        """The text that `token_id` completes, possibly ""."""
        self._pending.append(int(token_id))
        text = self._tokenizer.decode(self._pending, self._skip_special)
        if text.endswith("\ufffd"):
            return ""
        self._pending.clear()
        return text

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character comes out as U+FFFD); call at the end."""
        text = self._tokenizer.decode(self._pending, self._skip_special)
        self._pending.clear()
        return text


# ---- building the backend -------------------------------------------------------------------------

def unicode_problem(text: str) -> str | None:
    """None for text UTF-8 can encode; else which character cannot be: a lone surrogate (e.g. from a
    JSON "\\ud800" escape), or a byte of non-UTF-8 input that Python kept as one (argv, stdin)."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as error:
        at, code = error.start, ord(text[error.start])
    what = f"a lone surrogate (U+{code:04X})"
    if 0xDC80 <= code <= 0xDCFF:  # Python's surrogateescape
        what += f", as Python keeps the byte 0x{code - 0xDC00:02x} of input that is not UTF-8"
    return (f"the text is not valid Unicode: character {at} is {what}; send UTF-8 text "
            "(re-encode it, e.g. with iconv -t UTF-8, or drop that character)")


def _build_backend(vocab: dict[str, int], merges: Sequence[tuple[str, str]],
                   added: Iterable[AddedTokenSpec]) -> _Backend:
    """The `tokenizers` pipeline of transformers' Qwen2Tokenizer, from Python objects directly
    (no JSON round trip: this takes a fraction of a second for Qwen2's 151k tokens)."""
    try:
        backend = _Backend(BPE(vocab=vocab, merges=list(merges), dropout=None, unk_token=None,
                               continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                               byte_fallback=False))
    except Exception as e:  # the Rust side rejects merges of tokens that are not in the vocabulary
        raise Qwen2Error(f"inconsistent tokenizer vocabulary and merges ({e}); the tokenizer files are damaged") from None
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # the regex above already split
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # normalized=False: added tokens are matched in the raw text, before NFC.
    specs = list(added)
    backend.add_special_tokens([AddedToken(s.content, normalized=False, special=True) for s in specs if s.special])
    backend.add_tokens([AddedToken(s.content, normalized=False, special=False) for s in specs if not s.special])
    return backend


def _without_added_tokens(backend: _Backend) -> _Backend:
    """The same pipeline with no added tokens: it shares `backend`'s BPE model (no copy of the
    vocabulary), so building it costs microseconds."""
    plain = _Backend(backend.model)
    plain.normalizer, plain.pre_tokenizer = backend.normalizer, backend.pre_tokenizer
    plain.decoder, plain.post_processor = backend.decoder, backend.post_processor
    return plain


def _named_token_spec(content: str, vocab: Mapping[str, int], added: Mapping[int, AddedTokenSpec]) -> AddedTokenSpec:
    """The special added token for a named token (EOS, PAD, ...), appended to the id space if the
    vocabulary lacks it, as transformers does for a vocab.json without it."""
    for spec in added.values():
        if spec.content == content:
            return AddedTokenSpec(spec.id, content, True)
    if content in vocab:
        return AddedTokenSpec(vocab[content], content, True)
    next_id = max([*vocab.values(), *added], default=-1) + 1
    return AddedTokenSpec(next_id, content, True)


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's spelling of bytes as printable characters: printable Latin-1 bytes stand for
    themselves, the other 68 bytes get the code points from U+0100 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


# ---- GGUF -----------------------------------------------------------------------------------------

def _gguf_vocab_and_merges(meta: Mapping[str, Any]) -> tuple[list[str], list[tuple[str, str]]]:
    """Tokens and merge pairs from GGUF metadata, checked to be a Qwen2-style byte-level BPE."""
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        raise Qwen2Error("the GGUF file has no tokenizer (no tokenizer.ggml.model); "
                         "use a GGUF converted with its tokenizer, or the Hugging Face model directory")
    if model != "gpt2":
        raise Qwen2Error(f"the GGUF tokenizer is {model!r}, but Qwen2 uses byte-level BPE ('gpt2'); "
                         "this file is not a Qwen2 model")
    pre = meta.get("tokenizer.ggml.pre")
    if pre is not None and pre not in QWEN2_PRE_TOKENIZERS:
        raise Qwen2Error(f"the GGUF tokenizer splits text the {pre!r} way, not Qwen2's ('qwen2'); "
                         "this file is not a Qwen2 model")
    tokens = list(meta.get("tokenizer.ggml.tokens") or ())
    raw_merges = meta.get("tokenizer.ggml.merges") or ()
    if not tokens or not raw_merges:
        raise Qwen2Error("the GGUF tokenizer has no tokens or no merges; the file is damaged, convert the model again")
    # A byte-level vocabulary is spelt in the byte alphabet; a converter that stored some tokens as
    # plain text gets them respelt, as transformers does (Qwen2 GGUFs from llama.cpp need none).
    alphabet = set(_byte_alphabet().values())
    tokens = [t if set(t) <= alphabet else _respell(t) for t in tokens]
    return tokens, [_merge_pair(m) for m in raw_merges]


def _respell(token: str) -> str:
    table = _byte_alphabet()
    return "".join(table[b] for b in token.encode("utf-8"))


def _merge_pair(merge: str | Sequence[str]) -> tuple[str, str]:
    """A merge as a pair: GGUF and old tokenizer.json write "a b", newer tokenizer.json ["a", "b"]."""
    pair = merge.split(" ") if isinstance(merge, str) else list(merge)
    if len(pair) != 2:
        raise Qwen2Error(f"malformed BPE merge {merge!r}; the tokenizer files are damaged")
    return pair[0], pair[1]


def _gguf_added_tokens(tokens: Sequence[str], token_types: Sequence[int]) -> list[AddedTokenSpec]:
    """Control tokens become special added tokens, user-defined ones plain added tokens (transformers'
    rule). A "control" token spelt outside the byte alphabet is a converter's mislabel and is skipped."""
    alphabet = set(_byte_alphabet().values())
    added = []
    for i, (token, kind) in enumerate(zip(tokens, token_types)):
        if kind == GGUF_CONTROL and set(token) <= alphabet:
            added.append(AddedTokenSpec(i, token, True))
        elif kind == GGUF_USER_DEFINED:
            added.append(AddedTokenSpec(i, token, False))
    return added


# ---- Hugging Face directories ----------------------------------------------------------------------

def _read_vocab_files(path: str) -> tuple[dict[str, int], list[tuple[str, str]], dict[int, AddedTokenSpec]]:
    """Vocabulary, merges and added tokens from tokenizer.json, or else vocab.json + merges.txt."""
    tokenizer_json = _read_json(path, "tokenizer.json")
    if tokenizer_json is not None:
        model = tokenizer_json.get("model") or {}
        if model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise Qwen2Error(f"{path}/tokenizer.json holds a {model.get('type')} tokenizer, not Qwen2's BPE; "
                             "this is not a Qwen2 model")
        added = _parse_added_tokens(tokenizer_json.get("added_tokens") or [])
        return model["vocab"], [_merge_pair(m) for m in model.get("merges") or ()], added
    vocab = _read_json(path, "vocab.json")
    merges_path = os.path.join(path, "merges.txt")
    if vocab is None or not os.path.isfile(merges_path):
        raise Qwen2Error(f"no tokenizer in {path}: it needs tokenizer.json, or vocab.json and merges.txt; "
                         "copy them from the model's Hugging Face repository")
    with open(merges_path, encoding="utf-8") as f:
        lines = [line.rstrip("\r\n") for line in f]
    return vocab, [_merge_pair(line) for line in lines if line and not line.startswith("#version")], {}


def _parse_added_tokens(entries: Iterable[Mapping[str, Any]]) -> dict[int, AddedTokenSpec]:
    """tokenizer.json's "added_tokens": [{"id", "content", "special", ...}]."""
    return {int(e["id"]): AddedTokenSpec(int(e["id"]), e["content"], bool(e.get("special", False)))
            for e in entries}


def _parse_added_tokens_decoder(decoder: Mapping[str, Mapping[str, Any]]) -> dict[int, AddedTokenSpec]:
    """tokenizer_config.json's "added_tokens_decoder": {"<id>": {"content", "special", ...}}."""
    return _parse_added_tokens({**entry, "id": token_id} for token_id, entry in decoder.items())


def _token_content(value: Any) -> str | None:
    """A named token in tokenizer_config.json: a string, or an AddedToken dict with its content."""
    return value.get("content") if isinstance(value, Mapping) else value


def _ids(config: Mapping[str, Any]) -> list[int]:
    """The "eos_token_id" of a config.json / generation_config.json: one id or a list."""
    value = config.get("eos_token_id")
    return [value] if isinstance(value, int) else [i for i in value or () if isinstance(i, int)]


def _plausible_max_length(value: Any) -> int | None:
    """transformers writes 1e30 for "no limit"; treat that as unknown."""
    return value if isinstance(value, int) and value < 1 << 40 else None


def _read_chat_template(path: str, config: Mapping[str, Any]) -> str | None:
    """chat_template.jinja wins over tokenizer_config.json, as in transformers. A config with named
    templates (a list of {"name", "template"}) contributes its "default" one."""
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template") or (_read_json(path, "chat_template.json") or {}).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _read_json(path: str, name: str) -> Any:
    """A JSON file in directory `path`, or None if it is absent."""
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Qwen2Error(f"cannot read {file} ({e}); restore the file from the model's repository") from None


# ---- chat templates -------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def _compile_template(source: str):
    """A jinja template compiled the way transformers compiles chat templates: sandboxed,
    trim_blocks + lstrip_blocks, loop controls, and its helpers (`raise_exception`, a `tojson` that
    does not HTML-escape, `strftime_now`). `{% generation %}` blocks render their body."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """transformers uses `{% generation %}` to find assistant tokens; rendering ignores it."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise Qwen2Error(f"the model's chat template is not valid jinja ({e}); fix or replace its chat_template") from None
