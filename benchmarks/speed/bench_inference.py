"""Side-by-side CPU inference benchmark: this project (fp32, int8, int4, compiled, prompt lookup) vs transformers
vs llama.cpp, same weights, same prompt.

First the parent process measures the machine's read bandwidth (the sum of a 1 GiB fp32 tensor, best of 5,
with --threads torch threads). Then every engine runs in a fresh subprocess of its own and is measured for:
  load s          time of the engine's load call (imports not included; reported apart)
  warm-up s       the first greedy run's prefill of the whole prompt and its first 4 decode steps, before
                  anything is timed: first-call costs (weight pages, allocator, kernels, and torch.compile for
                  the -compiled engines) land here, never in a tok/s number
  prefill tok/s   prompt tokens / time of one forward over the whole prompt into an empty KV cache
                  (median of --repeats runs; only the last position's logits)
  decode tok/s    --new-tokens greedy tokens through the KV cache after that prefill, each feeding back the
                  token it chose; tok/s = new tokens / time of those steps
  batch B tok/s   for each B of --batch-sizes: B different prompts (the prompt's pieces rotated, cut to
                  --prompt-tokens down to about half as many) prefilled as one batch (left-padded where the
                  engine needs it), 2 untimed decode steps, then --batch-new-tokens greedy steps of all rows
                  at once; aggregate tok/s = B * steps / time of those steps
  peak RSS MB     the process's high-water resident set (VmHWM) after the batch-1 measurements
  weight MB/token the weight bytes one decode forward reads: every linear layer's tensors (nn.Linear weight
                  and bias, a quantised linear's buffers) and the lm_head, not the token embedding (a step
                  reads one row of it); for llama.cpp the GGUF's tensors except token_embd.weight
  achieved GB/s   weight bytes x decode forwards per second (batch 1), and its share of the measured read
                  bandwidth (KV-cache and activation traffic left out)

Engines (--engines, comma-separated; the default is every one but the -compiled fp32/int8 ones, the -eager
ones and transformers-gguf):
  qwen2, qwen2-int8, qwen2-int4  `qwen2.load(...)` fp32 / quantize="int8" / quantize="int4" with the default
                                 executor ("auto": native decode steps where they apply), the static KV cache
                                 and `qwen2.runtime.generate.decode_steps` (the path `Qwen2.generate` uses)
  qwen2[-int8|-int4]-compiled    the same with `qwen2.load(..., executor="compiled")`
  qwen2[-int8|-int4]-eager       the same with `qwen2.load(..., executor="eager")` (PyTorch ops only)
  qwen2-int4-lookup              int4, decoding by prompt-lookup speculation (the steps
                                 `Qwen2.generate(speculative="prompt-lookup")` builds); the same process also
                                 runs plain int4 greedy decoding and checks the tokens are the same
  transformers                   `AutoModelForCausalLM.from_pretrained(<HF dir>, dtype=float32)` on the
                                 directory qwen2 converted (the same weights), default attention (sdpa),
                                 manual cache loop (attention mask and position ids for padded batches)
  llama.cpp                      `llama_cpp.Llama` on the GGUF file the weights came from (Q4_K_M: quantised,
                                 so smaller and faster by design), when `import llama_cpp` works; it is not a
                                 dependency. Batches go through the low-level batch API, one sequence id and
                                 one KV stream per prompt (no padding)
  transformers-gguf              (--transformers-gguf) transformers' own GGUF loader, slow: it dequantises in
                                 Python

Before the engines, a first process times `qwen2.load(MODEL)` and reports whether the converted cache was cold
(the load assembled/converted the GGUF) or already warm; the qwen2 engine's own load, in a new process right
after, is the second load. It also builds the prompts and reads the GGUF's tensor sizes.

Usage (from the repository root):
  python -m benchmarks.speed.bench_inference                    # 0.5B registry model, the default engines
  python -m benchmarks.speed.bench_inference --cold             # first load in an empty, temporary cache
  python -m benchmarks.speed.bench_inference --engines qwen2,llama.cpp --new-tokens 32 --batch-sizes ""
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Sequence

from benchmarks.common import (RESULTS_DIR, Engine, LlamaCppEngine, NotApplicable, build_batch_prompts,
                               build_prompt_ids, command_line, fmt, llama_cpp_installed, machine_facts,
                               peak_rss_mb, progress, rss_mb, set_torch_threads, spawn, timed, wait_for_quiet,
                               write_results)
from benchmarks.worker import run_worker

MODULE = "benchmarks.speed.bench_inference"
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
WARMUP_STEPS = 4  # decode steps after the first full prefill, untimed: first-call (and compile) costs stay out
BATCH_WARMUP_STEPS = 2  # untimed decode steps of each batch before its timed ones (a new batch size may compile)
BANDWIDTH_REPEATS = 5


@dataclass(frozen=True)
class Qwen2Variant:
    """One qwen2 engine: `qwen2.load` keyword arguments (the executor among them) and how it decodes."""
    load: dict
    speculative: str | None = None  # a `Qwen2.generate(speculative=...)` method; None: plain greedy


def qwen2_variants() -> dict[str, Qwen2Variant]:
    base = {"qwen2": {}, "qwen2-int8": {"quantize": "int8"}, "qwen2-int4": {"quantize": "int4"}}
    variants = {name: Qwen2Variant(kwargs) for name, kwargs in base.items()}
    for executor in ("compiled", "eager"):
        variants |= {f"{name}-{executor}": Qwen2Variant({**kwargs, "executor": executor})
                     for name, kwargs in base.items()}
    variants["qwen2-int4-lookup"] = Qwen2Variant({"quantize": "int4"}, speculative="prompt-lookup")
    return variants


QWEN2_ENGINES = qwen2_variants()
ALL_ENGINES = tuple(QWEN2_ENGINES) + ("transformers", "transformers-gguf", "llama.cpp")
ENGINES = ("qwen2", "qwen2-int8", "qwen2-int4", "qwen2-int4-compiled", "qwen2-int4-lookup", "transformers",
           "llama.cpp")  # the default: what the fast-inference issue asks to compare


class NotAvailable(Exception):
    """This engine cannot run with the installed code (e.g. an executor this qwen2.load does not know): the row
    says why."""


# --------------------------------------------------------------------------------------------------
# Measurements shared by the workers
# --------------------------------------------------------------------------------------------------

def measure_prefill(prefill, n_tokens: int, repeats: int, desc: str) -> dict:
    """Time `prefill()` (one forward over the prompt into an empty cache) `repeats` times."""
    times = []
    with progress(repeats, f"{desc} prefill") as bar:
        for _ in range(repeats):
            times.append(timed(prefill)[1])
            bar.update()
    median = statistics.median(times)
    return {"prefill_s": times, "prefill_median_s": median, "prefill_tok_s": n_tokens / median,
            "prefill_best_tok_s": n_tokens / min(times)}


def measure_decode(step, n_steps: int, desc: str) -> dict:
    """Call `step()` (one token through the KV cache) `n_steps` times, timing each call.

    decode_tok_s is steps / total time, the number reported. The median step is kept as well: on a
    shared machine another process's burst slows a few steps, and the median shows the typical one."""
    times = []
    with progress(n_steps, f"{desc} decode") as bar:
        for _ in range(n_steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
            bar.update()
    total = sum(times)
    return {"decode_s": total, "decode_steps": n_steps, "decode_tok_s": n_steps / total,
            "decode_median_step_tok_s": 1 / statistics.median(times), "decode_step_s": times}


def same_prefix(tokens: Sequence[int], reference: Sequence[int]) -> int:
    """How many tokens, from the first, equal the reference's."""
    n = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        n += 1
    return n


def measure_engine(engine: Engine, job: dict, desc: str) -> dict:
    """Warm-up, prefill, batch-1 decode, the engine's extras and the batched decodes, in that order."""
    ids, n = job["prompt_ids"], job["new_tokens"] + 1  # 1 token from the prefill + new_tokens decode steps
    warmup = measure_warmup(engine, ids, n)
    prefill = measure_prefill(lambda: engine.prefill(ids, n), len(ids), job["repeats"], desc)
    decode = measure_greedy(engine, ids, n, desc)
    extra = engine.extra(job, decode["tokens"], desc)
    batch1_rss = peak_rss_mb()
    batches = measure_batches(engine, job, decode["tokens"], desc)
    return {**warmup, **prefill, **decode, **extra, "batch": batches, "peak_rss_mb": batch1_rss,
            "peak_rss_with_batches_mb": peak_rss_mb()}


def measure_warmup(engine: Engine, ids: list[int], n: int) -> dict:
    """The first greedy run, to its WARMUP_STEPS-th decode step: the prefill of the whole prompt and the first
    decode steps with the very shapes (cache size included) the timed runs use. Its time is reported apart."""
    steps = engine.greedy(ids, n)
    count = min(n, 1 + WARMUP_STEPS)
    start = time.perf_counter()
    for _ in range(count):
        next(steps)
    seconds = time.perf_counter() - start
    steps.close()
    return {"warmup_s": seconds, "warmup_decode_steps": count - 1}


def measure_greedy(engine: Engine, ids: list[int], n: int, desc: str) -> dict:
    """Batch-1 greedy decoding: the first token comes from the prefill (not timed), then n - 1 timed steps."""
    steps = engine.greedy(ids, n)
    tokens = [next(steps)]
    decode = measure_decode(lambda: tokens.append(next(steps)), n - 1, desc)
    if engine.bursty:
        decode["decode_median_step_tok_s"] = None
    info = engine.decode_info()
    return {**decode, "decode_forwards": info.pop("forwards", n - 1), **info, "tokens": tokens}


def measure_batches(engine: Engine, job: dict, tokens: list[int], desc: str) -> dict:
    """Aggregate decode throughput for each batch size; a failing size is reported, the others still run.
    Prompt 0 of every batch is the batch-1 prompt: its row must give the batch-1 tokens (`row0_agrees`)."""
    results = {}
    for size in job["batch_sizes"]:
        prompts = job["batch_prompts"][:size]
        try:
            r = measure_batch(engine, prompts, job["batch_new_tokens"], f"{desc} batch {size}")
        except NotApplicable as why:
            r = {"status": "n/a", "error": str(why)}
        except Exception as error:  # reported in the table; the other sizes still run
            import traceback
            traceback.print_exc()
            r = {"status": "error", "error": repr(error)}
        else:
            if prompts[0] == job["prompt_ids"]:
                r["row0_agrees"] = f"{same_prefix(r['tokens'][0], tokens)}/{min(len(r['tokens'][0]), len(tokens))}"
        results[str(size)] = r
    return results


def measure_batch(engine: Engine, prompts: list[list[int]], n_steps: int, desc: str) -> dict:
    """Prefill the prompts as one batch (untimed), BATCH_WARMUP_STEPS untimed steps, then n_steps timed ones."""
    size = len(prompts)
    steps = engine.batch_greedy(prompts, 1 + BATCH_WARMUP_STEPS + n_steps)
    start = time.perf_counter()
    rows = [next(steps)]
    prefill_s = time.perf_counter() - start
    rows += [next(steps) for _ in range(BATCH_WARMUP_STEPS)]
    warmup_s = time.perf_counter() - start - prefill_s
    decode = measure_decode(lambda: rows.append(next(steps)), n_steps, desc)
    steps.close()
    return {"status": "ok", "batch_size": size, "prompt_tokens": [len(p) for p in prompts], "prefill_s": prefill_s,
            "warmup_steps": BATCH_WARMUP_STEPS, "warmup_s": warmup_s, "steps": n_steps, "decode_s": decode["decode_s"],
            "tok_s": size * n_steps / decode["decode_s"], "step_s": decode["decode_step_s"],
            "tokens": [list(row) for row in zip(*rows)]}


def linear_weight_bytes(model) -> dict:
    """Bytes a decode forward reads from the weights: every linear layer's parameters and buffers (nn.Linear,
    or any module with in_features/out_features, such as a quantised linear), the lm_head included; the token
    embedding is left out (a step reads one row of it). Shared tensors (a tied lm_head) count once."""
    import torch.nn as nn

    seen, by_type = set(), {}

    def is_linear(module) -> bool:
        return isinstance(module, nn.Linear) or (not isinstance(module, nn.Embedding)
                                                 and hasattr(module, "in_features") and hasattr(module, "out_features"))

    def visit(module) -> None:
        if not is_linear(module):
            for child in module.children():
                visit(child)
            return
        size = 0
        for t in itertools.chain(module.parameters(), module.buffers()):
            key = (t.data_ptr(), t.nbytes)
            if key not in seen:
                seen.add(key)
                size += t.nbytes
        by_type[type(module).__name__] = by_type.get(type(module).__name__, 0) + size

    visit(model)
    return {"weight_bytes_per_token": sum(by_type.values()), "weight_bytes_by_module_type": by_type}


def gguf_weight_bytes(path: str) -> dict:
    """What llama.cpp reads per token from a GGUF: every tensor but token_embd.weight (read one row a token),
    unless the file has no output.weight, in which case the output layer reads the whole embedding."""
    from qwen2.checkpoint.gguf import open_gguf

    tensors = open_gguf(path).tensors
    skip = "token_embd.weight" if any(t.name == "output.weight" for t in tensors) else None
    by_type = {}
    for t in tensors:
        if t.name != skip:
            by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + t.n_bytes
    return {"weight_bytes_per_token": sum(by_type.values()), "weight_bytes_by_gguf_type": by_type,
            "weight_bytes_excluded": skip}


def measure_read_bandwidth(threads: int, mib: int, repeats: int = BANDWIDTH_REPEATS) -> dict:
    """The machine's read bandwidth as torch sees it: `torch.ones(...).sum()` over `mib` MiB of fp32, with
    `threads` torch threads, best of `repeats` (the tensor is written, hence resident, before the first)."""
    import torch

    set_torch_threads(threads)
    x = torch.ones(mib * 2 ** 20 // 4)
    times = [timed(x.sum)[1] for _ in range(repeats)]
    nbytes = x.nbytes
    del x
    return {"read_bandwidth_gb_s": nbytes / min(times) / 1e9, "bytes": nbytes, "times_s": times,
            "threads": threads, "method": f"torch.ones({nbytes // 4}).sum(), fp32, best of {repeats}"}


# --------------------------------------------------------------------------------------------------
# Workers: each runs in its own process, reads a job file, writes a result file
# --------------------------------------------------------------------------------------------------

def worker_first_load(job: dict) -> dict:
    """Time `qwen2.load(model)` with the cache as it is, say whether it was cold, build the prompts and read
    the GGUF's tensor sizes (here, so that the llama.cpp process never imports torch)."""
    t0 = time.perf_counter()
    import qwen2
    from qwen2.checkpoint.registry import KNOWN_MODELS, cache_dir
    import_s = time.perf_counter() - t0
    set_torch_threads(job["threads"])
    source = job["model"]
    registry = source.lower() in KNOWN_MODELS
    cache_state = cache_before(source) if registry else "n/a (not a registry name)"
    m, load_s = timed(qwen2.load, source)
    ids = build_prompt_ids(m.tokenizer, job["prompt_tokens"])
    batch_prompts = build_batch_prompts(m.tokenizer, job["prompt_tokens"], max(job["batch_sizes"], default=0))
    hf, gguf = job.get("hf_dir"), job.get("gguf")
    if registry:
        from qwen2.checkpoint.registry import gguf_path, hf_dir
        hf, gguf = hf or hf_dir(source, progress=False), gguf or gguf_path(source, progress=False)
    elif os.path.isdir(source):
        hf = hf or source
    elif source.endswith(".gguf"):
        gguf = gguf or source
        hf = hf or convert_for_transformers(source, job["scratch"])
    return {"import_s": import_s, "load_s": load_s, "cache_state": cache_state, "cache_dir": cache_dir(),
            "prompt_ids": ids, "prompt_preview": m.tokenizer.decode(ids[:64]), "batch_prompts": batch_prompts,
            "hf_dir": hf, "gguf": gguf, "gguf_weight_bytes": gguf_weight_bytes(gguf) if gguf else None,
            "config": {k: getattr(m.config, k, None) for k in
                       ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                        "vocab_size", "tie_word_embeddings")},
            "peak_rss_mb": peak_rss_mb()}


def cache_before(name: str) -> str:
    """What the registry cache holds for `name` before the first load."""
    from qwen2.checkpoint.registry import cache_dir, known_model
    model = known_model(name)
    converted = os.path.isfile(os.path.join(cache_dir(), model.name, "qwen2_source.json"))
    assembled = os.path.isfile(os.path.join(cache_dir(), f"{model.name}.gguf"))
    if converted:
        return "warm (converted directory already cached)"
    if assembled:
        return "cold (GGUF assembled earlier; this load converted it)"
    return "cold (this load assembled the GGUF from its parts and converted it)"


def convert_for_transformers(gguf: str, scratch: str) -> str:
    """transformers cannot read our GGUF quickly: write it once as an HF directory in the scratch dir."""
    from qwen2.checkpoint.gguf import load_gguf
    from qwen2.checkpoint.hf import save_hf_dir
    from qwen2.checkpoint.registry import generation_config_for
    config, state_dict, tokenizer = load_gguf(gguf, progress=False)
    path = os.path.join(scratch, "hf")
    save_hf_dir(path, config, state_dict, tokenizer, generation_config_for(tokenizer))
    return path


def greedy_params(n: int):
    from qwen2.runtime.generate import SamplingParams
    return SamplingParams(max_new_tokens=n, temperature=0.0)


class Qwen2Engine(Engine):
    """This project through one executor (`Qwen2.decoder`, qwen2/runtime/executor.py): static KV cache,
    `decode_steps` (the path `generate` uses), or with `speculative` the speculative steps
    `Qwen2.generate(speculative=...)` builds (one prompt only)."""

    def __init__(self, decoder, pad_id: int = 0, speculative: str | None = None):
        self.decoder, self.pad_id, self.speculative = decoder, pad_id, speculative
        self.bursty = speculative is not None
        self.drafter = None

    def prefill(self, ids, n):
        import torch
        with torch.inference_mode():
            self.decoder(torch.tensor([ids]), cache=self.decoder.new_cache(1, len(ids) + n), last_only=True)

    def greedy(self, ids, n):
        if self.speculative is None:
            return super().greedy(ids, n)
        from qwen2.runtime.speculative import make_drafter, steps_with
        self.drafter = make_drafter(self.speculative)
        steps = steps_with(self.drafter)(self.decoder, [ids], greedy_params(n), pad_id=self.pad_id)
        return (int(token[0]) for token in steps)

    def batch_greedy(self, prompts, n):
        if self.speculative is not None:
            raise NotApplicable("speculative decoding takes one prompt at a time")
        from qwen2.runtime.generate import decode_steps
        return (token.tolist() for token in decode_steps(self.decoder, prompts, greedy_params(n), pad_id=self.pad_id))

    def decode_info(self):
        if self.drafter is None:
            return {}
        stats = self.drafter.stats
        return {"forwards": stats.target_forwards, "speculation": stats.as_dict(),
                "num_draft_tokens": self.drafter.num_draft_tokens}

    def extra(self, job, tokens, desc):
        """A speculative engine also decodes plainly, in this process on this model: its tokens must be the
        same (speculation changes the number of forwards, never the text), and its speed is the baseline."""
        if self.speculative is None:
            return {}
        plain = measure_greedy(Qwen2Engine(self.decoder, self.pad_id), job["prompt_ids"], len(tokens), f"{desc} plain")
        return {"plain_greedy": {"decode_tok_s": plain["decode_tok_s"], "tokens_equal": plain["tokens"] == tokens,
                                 "agreement": f"{same_prefix(tokens, plain['tokens'])}/{len(plain['tokens'])}"}}


def load_qwen2(source: str, load_kwargs: dict):
    """(Qwen2, seconds) of `qwen2.load(source, **load_kwargs)`; NotAvailable where this qwen2 has no such
    executor."""
    import qwen2
    from qwen2.errors import Qwen2Error
    try:
        return timed(qwen2.load, source, progress=False, **load_kwargs)
    except (TypeError, Qwen2Error) as error:
        if "executor" in load_kwargs and "executor" in str(error):
            raise NotAvailable(f"qwen2.load(executor={load_kwargs['executor']!r}) is not supported here "
                               f"({error})") from None
        raise


def qwen2_weights(model, source: str, variant: Qwen2Variant) -> str:
    from qwen2.quant import describe
    quantised = getattr(model, "quantization", None) or {}
    from_dir = os.path.isdir(source)
    if not quantised:
        text = "fp32 (the HF directory's safetensors)" if from_dir else "fp32 (dequantised from the GGUF)"
    else:
        text = f"{describe(model)}, quantised at load from " + ("the HF directory's safetensors" if from_dir
                                                                 else "the GGUF")
        exact = quantised.get("gguf_q4k")  # linears whose int4 is the GGUF's Q4_K itself, not requantised
        if exact and "Q4_K" not in text:
            text += f" ({exact} linears exactly its Q4_K)"
    if variant.load.get("executor") == "compiled":
        text += ", torch.compile"
    if variant.speculative:
        text += f", {variant.speculative} speculative decoding"
    return text


def worker_qwen2(job: dict, name: str, variant: Qwen2Variant) -> dict:
    """This project: `qwen2.load(model, **variant.load)` (quantize=int8/int4: weight-only quantised linears;
    executor: how the forwards run), measured by the shared code through `Qwen2Engine` on `Qwen2.decoder`."""
    t0 = time.perf_counter()
    import torch  # noqa: F401
    import qwen2  # noqa: F401
    import qwen2.runtime.generate  # noqa: F401
    import_s = time.perf_counter() - t0
    set_torch_threads(job["threads"])
    m, load_s = load_qwen2(job["model"], variant.load)
    load_rss = rss_mb()
    pad_id = m.tokenizer.pad_token_id if m.tokenizer is not None and m.tokenizer.pad_token_id is not None else 0
    result = measure_engine(Qwen2Engine(m.decoder, pad_id, variant.speculative), job, name)
    return {**result, **linear_weight_bytes(m.model), "import_s": import_s, "load_s": load_s,
            "rss_after_load_mb": load_rss, "load_kwargs": variant.load, "executor": m.decoder.name,
            "weights": qwen2_weights(m.model, job["model"], variant)}


def left_pad(prompts: list[list[int]], pad_id: int = 0):
    """(ids, mask) tensors of the left-padded prompts; mask is None when no row needs padding."""
    import torch
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
    if all(len(p) == width for p in prompts):
        return ids, None
    return ids, torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])


