"""Dataset sources: one module per dataset family, each a `Source` (see base.py)."""
