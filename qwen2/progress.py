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
