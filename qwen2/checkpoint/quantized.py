"""Quantised models built from their source: a GGUF's blocks turned into quantised layers directly.

`build_quantized(config, weights, mode, ...)` is what `qwen2.load(..., quantize=...)` builds with.
From a GGUF (`weights` the `GGUFPlan` that `load_checkpoint(..., quantize=...)` returns for a .gguf
file or a registry name, never converted to the fp32 cache; or an open `GGUFFile`), the model is
made on the meta device and filled tensor by tensor, in file order, each tensor's file pages released
once it is taken (`GGUFFile.release`), so no fp32 copy of the model ever exists:

  - a block linear or the lm_head whose GGUF blocks a layer of ours holds exactly becomes that layer
    straight from the blocks (`qwen2.quant.gguf_blocks.exact_converter`: in the int4 modes at group
    32 Q4_K for any quantised layer and Q6_K for the int8 ones as their super-blocks, Q8_0 and Q5_0
    as int8 for the int8 ones);
  - any other quantised linear is dequantised from its own GGUF tensor, a chunk of rows at a time,
    and quantised as `quantize_model` quantises it (`qwen2.quant.model.linear_layouts` and
    `quantize_linear`: the same rules, the same code);
  - norms and biases are dequantised to `dtype`; the embedding is token_embd as the file holds it,
    its rows decoded as they are looked up (`GGUFEmbedding`, as llama.cpp reads it), or, for a tied
    head taken exactly, that head's rows (`QuantEmbedding`); only an fp32 head tied to it makes the
    dequantised table.

The result is, layer for layer and bit for bit, what quantising the fp32 model and then swapping in
the exact layers (`quantize_model` then `convert_gguf_exact`) gives, `model.quantization` included.
The quantised buffers are made in place where `qwen2.quant.into_huge_pages` would move them (one
region of 2 MB pages, in the model's order: no copy afterwards). The plan of the model is made from
the header alone (`GGUFPlan`), so the weights are read and converted in the background
(`GGUFPlan.start`, by as many worker threads as PyTorch has threads) while the caller builds the
tokenizer.
From an HF directory's state dict: the fp32 model, then `quantize_model`.
"""
from __future__ import annotations

import math
import threading

import torch

from ..errors import Qwen2Error
from ..model import Transformer
from .build import build_model, check_state_dict, skeleton
from .gguf import GGUFFile, hf_tensor_name


def build_quantized(config, weights, mode: str, group_size: int, lm_head: bool | None = None,
                    dtype: torch.dtype = torch.float32, expert_dtype: torch.dtype | None = None,
                    progress: bool = True) -> Transformer:
    """A CPU Transformer quantised to `mode` (see `qwen2.quant.quantize_model` for the modes, `group_size`
    and `lm_head`), from `weights`: a GGUF source's `GGUFPlan` or `GGUFFile` (its blocks taken as
    described above) or an HF state dict (emptied here: the model takes its tensors, and each fp32
    weight is freed as it is quantised)."""
    from ..quant import check_mode

    mode = check_mode(mode)
    if mode is None:
        raise Qwen2Error("build_quantized needs a quantization mode")
    if isinstance(weights, GGUFFile):
        weights = GGUFPlan(weights, config, mode, group_size, lm_head, dtype)
    if isinstance(weights, GGUFPlan):
        if weights.settings != (mode, group_size, lm_head, dtype):
            raise Qwen2Error(f"this GGUF was planned for {weights.settings}, not {(mode, group_size, lm_head, dtype)}")
        return weights.build(config, progress)
    from ..quant import quantize_model

    model = build_model(config, weights, dtype=dtype, device="cpu", expert_dtype=expert_dtype)
    weights.clear()  # the model holds the weights now: quantising can free each fp32 one as it goes
    return quantize_model(model, mode, group_size=group_size, lm_head=lm_head, release=True)