class TransformersEngine(Engine):
    """transformers' model called directly: the loop `generate(do_sample=False)` runs, without its logits
    processors; greedy tokens through the DynamicCache its own generate uses by default."""

    def __init__(self, model):
        self.model = model

    def forward(self, input_ids, past=None, mask=None, positions=None):
        import torch
        with torch.inference_mode():
            # logits_to_keep=1: only the last position's logits, as qwen2's last_only and llama.cpp do.
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                             use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], out.past_key_values

    def prefill(self, ids, n):
        import torch
        self.forward(torch.tensor([ids]))

    def batch_greedy(self, prompts, n):
        import torch
        ids, mask = left_pad(prompts)
        # Padded rows: positions count real tokens only, as generate() derives them from the attention mask.
        positions = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
        logits, past = self.forward(ids, mask=mask, positions=positions)
        for step in range(n):
            token = logits.argmax(-1)  # (B,)
            yield token.tolist()
            if step + 1 < n:
                if mask is not None:
                    mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
                    positions = positions[:, -1:] + 1
                logits, past = self.forward(token[:, None], past, mask, positions)


def worker_transformers(job: dict, from_gguf: bool = False) -> dict:
    """transformers on the same weights: our converted HF directory (or, from_gguf, its own GGUF loader)."""
    t0 = time.perf_counter()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    import_s = time.perf_counter() - t0
    set_torch_threads(job["threads"])
    name = "transformers-gguf" if from_gguf else "transformers"
    if from_gguf:
        gguf = job["gguf"]
        load = lambda: AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                            dtype=torch.float32)
    else:
        load = lambda: AutoModelForCausalLM.from_pretrained(job["hf_dir"], dtype=torch.float32)
    model, load_s = timed(load)
    model.eval()
    load_rss = rss_mb()
    result = measure_engine(TransformersEngine(model), job, name)
    return {**result, **linear_weight_bytes(model), "import_s": import_s, "load_s": load_s,
            "rss_after_load_mb": load_rss,
            "weights": "fp32 (" + ("its own GGUF dequantisation" if from_gguf else "the same safetensors"
                                  if job["hf_dir"] == job["model"] else "qwen2's converted safetensors") + ")",
            "attention": getattr(model.config, "_attn_implementation", None), "version": transformers.__version__}


