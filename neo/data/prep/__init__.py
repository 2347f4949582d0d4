"""Corpus preparation, run offline before training (docs/data.md):

    create_tfrecords.py  a folder of text -> GPT-Neo tfrecords
                         (`python -m neo.data.prep.create_tfrecords`, data/create_tfrecords.py)
    train_tokenizer.py   a byte-level BPE tokenizer trained on a folder of text
                         (`python -m neo.data.prep.train_tokenizer`, data/train_tokenizer.py)
    documents.py         documents from the formats corpora come in (.txt, .jsonl[.zst|.gz], tars)
    cleaning.py          optional ftfy repair and WikiText detokenisation

The runtime token sources the training loop reads are one level up, in neo/data/.
"""
