"""The speed machinery: two faster ways to compute what heads.py and sampling.py compute with transformers' own
forward. Neither changes a number beyond float rounding (tests/test_fast.py checks both against the plain path on
tiny Llamas and at SmolLM2-135M's shape; tests/test_unpad.py and tests/test_decode.py each in detail), so a learner
can read heads.py and sampling.py as if this package did not exist.

- unpad.py, the fast FORWARD: heads.final_hidden (every log-prob, value, reward and KL pass) packs a padded batch's
  rows end to end without their padding, a prompt shared by several rows computed once, and puts each token's state
  back in its padded slot.
- decode.py, the fast DECODE: sampling.sample's next-token logits from a hand-written Llama-family forward over a
  preallocated KV cache, rows that have stopped dropped from the batch.

One switch each, process-wide, read at every call; both on by default. Every script has them as --fast-forward /
--no-fast-forward and --fast-decode / --no-fast-decode (settings.MachineArgs; run.Run sets them). A model the fast path
does not support (unpad.supports, decode.supports) takes the plain path whatever the switch says.
"""

FAST_FORWARD = True
"""heads.final_hidden packs its batch (unpad.py) when that saves work; False: always transformers' padded forward"""
FAST_DECODE = True
"""sampling.sample decodes with decode.py's forward; False: always transformers' forward and DynamicCache"""


def enable(forward=None, decode=None):
    """Set the switches (None leaves one as it is)."""
    global FAST_FORWARD, FAST_DECODE
    if forward is not None:
        FAST_FORWARD = bool(forward)
    if decode is not None:
        FAST_DECODE = bool(decode)
