"""Packing for SFT: many short examples -> one stream -> fixed-length blocks, no padding wasted.

    stream = ids_1 + [eos] + ids_2 + [eos] + ... + ids_n + [eos]
    blocks = stream[0:L], stream[L:2L], ...              (N, L) with N = len(stream) // L

Every token of the stream lands in exactly one block, in order; only the last len(stream) % L tokens (a partial
block, shorter than L) are dropped. Attention crosses example boundaries inside a block (as in GPT-2/nanoGPT
pre-training); the EOS separators teach the model where one example ends and the next begins.
"""
import torch


def pack(token_id_lists, block_size, eos_id):
    """Join token_id_lists with an EOS after each, cut into (N, block_size) int64 blocks; the tail < block_size
    is dropped. Raises ValueError when there is not one full block."""
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"pack: block_size must be a positive int, got {block_size!r}")
    stream = []
    for ids in token_id_lists:
        stream.extend(ids)
        stream.append(eos_id)
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise ValueError(f"pack: {len(stream)} tokens (with EOS separators) do not fill one block of {block_size}")
    return torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)  # (N, L)
