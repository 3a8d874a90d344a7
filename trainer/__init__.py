"""trainer: streaming knowledge-distillation training on shardify's WebDataset shards."""

__version__ = "0.1.0"
