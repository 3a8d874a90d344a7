"""shardify: Hugging Face datasets and local copies to reproducible WebDataset shards."""

__version__ = "0.1.0"
