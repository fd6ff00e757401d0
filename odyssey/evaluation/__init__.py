"""`odyssey eval`: how well a model does each task on held-out examples.

metrics.py     the scores, pure functions (ROUGE-L, per-label P/R/F1, recall@k + MRR, perplexity)
inference.py   a model's raw answers to a shard of examples (no Ray)
runner.py      shards -> Ray tasks -> metrics -> report (JSON + markdown)
"""
