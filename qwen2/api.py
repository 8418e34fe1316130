"""`qwen2.load(...)`: a model, its tokenizer and its generation defaults in one object."""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import torch

from .checkpoint import DEFAULT_MODEL, build_model, load_checkpoint
from .errors import Qwen2Error
from .generate import SamplingParams, generate_text, stream_rows

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise Qwen2Error(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


class Qwen2:
    """What `qwen2.load` returns: `.model` (nn.Module), `.tokenizer`, `.config`, `.generate`, `.chat`."""

    def __init__(self, model, tokenizer, generation_config: dict | None = None, source: str = ""):
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        self.generation_config = generation_config or {}
        self.source = source

    @property
    def eos_ids(self) -> list[int]:
        """Every id that ends a reply: generation_config's, the tokenizer's and the config's."""
        ids = self.generation_config.get("eos_token_id")
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        for more in (self.tokenizer.eos_token_ids if self.tokenizer else [], self.config.eos_token_ids):
            ids += [i for i in more if i not in ids]
        return ids

    def sampling(self, **options) -> SamplingParams:
        return SamplingParams.from_generation_config(self.generation_config, **options)

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise Qwen2Error(f"{self.source} has no tokenizer files (tokenizer.json or vocab.json + merges.txt); "
                             "add them to generate text")
        return self.tokenizer

    def generate(self, prompt: str | Sequence[str], stream: bool = False, **sampling) -> str | list[str] | Iterator[str]:
        """Continue `prompt` (a string, or a list of strings decoded as one batch).

        Sampling options: max_new_tokens, temperature (0 = greedy), top_k, top_p, min_p,
        repetition_penalty, seed, stop. With stream=True (single prompt), an iterator of text pieces.
        """
        tokenizer = self._require_tokenizer()
        batch = not isinstance(prompt, str)
        prompts = list(prompt) if batch else [prompt]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise Qwen2Error("prompt must be a non-empty string or a non-empty list of strings")
        params = self.sampling(**sampling)
        ids = [tokenizer.encode(p) for p in prompts]
        if stream:
            if batch:
                raise Qwen2Error("stream=True takes one prompt, not a list")
            return (piece for _, piece in stream_rows(self.model, tokenizer, ids, params, self.eos_ids))
        texts = generate_text(self.model, tokenizer, ids, params, self.eos_ids)
        return texts if batch else texts[0]

    def chat(self, messages: list[dict], tools: list[dict] | None = None, stream: bool = False,
             **sampling) -> str | Iterator[str]:
        """The assistant's reply to a conversation (OpenAI-style messages), via the model's chat template."""
        if not isinstance(messages, list) or not messages:
            raise Qwen2Error("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        prompt = self._require_tokenizer().apply_chat_template(messages, add_generation_prompt=True,
                                                               tokenize=False, tools=tools)
        return self.generate(prompt, stream=stream, **sampling)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """Write an HF model directory (config.json, safetensors, tokenizer, generation_config.json)
        that transformers' `from_pretrained` and `qwen2.load` both read. Atomic."""
        from .checkpoint.hf import save_hf_dir

        save_hf_dir(path, self.config, self.model.state_dict(), self.tokenizer, self.generation_config,
                    overwrite=overwrite)

    def __repr__(self) -> str:
        c = self.config
        return (f"Qwen2({self.source!r}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"dtype={self.model.dtype})")


def load(source: str | os.PathLike = DEFAULT_MODEL, dtype: str | torch.dtype = torch.float32,
         device: str | torch.device = "cpu", progress: bool = True) -> Qwen2:
    """Load a model by registry name (e.g. "qwen2.5-coder-0.5b-instruct"), HF directory or .gguf file."""
    config, state_dict, tokenizer, generation_config = load_checkpoint(source, progress=progress)
    model = build_model(config, state_dict, dtype=parse_dtype(dtype), device=device)
    return Qwen2(model, tokenizer, generation_config, source=os.fspath(source))
