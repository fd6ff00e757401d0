"""The multitask corpus: public text (on this machine, or a public dataset) turned into examples of one
schema (schema.py), near-duplicates grouped (neardup.py), split by group (sampling.py), written as
Parquet with a manifest (corpus.py), and tokenized into packed blocks for training (packing.py). The
parallel stages run in this process or as Ray Data pipelines over the cluster (parallel.py).

Sources that exist wherever Python runs: python_stdlib.py (docstrings -> summarize, functions -> code,
source -> lm), pydist.py (installed distributions' descriptions -> summarize, lm), legal.py (license
texts of the installed distributions, and Debian's where present -> find); extras where present:
debian.py (package descriptions -> summarize); made: moderation.py (labelled synthetic text ->
moderate); brought: adapters.py (public datasets in their own layouts -> any task).
"""
