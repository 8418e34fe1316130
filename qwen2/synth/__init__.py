"""Post-training data synthesis, the Qwen2 report's way: a model's own replies, kept or paired by
what checks them, become the data it is fine-tuned on next.

    rejection.py  rejection sampling with execution feedback: sample k replies per programming task,
                  run each reply's code with the task's tests in the sandbox, keep the replies that
                  pass (SFT records) and pair them against those that fail (DPO preference pairs)
    repurpose.py  data repurposing: passages of public-domain texts into summaries, extractive
                  questions (the answer a verbatim sentence), continuations and paraphrases
    constitution.py  constitutional feedback: draft, critique against each written principle, revise;
                  the revisions as SFT records and preference pairs (revision over draft)
    score.py      reward-model scores for the replies of a file (`qwen2 synth score`)
    verifiers.py  what decides a reply is right: the math answer (Math-Verify), the code's tests, or
                  a user's function (record, reply) -> bool, each run with a time limit

    from qwen2 import SamplingParams
    from qwen2.synth import rejection

    tasks = rejection.read_tasks("tasks.jsonl")
    samples = rejection.sample_and_score("samples.jsonl", tasks, "qwen2.5-coder-0.5b-instruct",
                                         SamplingParams(max_new_tokens=384, temperature=0.8), samples=8)
    sft, stats = rejection.sft_records(samples, {t["task_id"]: t for t in tasks}, per_task=2, fallback=False)
"""
