"""Progress bars for long work (assembling, dequantising, converting, generating)."""
import sys


def progress_bar(iterable=None, **kwargs):
    """tqdm with an ETA, on stderr; silent when `disable` is given or stderr is not a terminal
    and QWEN2_PROGRESS is not set."""
    import os

    from tqdm.auto import tqdm

    if "disable" not in kwargs or not kwargs["disable"]:
        kwargs["disable"] = not (sys.stderr.isatty() or os.environ.get("QWEN2_PROGRESS"))
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kwargs)


_answer_line_open = False  # a streamed answer on stdout has not ended its line yet


def answer_line_open(is_open: bool) -> None:
    """The CLI says whether its streamed answer is mid-line (see `notice`)."""
    global _answer_line_open
    _answer_line_open = is_open


def notice(message: str) -> None:
    """A one-line note on stderr ("qwen2: ..."), on a line of its own: a terminal shows stdout and
    stderr together, so a note that arrives in the middle of a streamed answer first ends its line."""
    print(("\n" if _answer_line_open else "") + f"qwen2: {message}", file=sys.stderr, flush=True)
