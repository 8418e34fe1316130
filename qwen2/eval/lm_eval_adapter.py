"""EleutherAI lm-evaluation-harness model "qwen2" (needs `pip install -e '.[eval]'`; nothing else in
qwen2 imports this module, so qwen2 never needs lm-eval at run time).

lm-eval 0.4.x finds models only in its own registry (a fixed table of its modules, no plugin entry
points), so a model from another package must be registered in the process that runs the harness.
Three ways, all the same harness:

    qwen2 eval lm-eval --model qwen2 --model_args pretrained=qwen2.5-coder-0.5b-instruct --tasks T ...
    python -m qwen2.eval.lm_eval_adapter --model qwen2 --model_args pretrained=DIR --tasks T ...
    import qwen2.eval.lm_eval_adapter; lm_eval.simple_evaluate(model="qwen2", model_args="pretrained=...")

(every option after `lm-eval` is lm_eval's own: --tasks, --include_path for local task YAMLs,
--limit, --num_fewshot, --apply_chat_template, ...). model_args: pretrained (registry name, HF
directory or .gguf; or a loaded `qwen2.Qwen2` when built in Python), max_length (default: the
model's positions, capped at 4096), batch_size, and `qwen2.load`'s options (`qwen2.LoadOptions`:
dtype, quantize, group_size, quantize_lm_head, executor, compile, rope_scaling, dca, long_context,
expert_dtype). Any other key is an error, not ignored. The model runs on the CPU: lm_eval passes its
--device (default cuda:0) to every model, asked for or not, so it is not used.

Scoring follows lm-eval's HF model: a context's trailing spaces move to the continuation, context +
continuation is encoded whole and split at the context's length, an empty context is the end-of-text
token; loglikelihood_rolling scores disjoint windows of max_length tokens, each token once.
"""
from __future__ import annotations

import sys
from typing import Sequence

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..checkpoint.registry import DEFAULT_MODEL
from ..errors import Qwen2Error
from ..runtime.generate import SamplingParams, generate_text
from ..progress import progress_bar


# model_args keys the adapter reads itself (or lm_eval adds), beside the load options
OWN_MODEL_ARGS = ("pretrained", "max_length", "batch_size", "max_batch_size", "device", "trust_remote_code")


@register_model("qwen2")
class Qwen2LM(TemplateLM):
    def __init__(self, pretrained=DEFAULT_MODEL, max_length: int | None = None, batch_size=1, max_batch_size=None,
                 device=None, **load_options):
        super().__init__()
        from ..api import Qwen2, load
        from ..options import LoadOptions

        options = LoadOptions.from_lm_eval(load_options, own=OWN_MODEL_ARGS)  # checked before any loading
        self.m = pretrained if isinstance(pretrained, Qwen2) else load(pretrained, options=options)
        self.tokenizer = self.m._require_tokenizer()
        self._max_length = int(max_length) if max_length else min(self.m.config.max_position_embeddings, 4096)
        self.batch_size = 1 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)

    # ---- what TemplateLM needs --------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.m.source.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)  # Qwen2 adds no BOS

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    # ---- scoring ----------------------------------------------------------------------------------

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: (key, context ids, continuation ids) -> (sum of log p(continuation), is_greedy).
        Batches of similar length, left-padded: the continuations line up at the right edge."""
        model = self.m.model
        inputs = []
        for _, context, continuation in requests:
            if not continuation:
                raise Qwen2Error("lm-eval asked for the log-likelihood of an empty continuation")
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            inputs.append((whole[:-1], list(continuation)))  # the last token is only predicted
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(inputs)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in progress_bar(batches, desc="loglikelihood", unit="batch", disable=disable_tqdm):
            T = max(len(inputs[i][0]) for i in batch)
            ids = torch.zeros(len(batch), T, dtype=torch.long)
            mask = torch.zeros(len(batch), T, dtype=torch.long)
            for row, i in enumerate(batch):
                x = inputs[i][0]
                ids[row, T - len(x):] = torch.tensor(x)
                mask[row, T - len(x):] = 1
            logits = model(ids.to(model.device), attention_mask=None if bool(mask.all()) else mask.to(model.device))
            for row, i in enumerate(batch):
                target = torch.tensor(inputs[i][1], device=logits.device)
                logprobs = F.log_softmax(logits[row, T - len(target):].float(), dim=-1)  # (n, V)
                results[i] = (logprobs.gather(-1, target[:, None]).sum().item(),
                              bool((logprobs.argmax(-1) == target).all()))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts: disjoint windows of max_length tokens, the first one
        conditioned on the end-of-text token."""
        totals = []
        for (text,) in progress_bar([r.args for r in requests], desc="loglikelihood_rolling", unit="text",
                                    disable=disable_tqdm):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows], disable_tqdm=True)
            totals.append(sum(s for s, _ in scores))
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when the task asks with do_sample) continuation of each context,
        cut at the first of the task's `until` strings or an end-of-turn token."""
        replies = []
        for context, gen_kwargs in progress_bar([r.args for r in requests], desc="generate_until", unit="request",
                                                disable=disable_tqdm):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            ids = self.tok_encode(context)[-max(1, self.max_length - max_new):]  # room for the reply
            params = SamplingParams(max_new_tokens=max_new, temperature=temperature, stop=tuple(until),
                                    top_p=float(kwargs.get("top_p", 1.0)), seed=kwargs.get("seed"))
            reply = generate_text(self.m.decoder, self.tokenizer, [ids], params, self.m.eos_ids)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), reply)
            replies.append(reply)
        return replies


def main(argv: list[str] | None = None) -> int:
    """lm_eval's own command line, with the "qwen2" model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval"] + list(sys.argv[1:] if argv is None else argv)
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
