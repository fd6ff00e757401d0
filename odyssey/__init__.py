"""Odyssey's core: what pretraining (train/), sweeps (tune/) and serving (serve/) share.

model.py      the transformer (no Ray, no DeepSpeed)
tokenizer.py  byte-level BPE with task special tokens, and the task prompt format
data/         the multitask corpus: sources, schema, build, packing into token blocks
config.py     typed dataclass configs from YAML with --set overrides
artifact.py   a model on disk: safetensors weights + JSON config + tokenizer
"""

__version__ = "0.1.0"
