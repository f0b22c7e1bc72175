"""The data: loaders for the Hub data sets of the real-model setups (loading.py, one normaliser per source in
sources.py), prompt formats (templates.py), tokenisation and collation (tokenize.py), packing for SFT (packing.py),
the built-in world (world.py).
"""
from .loading import (KNOWN_PREFERENCE_DATASETS, KNOWN_PROMPT_DATASETS, describe_source, load_preference_dataset,
                      load_prompt_dataset)

__all__ = ["KNOWN_PREFERENCE_DATASETS", "KNOWN_PROMPT_DATASETS", "describe_source", "load_preference_dataset",
           "load_prompt_dataset"]
