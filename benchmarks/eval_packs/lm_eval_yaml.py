"""Reading lm-eval's task files as data: the installed package's tasks/ folder (or an unpacked
wheel's: `pip download --no-deps lm-eval`), one task YAML with its `include`d template merged in."""
from __future__ import annotations

import os

METRIC_KEYS = ("metric", "aggregation", "higher_is_better")


def tasks_dir(given: str | None = None) -> str:
    """`given`, else the tasks/ folder of the installed lm_eval."""
    if given:
        return given
    import lm_eval

    return os.path.join(os.path.dirname(lm_eval.__file__), "tasks")


def read_task(path: str) -> dict:
    """The task file at `path` with its `include` chain merged in as lm-eval merges it (the file's own
    keys win, whole: a `generation_kwargs` here replaces the template's). A `!function utils.NAME`
    tag becomes the dotted path of that function in lm-eval's package, "lm_eval.tasks.<dir>.utils.NAME"."""
    import yaml

    here = os.path.dirname(os.path.abspath(path))
    package = "lm_eval.tasks." + os.path.relpath(here, tasks_dir_of(path)).replace(os.sep, ".")

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: f"{package}.{loader.construct_scalar(node)}")
    with open(path, encoding="utf-8") as f:
        config = yaml.load(f, Loader=Loader)
    includes = config.pop("include", [])
    merged: dict = {}
    for include in [includes] if isinstance(includes, str) else includes:
        merged.update(read_task(os.path.join(here, include)))
    merged.update(config)
    return merged


def tasks_dir_of(path: str) -> str:
    """The `tasks` folder that holds the task file `path`."""
    parts = os.path.abspath(path).split(os.sep)
    if "tasks" not in parts:
        raise ValueError(f"{path} is not inside an lm-eval tasks/ folder")
    last = len(parts) - 1 - parts[::-1].index("tasks")
    return os.sep.join(parts[:last + 1])


def metric_options(config: dict) -> dict:
    """exact_match's options of a task: its metric_list entry without the bookkeeping keys."""
    [entry] = [m for m in config["metric_list"] if m["metric"] == "exact_match"]
    return {k: v for k, v in entry.items() if k not in METRIC_KEYS}


def scorings(config: dict, names: dict[str, str]) -> dict:
    """{our metric name: {"filters", "options"}} from the task's filter_list (names: theirs -> ours)."""
    options = metric_options(config)
    return {names[f["name"]]: {"filters": f["filter"], "options": options} for f in config["filter_list"]}
