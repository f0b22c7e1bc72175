"""The one exception type for bad input: a flag, a data file, a model or checkpoint folder the user gave us.

Every script's top level catches InputError alone and prints its message as one line
(`train_dpo.py: error: --lr must be > 0, got 0.0`); any other exception is a bug and keeps its traceback.
It subclasses ValueError so that library callers who catch ValueError keep working.
"""


class InputError(ValueError):
    """Bad input from the user. The message names the flag or file, the value, and what would be accepted."""


class Diverged(RuntimeError):
    """Training produced a non-finite loss, gradient or logits. Raised BEFORE the optimizer applies the step, so no
    NaN weight exists in memory or on disk; the run's last checkpoint (if any) is intact."""
