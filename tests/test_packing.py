"""pack(): every token lands in exactly one block, in order; only the partial tail block is dropped."""
import random

import pytest
import torch

from minirlhf.data.packing import pack

EOS = 1


def _reference_stream(lists, eos):
    """Independent reference: the stream written as one comprehension."""
    return [t for ids in lists for t in [*ids, eos]]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("block_size", [1, 7, 13, 128])
def test_no_token_lost_or_duplicated(seed, block_size):
    rng = random.Random(seed)
    lists = [[rng.randrange(2, 500) for _ in range(rng.randint(0, 40))] for _ in range(rng.randint(40, 97))]
    blocks = pack(lists, block_size, EOS)
    stream = _reference_stream(lists, EOS)
    n = len(stream) // block_size
    assert blocks.shape == (n, block_size) and blocks.dtype == torch.long
    assert blocks.flatten().tolist() == stream[: n * block_size]  # in order, nothing lost or duplicated ...
    assert len(stream) - blocks.numel() == len(stream) % block_size < block_size  # ... except the tail
    assert (blocks == EOS).sum().item() == stream[: n * block_size].count(EOS)  # one EOS after each example


def test_exact_fit_drops_nothing():
    blocks = pack([[5, 6, 7], [8, 9, 10]], 4, EOS)
    assert blocks.tolist() == [[5, 6, 7, EOS], [8, 9, 10, EOS]]


def test_empty_example_is_just_its_eos():
    assert pack([[5], [], [6]], 2, EOS).tolist() == [[5, EOS], [EOS, 6]]


def test_too_little_data_or_bad_block_size_is_a_clear_error():
    with pytest.raises(ValueError, match="do not fill one block"):
        pack([[5, 6]], 8, EOS)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="block_size must be a positive int"):
            pack([[5, 6]], bad, EOS)
