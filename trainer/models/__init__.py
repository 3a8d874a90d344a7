"""Model definitions and checkpoint loaders (Data2Vec2 ViT; BERT through transformers)."""
