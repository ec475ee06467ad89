"""finetune_kit: turn a docs corpus into a validated fine-tuning dataset and a model you own."""

__version__ = "0.1.0"
