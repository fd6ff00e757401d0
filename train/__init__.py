"""Distributed pretraining: Ray Train runs DeepSpeed ZeRO over the core model (`python -m train`)."""
