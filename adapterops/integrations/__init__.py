"""Trainer glue: `adapterops.integrations.transformers` (the HF Trainer, TRL, accelerate).

Nothing in adapterops imports this package; each module imports its framework when it is
imported itself.
"""
