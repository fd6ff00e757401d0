"""The multitask corpus: public text on this machine (or the user's files) turned into examples of
one schema (schema.py), split by document (sampling.py), written as Parquet with a manifest
(corpus.py), and tokenized into packed blocks for training (packing.py).

Sources: debian.py (package descriptions -> summarize), python_stdlib.py (docstrings -> summarize,
functions -> code, source -> lm), legal.py (licenses and copyright files -> find), moderation.py
(labelled synthetic text -> moderate).
"""
