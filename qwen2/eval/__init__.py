"""Evaluation: HumanEval in a sandbox, sliding-window perplexity, passkey / needle retrieval, and a
bridge to EleutherAI's lm-evaluation-harness (`qwen2.eval.lm_eval_adapter`, imported only on use).

    sandbox.py         run untrusted code in a separate, limited process
    humaneval.py       the 164 HumanEval problems, Qwen2.5-Coder instruct protocol, pass@k, resumable
    perplexity.py      sliding-window perplexity (HF's stride convention), of one text or pooled over several
    retrieval.py       synthetic passkey / needle prompts at a chosen length and depth, and scoring
    answers.py         final answers in generated replies (`#### <n>`, the last number), scored
    lm_eval_adapter.py `lm_eval` model "qwen2" (needs `pip install lm-eval`)
"""