class GGUFPlan:
    """A GGUF's quantised model planned from its header, no weight read yet: for each quantised linear
    (in the model's order) its GGUF tensor (a tied head's is the embedding), the exact layer its blocks
    make or None (requantised), and its buffers, already placed in one region of 2 MB pages
    (`huge_page_arena`); and the embedding's buffer. `build` fills them."""

    def __init__(self, reader: GGUFFile, config, mode: str, group_size: int, lm_head: bool | None,
                 dtype: torch.dtype = torch.float32):
        from ..quant.gguf_blocks import exact_buffer_shapes, exact_converter, takes_q4k
        from ..quant.memory import anonymous_buffer, huge_page_arena
        from ..quant.model import check_quantizable, linear_layouts, quantized_buffer_shapes

        self.reader, self.settings = reader, (mode, group_size, lm_head, dtype)
        check_quantizable(config, mode, group_size)
        self.tensors = {hf_tensor_name(t.name): t for t in reader.tensors}
        # names and shapes against the config, from the header alone (the errors build_model gives)
        check_state_dict(config, {name: torch.empty(_torch_shape(t), device="meta") for name, t in self.tensors.items()})
        self.layouts = linear_layouts(config, mode, lm_head)
        tied = config.tie_word_embeddings
        q4k = takes_q4k(mode, group_size)
        self.order = [name for name, _ in skeleton(config).named_modules() if name in self.layouts]
        self.plan = {}
        for name in self.order:
            t = self.tensors["model.embed_tokens.weight" if tied and name == "lm_head" else f"{name}.weight"]
            converter = exact_converter(t.tensor_type, self.layouts[name], q4k)
            N, K = _torch_shape(t)
            shapes = exact_buffer_shapes(t) if converter else quantized_buffer_shapes(self.layouts[name], N, K, group_size)
            self.plan[name] = (t, converter, shapes)
        shapes = [shape for _, _, layer_shapes in self.plan.values() for shape in layer_shapes]
        arena = huge_page_arena([_nbytes(shape, kind) for shape, kind in shapes])  # None: plain tensors instead
        views = iter(arena or ())
        self.outs = {name: None if arena is None else [next(views).view(kind).view(shape) for shape, kind in layer_shapes]
                     for name, (_, _, layer_shapes) in self.plan.items()}
        # The embedding: a tied head taken exactly stands in for it (QuantEmbedding); an fp32 head tied
        # to it needs its table, dequantised; else it is token_embd read row by row (GGUFEmbedding).
        embedding = self.tensors["model.embed_tokens.weight"]
        head = self.plan.get("lm_head")
        self.embedding = None
        if tied and head is None:
            self.embedding = anonymous_buffer(_nbytes(_torch_shape(embedding), dtype))
        self.embedding_from_rows = not (tied and (head is None or head[1] is not None))  # GGUFEmbedding
        self.linear_of = {t.name: name for name, (t, _, _) in self.plan.items()}
        self._thread, self._result, self._cancelled = None, None, False

    def start(self, progress: bool = True) -> None:
        """Begin reading and converting the weights in the background (`build` waits for it), so that
        the work overlaps what the caller does meanwhile (building the tokenizer: Python, one core)."""
        if self._thread is None and self._result is None:
            self._thread = threading.Thread(target=self._fill_catching, args=(progress,), name="qwen2-gguf", daemon=True)
            self._thread.start()

    def build(self, config, progress: bool = True) -> Transformer:
        """The model (of `config`: the one planned, maybe with long-context settings added). Once: the
        layers are the model's from then on."""
        from ..quant.model import quantization_record

        self.start(progress)
        self._thread.join()
        result, self._result = self._result, _BUILT
        if result is _BUILT:
            raise Qwen2Error("this GGUFPlan has been built already; plan the GGUF again for another model")
        if isinstance(result, BaseException):
            raise result
        layers, plain, exact = result
        mode, group_size, lm_head, dtype = self.settings
        model = build_model(config, plain, dtype=dtype, device="cpu", modules=layers)
        model.quantization = quantization_record(config, mode, group_size, lm_head)
        counts: dict[str, int] = {}
        for name in self.order:  # in the order swapping them into a quantised model takes them
            if name in exact:
                counts[exact[name]] = counts.get(exact[name], 0) + 1
                model.quantization.setdefault("gguf_layouts", {})[exact[name]] = layers[name].mode
        if "lm_head" in exact:
            model.quantization["lm_head"] = layers["lm_head"].mode  # e.g. the 1.5B's Q6_K head: "q6_k", not int8
        if counts:
            model.quantization["gguf_exact"] = counts
        return model

    def _fill_catching(self, progress: bool) -> None:
        try:
            self._result = self._fill(progress)
        except BaseException as e:  # raised again by build, in the caller's thread
            self._result = e

    def _fill(self, progress: bool):
        """(quantised layers, plain tensors, exact block types by module name): every tensor read, in
        file order, by as many worker threads as PyTorch has threads, each running its ops on one
        thread (cheaper than splitting each small op in two), each tensor's file pages released once
        taken. One tensor's work is one task: `_take`."""
        from concurrent.futures import ThreadPoolExecutor

        from ..progress import progress_bar

        biases = {f"{name}.bias" for name in self.layouts}
        tasks = [t for t in self.reader.tensors if hf_tensor_name(t.name) not in biases]  # read with their linear
        results: tuple[dict, dict, dict] = ({}, {}, {})
        workers = max(1, torch.get_num_threads())
        if workers > 1:
            torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="qwen2-gguf") as pool, \
                    progress_bar(total=len(tasks), desc="loading GGUF", unit="tensor", disable=not progress) as bar:
                futures = [pool.submit(self._take, t, results) for t in tasks]
                for future in futures:
                    future.result()
                    bar.update(1)
        finally:
            if workers > 1:
                torch.set_num_threads(workers)
        return results

    def cancel(self) -> None:
        """Stop the background work (the tensors not begun are skipped) and wait for it: loading failed."""
        self._cancelled = True
        if self._thread is not None:
            self._thread.join()

    def _take(self, t, results) -> None:
        """One GGUF tensor into the model's pieces: a quantised layer (exact from its blocks, or
        requantised a chunk of rows at a time, into its planned buffers) or a plain tensor."""
        from ..quant import QuantEmbedding
        from ..quant.gguf_blocks import DequantizedRows, GGUFEmbedding, dequantize_tensor
        from ..quant.model import configure_linear, quantize_linear

        if self._cancelled:
            return
        layers, plain, exact = results
        mode, group_size, _, dtype = self.settings
        reader, name = self.reader, hf_tensor_name(t.name)
        linear = self.linear_of.get(t.name)
        if name == "model.embed_tokens.weight" and self.embedding_from_rows:
            layers["model.embed_tokens"] = GGUFEmbedding(t, dtype)  # its rows stay in the file until looked up
            if linear is None:
                return
        if linear is None:
            plain[name] = dequantize_tensor(t, dtype, out=self.embedding if name == "model.embed_tokens.weight" else None)
            reader.release(t)
            return
        _, converter, _ = self.plan[linear]
        bias_tensor = self.tensors.get(f"{linear}.bias")
        bias = None if bias_tensor is None else dequantize_tensor(bias_tensor, dtype)
        with torch.no_grad():
            if converter is not None:
                layer = converter(t, None if bias is None else bias.float(), out=self.outs[linear])
                exact[linear] = t.tensor_type.name
                if name == "model.embed_tokens.weight":  # a tied head: the embedding is the same blocks, read there
                    layers["model.embed_tokens"] = QuantEmbedding(layer)
            else:
                layer = quantize_linear(DequantizedRows(t, dtype), bias, self.layouts[linear], group_size,
                                        out=self.outs[linear])
        layers[linear] = configure_linear(layer, linear, mode)
        if bias_tensor is not None:
            reader.release(bias_tensor)
        reader.release(t)


_BUILT = object()  # GGUFPlan._result once its layers went into a model


def _torch_shape(tensor) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims innermost first


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()