def worker_llama_cpp(job: dict) -> dict:
    """llama.cpp (llama-cpp-python) on the GGUF, measured by the shared code through `LlamaCppEngine`."""
    t0 = time.perf_counter()
    import llama_cpp
    import_s = time.perf_counter() - t0
    ids, new = job["prompt_ids"], job["new_tokens"]
    n_ctx = max(1024, len(ids) + new + 16)
    llm, load_s = timed(llama_cpp.Llama, model_path=job["gguf"], n_threads=job["threads"],
                        n_threads_batch=job["threads"], n_ctx=n_ctx, n_batch=max(512, len(ids)),
                        n_ubatch=max(512, len(ids)), logits_all=False, verbose=False)
    load_rss = rss_mb()  # the weights are mmap'd: pages count once touched, by the warm-up
    result = measure_engine(LlamaCppEngine(llm), job, "llama.cpp")
    return {**result, **(job.get("gguf_weight_bytes") or {}), "import_s": import_s, "load_s": load_s,
            "rss_after_load_mb": load_rss, "weights": "the GGUF's quantised weights (Q4_K_M mix), mmap'd",
            "n_ctx": n_ctx, "version": getattr(llama_cpp, "__version__", None),
            # which SIMD paths this build of llama.cpp uses (AVX2, AVX512, AMX, ...), as its own words
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}


