"""The one exception type users see: a single line saying what is wrong and how to fix it."""


class Qwen2Error(Exception):
    """Bad input or an unusable file. The CLI prints `error: <message>` and exits 1, no traceback."""
