"""`qwen2.load(...)`: a model, its tokenizer and its generation defaults in one object."""
from __future__ import annotations

import functools
import os
import weakref
from typing import Iterator, Sequence

from .checkpoint import DEFAULT_MODEL, build_model, build_quantized, load_checkpoint
from .errors import Qwen2Error
from .options import LoadOptions
from .runtime.compile import check_compilable
from .runtime.executor import make_decoder
from .runtime.generate import SamplingParams, decode_steps, generate_text, stream_rows

# the compiled executor's traced decode step would not see which adapter each batch's rows take
COMPILED_WITH_ADAPTERS = "LoRA adapters are not served with executor='compiled'; load with executor='auto'"


class Qwen2:
    """What `qwen2.load` returns: `.model` (the nn.Module), `.decoder` (the executor generation runs it
    through: qwen2/runtime/executor.py), `.tokenizer`, `.config`, `.generate`, `.chat`, and `.options`,
    the `LoadOptions` it was loaded with."""

    def __init__(self, model, tokenizer, generation_config: dict | None = None, source: str = "", decoder=None,
                 options: LoadOptions | None = None):
        self.model = model
        self._options = options
        self._decoder = decoder
        self.tokenizer = tokenizer
        self.generation_config = generation_config or {}
        self.source = source
        self._drafts: dict[str, Qwen2] = {}  # draft models loaded by name for speculative decoding
        self._checked_drafts = weakref.WeakSet()  # drafts whose tokenizer matched ours (a 151k-entry compare)
        self._adapters = None  # the LoRA adapters served over .model (qwen2.adapters.AdapterSet), once one is added

    @property
    def config(self):
        """The model's config (a continued training may have changed its position encoding)."""
        return self.model.config

    @property
    def decoder(self):
        """The executor over `.model` (made again, the fastest that applies, when `.model` is replaced)."""
        if self._decoder is None or self._decoder.model is not self.model:
            self._decoder = make_decoder(self.model)
        return self._decoder

    @property
    def options(self) -> LoadOptions:
        """The options `qwen2.load` built this model with; for one made directly, its dtype and device."""
        if self._options is None:
            return LoadOptions(dtype=self.model.dtype, device=self.model.device)
        return self._options

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

    def generate(self, prompt: str | Sequence[str], stream: bool = False, speculative=None, draft_model=None,
                 num_draft_tokens: int | None = None, json_schema=None, regex=None, grammar=None,
                 adapter: str | Sequence[str | None] | None = None, **sampling) -> str | list[str] | Iterator[str]:
        """Continue `prompt` (a string, or a list of strings decoded as one batch).

        Sampling options: max_new_tokens, temperature (0 = greedy), top_k, top_p, min_p,
        repetition_penalty, seed, stop. With stream=True (single prompt), an iterator of text pieces.
        Speculative decoding (greedy, one prompt; the same text as plain greedy decoding, faster):
        speculative="prompt-lookup" (or a `qwen2.runtime.speculative` Drafter, whose `.stats` then holds the
        acceptance counts), or draft_model= a smaller Qwen2 with the same vocabulary (a loaded one,
        a registry name or a path); num_draft_tokens= tokens drafted per target forward.
        Structured output (`qwen2.runtime.constrained`, on llguidance): the reply must be JSON valid
        under json_schema= (a dict or its JSON text; {"type": "object"}: any object), match regex=
        as a whole, or be in the language of grammar= (Lark); with a list of prompts, one for all or a
        list with one per prompt (None: that row is free). Checked before any generation.
        LoRA adapters (`add_adapter`, or load's adapters=): adapter= the name of the one to use, or
        with a list of prompts, one name (or None: the base model) per prompt; rows on different
        adapters decode in one batch, nothing merged.
        """
        tokenizer = self._require_tokenizer()
        batch = not isinstance(prompt, str)
        prompts = list(prompt) if batch else [prompt]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise Qwen2Error("prompt must be a non-empty string or a non-empty list of strings")
        params = self.sampling(**sampling)
        steps = self._steps(len(prompts), batch, params, self.eos_ids, speculative=speculative, draft_model=draft_model,
                            num_draft_tokens=num_draft_tokens, json_schema=json_schema, regex=regex, grammar=grammar,
                            adapter=adapter)
        ids = [tokenizer.encode(p) for p in prompts]
        return self._decode(ids, params, steps, self.eos_ids, stream, batch, "stream=True takes one prompt, not a list")

    def _steps(self, n_rows: int, batch: bool, params: SamplingParams, end_ids: list[int], speculative, draft_model,
               num_draft_tokens, json_schema, regex, grammar, adapter):
        """The steps factory for generate's and infill's decoding options (None: plain decoding),
        each checked before any work; a constraint lets a row end at `end_ids`."""
        steps = self._speculative_steps(speculative, draft_model, num_draft_tokens, params, batch)
        steps = self._constrained_steps(steps, n_rows, end_ids, json_schema=json_schema, regex=regex, grammar=grammar)
        return self._adapter_steps(steps, adapter, n_rows)

    def _decode(self, ids, params: SamplingParams, steps, end_ids, stream: bool, batch: bool, one_only: str):
        """The texts (or, streamed, the one row's pieces) of prompts `ids`, ending at `end_ids`:
        what generate and infill share once their prompts and steps are built. `one_only` is the
        error for a streamed batch."""
        if stream:
            if batch:
                raise Qwen2Error(one_only)
            return (piece for _, piece in stream_rows(self.decoder, self.tokenizer, ids, params, end_ids, steps=steps))
        texts = generate_text(self.decoder, self.tokenizer, ids, params, end_ids, steps=steps)
        return texts if batch else texts[0]

    @property
    def adapters(self):
        """The LoRA adapters served over this model (`qwen2.adapters.AdapterSet`: `.names`), or None."""
        return self._adapters

    def add_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Serve the LoRA adapter in directory `path` (what `qwen2 train ... lora=true` writes, or HF
        PEFT's adapter_config.json + adapter_model.safetensors) as `name`, beside the base model and
        any others: `generate(..., adapter=name)`, or "model": name in a server request. An adapter
        that does not fit the model is a Qwen2Error naming it and the tensor."""
        from .adapters import read_adapter

        self._attach_adapter(read_adapter(name, path))

    def _attach_adapter(self, adapter) -> None:
        from .adapters import AdapterSet

        if self._adapters is None:
            if self.decoder.name == "compiled":
                raise Qwen2Error(COMPILED_WITH_ADAPTERS)
            self._adapters = AdapterSet(self.model)
        self._adapters.add(adapter)

    def _adapter_steps(self, steps, adapter, n_rows: int):
        """The steps factory with each row's adapter chosen before its forwards (`steps` itself on a
        model without adapters), the names checked before any work."""
        if self._adapters is None:
            if adapter is not None:
                raise Qwen2Error(f"no adapter named {adapter!r}: this model has no LoRA adapters loaded "
                                 "(qwen2.load(..., adapters={name: DIR}) or add_adapter)")
            return steps
        names = [adapter] * n_rows if adapter is None or isinstance(adapter, str) else list(adapter)
        if len(names) != n_rows:
            raise Qwen2Error(f"adapter= has {len(names)} names for {n_rows} prompts; give one per prompt "
                             "(None: the base model)")
        for name in names:
            if name is not None:
                self._adapters.index(name)  # a Qwen2Error naming an unknown one, before any work
        return self._adapters.steps_with(steps, names)

    def _constrained_steps(self, steps, n_rows: int, end_ids: list[int], **requested):
        """The steps factory for structured output (`steps` itself when none is asked for), each row's
        constraint compiled and checked before any work; a finished constraint allows `end_ids`."""
        if all(value is None for value in requested.values()):
            return steps
        from .runtime.constrained import constrained_choice, row_constraints

        if steps is not None:
            raise Qwen2Error("json_schema, regex and grammar cannot be combined with speculative decoding; drop one")
        constraints = row_constraints(n_rows, self._require_tokenizer(), end_ids, self.config.vocab_size, **requested)
        if constraints is None:  # a list of None: every row free
            return None
        return functools.partial(decode_steps, choose=constrained_choice([c and c.start() for c in constraints]))

    def _speculative_steps(self, speculative, draft_model, num_draft_tokens, params: SamplingParams, batch: bool):
        """The steps factory for the speculative options (None without them), checked before any work."""
        if speculative is None and draft_model is None and num_draft_tokens is None:
            return None
        from .runtime.speculative import check_greedy, check_vocab_compatible, make_drafter, steps_with

        if batch:
            raise Qwen2Error("speculative decoding takes one prompt, not a list")
        check_greedy(params)
        if isinstance(draft_model, (str, os.PathLike)) and speculative is None:  # else make_drafter says both
            draft_model = self._load_draft(draft_model)
        if isinstance(draft_model, Qwen2):
            self._check_draft_tokenizer(draft_model)
        if draft_model is not None:
            draft_config = getattr(draft_model, "config", None)
            if draft_config is not None:
                check_vocab_compatible(self.config.vocab_size, draft_config.vocab_size)
        return steps_with(make_drafter(speculative, draft_model, num_draft_tokens))

    def _load_draft(self, source) -> "Qwen2":
        """A draft model by name or path, loaded once per target (the target's dtype, device and progress)."""
        key = os.fspath(source)
        if key not in self._drafts:
            o = self.options
            self._drafts[key] = load(key, options=LoadOptions(dtype=o.dtype, device=o.device, progress=o.progress))
        return self._drafts[key]

    def _check_draft_tokenizer(self, draft: "Qwen2") -> None:
        if draft is self or draft in self._checked_drafts or self.tokenizer is None or draft.tokenizer is None:
            return
        if draft.tokenizer._backend.get_vocab() != self.tokenizer._backend.get_vocab():
            raise Qwen2Error(f"draft model {draft.source!r} has a different tokenizer vocabulary from {self.source!r}; "
                             "a draft model must share the target's tokenizer")
        self._checked_drafts.add(draft)

    def chat(self, messages: list[dict], tools: list[dict] | None = None, stream: bool = False,
             **sampling) -> str | Iterator[str]:
        """The assistant's reply to a conversation (OpenAI-style messages), via the model's chat template.
        Takes generate's options, speculative decoding's included."""
        if not isinstance(messages, list) or not messages:
            raise Qwen2Error("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        prompt = self._require_tokenizer().apply_chat_template(messages, add_generation_prompt=True,
                                                               tokenize=False, tools=tools)
        return self.generate(prompt, stream=stream, **sampling)

    def infill(self, prefix: str | Sequence[str], suffix: str | Sequence[str], stream: bool = False,
               speculative=None, draft_model=None, num_draft_tokens: int | None = None, json_schema=None, regex=None,
               grammar=None, adapter: str | Sequence[str | None] | None = None,
               **sampling) -> str | list[str] | Iterator[str]:
        """Fill in the middle (Qwen2.5-Coder's FIM, `qwen2.fim`): the text that goes between `prefix`
        and `suffix`, and only that. Generation stops at the FIM end tokens (`<|endoftext|>`,
        `<|fim_pad|>`, `<|file_sep|>`, `<|repo_name|>`) besides the model's end ids. Two strings, or
        two lists of strings of one length (one batch). Takes generate's options (a constrained middle
        may end at any of those end tokens); a model whose tokenizer has no FIM tokens is a Qwen2Error
        naming them."""
        from .fim import FimTokens

        tokenizer = self._require_tokenizer()
        fim = FimTokens.of(tokenizer)
        batch = isinstance(prefix, (list, tuple))
        if batch != isinstance(suffix, (list, tuple)) or batch and (len(prefix) != len(suffix) or not prefix):
            raise Qwen2Error("prefix and suffix must be two strings, or two non-empty lists of strings of one length")
        ids = [fim.prompt(tokenizer, p, s) for p, s in (zip(prefix, suffix) if batch else [(prefix, suffix)])]
        params, end_ids = self.sampling(**sampling), fim.stop_ids(self.eos_ids)
        steps = self._steps(len(ids), batch, params, end_ids, speculative=speculative, draft_model=draft_model,
                            num_draft_tokens=num_draft_tokens, json_schema=json_schema, regex=regex, grammar=grammar,
                            adapter=adapter)
        return self._decode(ids, params, steps, end_ids, stream, batch,
                            "stream=True takes one prefix and suffix, not lists")

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """Write an HF model directory (config.json, safetensors, tokenizer, generation_config.json)
        that transformers' `from_pretrained` and `qwen2.load` both read. Atomic."""
        from .checkpoint.hf import save_hf_dir

        if getattr(self.model, "quantization", None):
            raise Qwen2Error("a quantised model cannot be saved as an HF directory; save the fp32 model "
                             "(load without quantize=) and quantise it when loading")
        if self._adapters is not None:  # its linears are wrapped: the state dict is not an HF checkpoint's
            raise Qwen2Error("a model serving LoRA adapters cannot be saved as an HF directory; save the base model "
                             "(load it without adapters=), or merge one adapter with qwen2 train's merge_lora")
        save_hf_dir(path, self.config, self.model.state_dict(), self.tokenizer, self.generation_config,
                    overwrite=overwrite)

    def __repr__(self) -> str:
        c = self.config
        quantized = getattr(self.model, "quantization", None)
        if quantized:
            from .quant import describe
        return (f"Qwen2({self.source!r}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"dtype={self.model.dtype}" + (f", quantize={describe(self.model)!r}" if quantized else "") + ")")


def load(source: str | os.PathLike = DEFAULT_MODEL, options: LoadOptions | None = None,
         adapters: dict[str, str | os.PathLike] | None = None, **kwargs) -> Qwen2:
    """Load a model by registry name (e.g. "qwen2.5-coder-0.5b-instruct"), HF directory or .gguf file.

    How: `options`, a `qwen2.LoadOptions`, or its fields as keywords (over `options` when both):
    dtype ("float32", default; "bfloat16", "float16"), device ("cpu"), progress (True), quantize,
    group_size, quantize_lm_head, executor (or compile=True), rope_scaling, dca, long_context,
    expert_dtype. They are checked before anything is read; the model keeps them (`.options`).

    quantize="int8" (groups of 32), "int4" (group-wise, `group_size` 32/64/128, default 32;
    v_proj and down_proj stay int8) or "int4-pure" (all int4) turns the block linears into
    weight-only quantised ones at load time (CPU; activations stay in `dtype`). The lm_head is
    quantised to int8 in the int4 modes and kept fp32 in int8 mode (the accuracy mode);
    quantize_lm_head=True/False overrides that. From a GGUF (a registry model's too), tensors whose
    blocks our layouts hold exactly are taken as they are instead of requantised: in the int4 modes
    (group size 32) Q4_K, and Q6_K for the layers that are int8, as their own super-blocks
    (`qwen2.quant.kquant`), Q8_0 and Q5_0 as int8 (the layers that are int8). See `qwen2.quant`.
    On a Qwen2-MoE model every expert, routed and shared, is quantised by the same rules, the router
    and the shared-expert gate stay in `dtype`, and "int4" keeps the attention int8 (`qwen2.quant.moe`);
    with expert_dtype="bfloat16" a bf16 checkpoint's experts are quantised from bf16, never held in fp32.

    executor: how forwards run (`qwen2.runtime.executor`): "auto" (default: "native" on an fp32 CPU
    model where the native kernels build, else "eager"), "native", "eager" (PyTorch ops only), or
    "compiled": decode steps through `torch.compile` (`qwen2.runtime.compile`; compile=True says the
    same): the first step of each batch size compiles (tens of seconds), and a failed compilation
    falls back to eager.

    Long context (see `qwen2.long_context`; each overrides the checkpoint's own config):
    rope_scaling="yarn:4" (YaRN, factor 4 over the trained length; "yarn:4:32768" names that length),
    "dynamic-yarn:4" (plain RoPE until a sequence outgrows the trained length), a rope_scaling dict,
    or "none"; dca=True (Dual Chunk Attention, chunk_size = the trained length), a chunk size, or a
    dual_chunk_attention_config dict; long_context=True: the Qwen2.5 model cards' YaRN ×4 plus DCA.
    The usable context (what prompt + max_new_tokens may reach) grows with them.

    expert_dtype="bfloat16" (Qwen2-MoE models): the experts, routed and shared, are stored and run in
    bf16 while the rest stays in `dtype`: half their memory and, on CPUs with bf16 units, several
    times faster expert matmuls, for rounding the experts' inputs and outputs to bf16
    (`qwen2.model.moe.set_expert_dtype`). The experts are built in bf16 directly: a bf16 checkpoint's
    are never held in fp32.

    adapters={"name": DIR, ...}: LoRA adapters served beside the base model, chosen per prompt
    (`generate(..., adapter="name")`) or per server request ("model": "name"), rows on different
    adapters in one batch, nothing merged (`qwen2.adapters`). DIR is what `qwen2 train ... lora=true`
    writes or an HF PEFT LoRA directory (adapter_model.safetensors). An adapter that does not fit the
    base (shape, rank, a module it lacks) is a one-line Qwen2Error naming it and the tensor. Adapted
    blocks' decode steps run their linears from Python (the native executor computes only their
    attention), so a model with adapters decodes somewhat slower than without, even on the base rows."""
    from . import long_context as lc
    from . import quant as q

    options = LoadOptions.from_kwargs(options, **kwargs)  # every value checked here, before any file is read
    lora = _read_adapters(adapters)  # their files checked before the base's weights are read
    if lora and options.executor == "compiled":
        raise Qwen2Error(COMPILED_WITH_ADAPTERS)
    # the options' group_size is None outside the int4 modes
    group_size = q.DEFAULT_GROUP_SIZE if options.group_size is None else options.group_size
    config, weights, tokenizer, generation_config = load_checkpoint(
        source, progress=options.progress, quantize=options.quantize, group_size=group_size,
        lm_head=options.quantize_lm_head, dtype=options.dtype)
    config = lc.extend_config(config, rope_scaling=options.rope_scaling, dca=options.dca, preset=options.long_context)
    if options.expert_dtype is not None and not config.num_experts:
        raise Qwen2Error(f"expert_dtype applies to mixture-of-experts models; {os.fspath(source)} has no experts "
                         "(drop expert_dtype, or use dtype= for the whole model)")
    if options.executor == "compiled":
        check_compilable(config.dual_chunk_attention_config is not None)
    if options.quantize is None:
        model = build_model(config, weights, dtype=options.dtype, device=options.device,
                            expert_dtype=options.expert_dtype)
    else:  # from a GGUF, the quantised layers straight from its blocks (qwen2/checkpoint/quantized.py)
        model = build_quantized(config, weights, options.quantize, group_size=group_size,
                                lm_head=options.quantize_lm_head, dtype=options.dtype,
                                expert_dtype=options.expert_dtype, progress=options.progress)
        q.into_huge_pages(model)  # decode streams them from memory every token: 2 MB pages read faster
    del weights
    if model.device.type == "cpu":
        from . import kernels
        kernels.ops()  # built here, once per machine, so its notice comes before any answer, not inside one
        q.keep_heap_blocks()  # activations from malloc's heap, not fresh mappings faulted in op by op
    qwen = Qwen2(model, tokenizer, generation_config, source=os.fspath(source),
                 decoder=make_decoder(model, options.executor), options=options)
    for adapter in lora:
        qwen._attach_adapter(adapter)
    return qwen


def _read_adapters(adapters) -> list:
    """load's adapters= ({name: directory}) read and checked as far as their files tell."""
    if adapters is None:
        return []
    if not isinstance(adapters, dict):
        raise Qwen2Error(f"adapters must be a dict of name -> adapter directory, not {type(adapters).__name__}")
    from .adapters import read_adapter

    return [read_adapter(name, path) for name, path in adapters.items()]