WORKERS = {
    "first-load": worker_first_load,
    **{name: functools.partial(worker_qwen2, name=name, variant=variant) for name, variant in QWEN2_ENGINES.items()},
    "transformers": worker_transformers,
    "transformers-gguf": functools.partial(worker_transformers, from_gguf=True),
    "llama.cpp": worker_llama_cpp,
}


# --------------------------------------------------------------------------------------------------
# The parent: runs the workers one after another and reports
# --------------------------------------------------------------------------------------------------

def ok(result: dict | None) -> bool:
    return bool(result) and result.get("status") == "ok"


def throughput(result: dict | None, what) -> float | None:
    """tok/s of a row: what = "prefill", "decode" or a batch size (aggregate decode tok/s); None if absent."""
    if not ok(result):
        return None
    if isinstance(what, int):
        batch = result.get("batch", {}).get(str(what), {})
        return batch.get("tok_s") if batch.get("status") == "ok" else None
    return result.get(f"{what}_tok_s")


def ratio(result: dict, reference: dict | None, what) -> str:
    mine, theirs = throughput(result, what), throughput(reference, what)
    return "–" if mine is None or theirs is None else f"{mine / theirs:.2f}×"


def ratios(result: dict, reference: dict | None, batch_sizes: Sequence[int]) -> str:
    return " / ".join(ratio(result, reference, what) for what in ("prefill", "decode", *batch_sizes))


