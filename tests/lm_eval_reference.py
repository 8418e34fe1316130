"""lm-eval's own tasks as the reference for the native runners: a packaged task YAML built into lm-eval's
`ConfigurableTask` over documents given here (its `custom_dataset` hook, so nothing is downloaded),
whose prompts, filters and `process_results` then give lm-eval's answer for the same replies."""
from __future__ import annotations

import contextlib
import importlib.metadata
import os

LM_EVAL_SEED = 1234  # lm-eval's default few-shot seed (simple_evaluate's fewshot_random_seed)


def task_yaml(*parts: str) -> str:
    import lm_eval

    return os.path.join(os.path.dirname(lm_eval.__file__), "tasks", *parts)


@contextlib.contextmanager
def antlr_411_accepted():
    """lm-eval's minerva_math module and sympy's LaTeX parser insist on the ANTLR 4.11 runtime, which
    Math-Verify's 4.13 replaces; the generated parser runs on 4.13 all the same, so for the reference
    both are told the version they ask for (here only, for the time of the block)."""
    import sympy.parsing.latex._parse_latex_antlr as sympy_antlr

    real = importlib.metadata.version
    fake = lambda name: "4.11.0" if name == "antlr4-python3-runtime" else real(name)  # noqa: E731
    saved = sympy_antlr.version
    importlib.metadata.version, sympy_antlr.version = fake, fake
    try:
        yield
    finally:
        importlib.metadata.version, sympy_antlr.version = real, saved


def lm_eval_task(path: str, test_docs: list[dict], train_docs: list[dict] | None = None,
                 num_fewshot: int | None = None):
    """lm-eval's task from the YAML at `path`, over these documents, with its default few-shot seed."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(path)
    splits = {"test": datasets.Dataset.from_list(test_docs)}
    if train_docs is not None:
        splits["train"] = datasets.Dataset.from_list(train_docs)
    config["custom_dataset"] = lambda **_: datasets.DatasetDict(splits)
    if num_fewshot is not None:
        config["num_fewshot"] = num_fewshot
    task = ConfigurableTask(config=config)
    task.set_fewshot_seed(LM_EVAL_SEED)
    task.build_all_requests(rank=0, world_size=1)
    return task


def lm_eval_contexts(task) -> list[str]:
    """The prompt text lm-eval sends for each test document, in order."""
    return [inst.arguments[0] for inst in sorted(task.instances, key=lambda i: i.doc_id)]


def lm_eval_scores(task, replies: list[str]) -> list[dict]:
    """For each test document (in order) with its reply: {filter name: {metric: value}}, as lm-eval's
    evaluator computes them (the task's filters, then `process_results` per filter)."""
    instances = sorted(task.instances, key=lambda i: i.doc_id)
    assert len(instances) == len(replies)
    for inst, reply in zip(instances, replies):
        inst.resps = [reply]
    task.apply_filters()
    return [{key: {m: float(v) for m, v in task.process_results(inst.doc, [inst.filtered_resps[key]]).items()}
             for key in inst.filtered_resps} for inst in instances]