def batch_cell(result: dict, size: int) -> str:
    batch = result.get("batch", {}).get(str(size))
    if not batch:
        return "–"
    return fmt(batch["tok_s"]) if batch.get("status") == "ok" else batch.get("status", "error")


def agreement(result: dict, reference: dict | None) -> str:
    """How many greedy tokens, from the first, equal qwen2's (same weights give the same argmax unless
    rounding flips a near-tie; quantised weights, ours or llama.cpp's GGUF, may drift sooner)."""
    if not ok(reference) or not ok(result):
        return "–"
    return f"{same_prefix(result['tokens'], reference['tokens'])}/{len(reference['tokens'])}"


def achieved_gb_s(result: dict) -> float | None:
    """Weight bytes x decode forwards per second: the weight traffic batch-1 decoding sustained."""
    size = result.get("weight_bytes_per_token")
    if size is None or not result.get("decode_s"):
        return None
    return size * result["decode_forwards"] / result["decode_s"] / 1e9


def bandwidth_share(result: dict, bandwidth: float | None) -> str:
    achieved = achieved_gb_s(result)
    return "–" if achieved is None or not bandwidth else f"{100 * achieved / bandwidth:.0f} %"


def notes(result: dict) -> str:
    """Speculation counts, the speculative row's check against plain greedy, and batch cells that need words."""
    parts = []
    if "speculation" in result:
        s = result["speculation"]
        parts.append(f"{s['accepted']}/{s['proposed']} drafted tokens accepted, {s['target_forwards']} forwards "
                     f"for {result['decode_steps']} tokens")
    if "plain_greedy" in result:
        p = result["plain_greedy"]
        parts.append(f"tokens {'=' if p['tokens_equal'] else '≠'} plain greedy's ({p['agreement']}), "
                     f"plain decode {fmt(p['decode_tok_s'])} tok/s in the same process")
    problems = {}  # message -> batch sizes, so that one reason for every size is said once
    for size, batch in result.get("batch", {}).items():
        if batch.get("status") != "ok":
            problems.setdefault(f"{batch.get('status')}: {batch.get('error')}", []).append(size)
        elif batch.get("row0_agrees") and len(set(batch["row0_agrees"].split("/"))) > 1:
            parts.append(f"batch {size}: row 0 (the batch-1 prompt) = batch-1 tokens for {batch['row0_agrees']}")
    parts += [f"batch {', '.join(sizes)}: {message}" for message, sizes in problems.items()]
    return "; ".join(parts)


def cell(text) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("\n", " ").replace("|", "\\|")


def failure(result: dict) -> str:
    why = result.get("status", "error")
    return why if why == "not installed" else f"{why}: {result.get('error', '')}"


def speed_table(results: dict, batch_sizes: Sequence[int]) -> str:
    """Throughputs and ratios; a ratio is engine / reference throughput, so > 1 means faster."""
    llama, hf = results.get("llama.cpp"), results.get("transformers")
    which = " / ".join(["prefill", "decode"] + [f"b{size}" for size in batch_sizes])
    header = (["engine", "load s", "warm-up s", "prefill tok/s", "decode tok/s"]
              + [f"batch {size} tok/s" for size in batch_sizes]
              + [f"vs llama.cpp ({which})", f"vs transformers ({which})", "CPU taken by others"])
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for name, r in results.items():
        if not ok(r):
            lines.append(f"| {name} | {cell(failure(r))} |" + " – |" * (len(header) - 2))
            continue
        cells = ([name, fmt(r["load_s"], ".2f"), fmt(r.get("warmup_s"), ".2f"), fmt(r["prefill_tok_s"]),
                  fmt(r["decode_tok_s"])] + [batch_cell(r, size) for size in batch_sizes]
                 + [ratios(r, llama, batch_sizes), ratios(r, hf, batch_sizes),
                    f"{fmt(r.get('others_cpu_pct'), '.0f')} %"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_table(results: dict, bandwidth: float | None) -> str:
    """Weights, memory, weight traffic against the measured read bandwidth, and greedy agreement."""
    ours = results.get("qwen2")
    header = ["engine", "weights", "peak RSS MB", "weight MB read / token", "achieved GB/s", "of read bandwidth",
              "greedy tokens = qwen2's", "notes"]
    lines = ["| " + " | ".join(header) + " |", "| --- | --- |" + " ---: |" * (len(header) - 3) + " --- |"]
    for name, r in results.items():
        if not ok(r):
            lines.append(f"| {name} | {cell(r.get('status', 'error'))} |" + " – |" * (len(header) - 2))
            continue
        size = r.get("weight_bytes_per_token")
        cells = [name, r.get("weights", ""), fmt(r["peak_rss_mb"], ".0f"), fmt(size and size / 1e6, ".0f"),
                 fmt(achieved_gb_s(r)), bandwidth_share(r, bandwidth), agreement(r, ours), notes(r)]
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return "\n".join(lines)


def load_summary(first: dict, results: dict) -> str:
    second = results.get("qwen2", {})
    text = (f"qwen2.load: first load {fmt(first.get('load_s'), '.2f')} s (+{fmt(first.get('import_s'), '.2f')} s "
            f"import qwen2), cache {first.get('cache_state')}")
    if second.get("status") == "ok":
        text += (f"; second load, in a new process: {fmt(second['load_s'], '.2f')} s "
                 f"(+{fmt(second.get('import_s'), '.2f')} s import)")
    return text


def report(data: dict) -> str:
    s, m = data["settings"], data["machine"]
    bandwidth = m.get("read_bandwidth_gb_s")
    batches = (f"batches: {', '.join(map(str, s['batch_sizes']))} prompts × {s['batch_new_tokens']} steps   "
               if s["batch_sizes"] else "")
    return "\n".join([
        f"model: {s['model']}   prompt: {s['prompt_tokens']} tokens   new tokens: {s['new_tokens']}   {batches}"
        f"threads: {s['threads']}   prefill: median of {s['repeats']}",
        f"machine: {m['cpu']} ({m['logical_cpus']} logical CPUs), {m['threads']} threads, measured read bandwidth "
        f"{fmt(bandwidth)} GB/s ({m.get('read_bandwidth', {}).get('method', 'not measured')}), torch {m['torch']}, "
        f"transformers {m['transformers']}, llama-cpp-python {m['llama_cpp'] or 'not installed'}, {m['date']}",
        load_summary(data["first_load"], data["engines"]),
        "",
        "Speed",
        "",
        speed_table(data["engines"], s["batch_sizes"]),
        "",
        "Memory, weight traffic, agreement",
        "",
        memory_table(data["engines"], bandwidth),
    ])


def batch_sizes_arg(text: str) -> list[int]:
    sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    if any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError("batch sizes must be >= 1")
    return sizes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default=DEFAULT_MODEL, help="registry name, HF directory or .gguf file")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help=f"comma-separated, from {', '.join(ALL_ENGINES)} (default: %(default)s)")
    p.add_argument("--transformers-gguf", action="store_true",
                   help="also run transformers on the GGUF through its own (slow) GGUF loader")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="prefill repeats; the median is reported")
    p.add_argument("--batch-sizes", type=batch_sizes_arg, default=[4, 8], metavar="B,B",
                   help="batch sizes of the aggregate decode measurement; '' for none (default: 4,8)")
    p.add_argument("--batch-new-tokens", type=int, default=32, help="timed decode steps of each batch")
    p.add_argument("--bandwidth-mib", type=int, default=1024,
                   help="MiB of fp32 summed to measure the read bandwidth (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads and llama.cpp n_threads")
    p.add_argument("--hf-dir", help="HF directory for transformers (default: the one qwen2 converted)")
    p.add_argument("--gguf", help="GGUF file for llama.cpp (default: the registry model's)")
    p.add_argument("--cold", action="store_true",
                   help="first load in an empty temporary QWEN2_CACHE (deleted afterwards), so it is truly cold")
    p.add_argument("--wait-quiet", type=float, default=120, metavar="SECONDS",
                   help="before the bandwidth measurement and each engine, wait up to this long for other processes "
                        "to leave the CPU (under 15%% busy over 2 s); 0 = don't wait (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed to each engine process")
    p.add_argument("--out", help="JSON result file; a .md table is written beside it "
                                 "(default: benchmarks/results/<model>.json)")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.transformers_gguf and "transformers-gguf" not in args.engines:
        args.engines.append("transformers-gguf")
    unknown = set(args.engines) - set(ALL_ENGINES)
    if unknown:
        p.error(f"unknown engine(s): {', '.join(sorted(unknown))}")
    if args.new_tokens < 1 or args.batch_new_tokens < 1 or args.prompt_tokens < 1:
        p.error("--prompt-tokens, --new-tokens and --batch-new-tokens must be >= 1")
    return args


def default_out(model: str) -> str:
    slug = os.path.basename(os.path.normpath(model)).removesuffix(".gguf") or "model"
    return os.path.join(RESULTS_DIR, f"{slug}.json")


def engine_line(r: dict) -> str:
    """One line of progress on stderr after an engine."""
    if r.get("status") != "ok":
        return f"    {r.get('status')}: {r.get('error', '')}"
    batches = "".join(f", batch {size} {batch_cell(r, int(size))} tok/s" for size in r.get("batch", {}))
    return (f"    load {r['load_s']:.2f} s, warm-up {r['warmup_s']:.2f} s, prefill {r['prefill_tok_s']:.1f} tok/s, "
            f"decode {r['decode_tok_s']:.1f} tok/s{batches}, peak RSS {r['peak_rss_mb']:.0f} MB")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(WORKERS, args.worker, args.job, args.result, {NotAvailable: "not available"})
        return 0
    out = args.out or default_out(args.model)
    scratch = tempfile.mkdtemp(prefix="qwen2-bench-")
    env = dict(os.environ)
    if args.cold:
        env["QWEN2_CACHE"] = os.path.join(scratch, "cache")
    job = {"model": args.model, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
           "new_tokens": args.new_tokens, "repeats": args.repeats, "batch_sizes": args.batch_sizes,
           "batch_new_tokens": args.batch_new_tokens, "hf_dir": args.hf_dir, "gguf": args.gguf, "scratch": scratch}
    try:
        steps = ["first-load", "bandwidth"] + args.engines
        print(f"[1/{len(steps)}] first-load: qwen2.load({args.model!r}) and the {args.prompt_tokens}-token prompt",
              file=sys.stderr, flush=True)
        quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
        first = spawn(MODULE, "first-load", job, scratch, env, args.timeout) | {"others_cpu_pct_before": quiet}
        if first.get("status") != "ok":
            print(f"first load failed: {first.get('error')}", file=sys.stderr)
            return 1
        job |= {k: first[k] for k in ("prompt_ids", "batch_prompts", "hf_dir", "gguf", "gguf_weight_bytes")}
        print(f"[2/{len(steps)}] read bandwidth: sum of {args.bandwidth_mib} MiB of fp32, {args.threads} threads",
              file=sys.stderr, flush=True)
        quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
        bandwidth = measure_read_bandwidth(args.threads, args.bandwidth_mib) | {"others_cpu_pct_before": quiet}
        print(f"    {bandwidth['read_bandwidth_gb_s']:.1f} GB/s", file=sys.stderr)
        results = {}
        for i, engine in enumerate(args.engines, 3):
            print(f"[{i}/{len(steps)}] {engine}", file=sys.stderr, flush=True)
            quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
            results[engine] = r = run_engine(engine, job, scratch, env, args.timeout) | {"others_cpu_pct_before": quiet}
            print(engine_line(r), file=sys.stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    data = {"settings": {"model": args.model, "engines": args.engines, "prompt_tokens": args.prompt_tokens,
                         "new_tokens": args.new_tokens, "repeats": args.repeats, "batch_sizes": args.batch_sizes,
                         "batch_new_tokens": args.batch_new_tokens, "batch_warmup_steps": BATCH_WARMUP_STEPS,
                         "warmup_decode_steps": WARMUP_STEPS, "threads": args.threads, "cold": args.cold,
                         "wait_quiet_s": args.wait_quiet, "prefill_statistic": "median", "hf_dir": job["hf_dir"],
                         "gguf": job["gguf"],
                         "command": command_line(MODULE, argv)},
            "machine": machine_facts(args.threads, bandwidth),
            "first_load": {k: v for k, v in first.items() if k not in ("prompt_ids", "batch_prompts")},
            "prompt_ids": job["prompt_ids"],
            "batch_prompt_ids": job["batch_prompts"],
            "engines": results}
    text = report(data)
    print(text)
    write_results(out, data, "```\n" + data["settings"]["command"] + "\n```\n\n" + text + "\n")
    return 0


def run_engine(engine: str, job: dict, scratch: str, env: dict, timeout: float) -> dict:
    """One engine's result, or why it has none."""
    if engine == "llama.cpp":
        if not llama_cpp_installed():
            return {"status": "not installed", "error": "import llama_cpp failed (pip install llama-cpp-python)"}
        if not job.get("gguf"):
            return {"status": "skipped", "error": "no GGUF file (pass --gguf)"}
    if engine == "transformers-gguf" and not job.get("gguf"):
        return {"status": "skipped", "error": "no GGUF file (pass --gguf)"}
    if engine.startswith("transformers") and importlib.util.find_spec("transformers") is None:
        return {"status": "not installed", "error": "pip install -e '.[test]'"}
    return spawn(MODULE, engine, job, scratch, env, timeout)


if __name__ == "__main__":
    sys.exit(main())
