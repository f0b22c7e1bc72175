"""The pad token (minirlhf/padding.py): which existing token is reused, when "<|pad|>" is added, and what growing the
embeddings to a multiple of 64 does (and does not do) to the model. Every tokenizer is built here, offline: a
97-word WordLevel vocabulary plus the special tokens of each case, so a case with 4 specials has len 101, the
vocabulary of conftest's tiny Llama."""
import math
import os

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from conftest import make_tiny_llama
from minirlhf.assets import TINY_LLAMA
from minirlhf.padding import (PAD_TOKEN, VOCAB_MULTIPLE, ensure_pad_token, padded_vocab_size, release_file_pages,
                              resize_for_tokenizer, unused_pad_candidate)

WORDS = [f"w{i}" for i in range(97)]
CHAT = "{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
SMOL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<file_sep>", "<jupyter_code>"]  # as SmolLM2's
SMOL_CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tokenizer(specials, eos="<|end|>", pad=None, bos=None, unk=None, chat_template=CHAT):
    """WORDS (ids 0-96) then `specials` (ids 97, 98, ... in that order) as special tokens."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=pad, bos_token=bos,
                                   unk_token=unk, chat_template=chat_template)


def smol_like():
    """SmolLM2-135M-Instruct's special-token layout in miniature: pad == eos == <|im_end|>, bos <|im_start|>,
    unk <|endoftext|>, and code-data specials that are real pretraining tokens. 97 + 5 = 102 tokens."""
    return make_tokenizer(SMOL_SPECIALS, eos="<|im_end|>", pad="<|im_end|>", bos="<|im_start|>", unk="<|endoftext|>",
                          chat_template=SMOL_CHAT)


# ---- unused_pad_candidate: the rule, case by case ----

@pytest.mark.parametrize("specials, kwargs, expected", [
    # Llama 3: reserved slots only -> the lowest N, whatever its id
    (["<|end|>", "<|reserved_special_token_1|>", "<|reserved_special_token_0|>", "<|reserved_special_token_10|>"],
     {}, "<|reserved_special_token_0|>"),
    # Llama 3.1's layout (ids 128000-128004 in miniature): the pad-named slot beats the reserved ones before it
    (["<|begin_of_text|>", "<|end|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
      "<|finetune_right_pad_id|>"], {"bos": "<|begin_of_text|>"}, "<|finetune_right_pad_id|>"),
    # the listed pad names in their order of preference, before any other name containing "pad"
    (["<|end|>", "<|fim_pad|>", "<|padding|>", "[PAD]"], {}, "[PAD]"),
    (["<|end|>", "<|fim_pad|>", "<|padding|>"], {}, "<|padding|>"),
    (["<|end|>", "<|reserved_special_token_0|>", "<|FIM_PAD|>"], {}, "<|FIM_PAD|>"),
    # Gemma / BERT style unused slots, lowest N
    (["<|end|>", "<unused12>", "<unused3>"], {}, "<unused3>"),
    (["<|end|>", "[unused7]", "[unused2]"], {}, "[unused2]"),
    # SmolLM2: none of its specials is meant for padding
    (SMOL_SPECIALS, {"eos": "<|im_end|>", "pad": "<|im_end|>", "bos": "<|im_start|>", "unk": "<|endoftext|>",
                     "chat_template": SMOL_CHAT}, None),
    # a candidate the chat template writes is a real token of every conversation: skipped
    (["<|end|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>"],
     {"chat_template": CHAT + "<|reserved_special_token_0|>"}, "<|reserved_special_token_1|>"),
    (["<|end|>", "<|reserved_special_token_0|>"], {"chat_template": CHAT + "<|reserved_special_token_0|>"}, None),
    # ... in any of several named templates
    (["<|end|>", "<|reserved_special_token_0|>"],
     {"chat_template": {"default": CHAT, "tool_use": "<|reserved_special_token_0|>"}}, None),
    # EOS, BOS and UNK are never the pad, whatever their names
    (["<|pad|>", "<|reserved_special_token_0|>"], {"eos": "<|pad|>", "pad": "<|pad|>"}, "<|reserved_special_token_0|>"),
    (["<|end|>", "<pad>"], {"bos": "<pad>"}, None),
    (["<|end|>", "<unused0>"], {"unk": "<unused0>"}, None),
])
def test_unused_pad_candidate(specials, kwargs, expected):
    tok = make_tokenizer(specials, **kwargs)
    assert unused_pad_candidate(tok) == expected


# ---- ensure_pad_token: kept / reused / added ----

def test_kept_when_pad_differs_from_eos():
    tok = AutoTokenizer.from_pretrained(TINY_LLAMA)  # the embedded default: <|pad|> (id 2) != <|im_end|>
    before = (len(tok), tok.pad_token, tok.pad_token_id)
    assert ensure_pad_token(tok) == "kept"
    assert (len(tok), tok.pad_token, tok.pad_token_id) == before == (512, "<|pad|>", 2)
    assert tok.pad_token_id != tok.eos_token_id


def test_reused_leaves_the_vocabulary_unchanged():
    tok = make_tokenizer(["<|end|>", "<|reserved_special_token_1|>", "<|reserved_special_token_0|>"])
    assert tok.pad_token is None
    assert ensure_pad_token(tok) == "reused"
    assert (tok.pad_token, tok.pad_token_id, len(tok)) == ("<|reserved_special_token_0|>", 99, 100)
    assert tok("w5 <|reserved_special_token_0|>").input_ids == [5, 99]  # the id the tokenizer had all along


@pytest.mark.parametrize("make", [
    lambda: make_tokenizer(["<|start|>", "<|end|>", "<|tool|>", "<|sep|>"]),  # only EOS, no pad
    lambda: make_tokenizer(["<|start|>", "<|end|>", "<|tool|>", "<|sep|>"], pad="<|end|>"),  # pad == EOS
    smol_like,
], ids=["no-pad", "pad-is-eos", "smollm2-like"])
def test_added_when_nothing_can_be_reused(make):
    tok = make()
    n, eos_id = len(tok), tok.eos_token_id
    assert ensure_pad_token(tok) == "added"
    assert (tok.pad_token, tok.pad_token_id, len(tok)) == (PAD_TOKEN, n, n + 1)  # a new id, after all the others
    assert tok.eos_token_id == eos_id != tok.pad_token_id
    assert ensure_pad_token(tok) == "kept"  # idempotent


# ---- padded_vocab_size and resize_for_tokenizer ----

@pytest.mark.parametrize("n, expected", [(1, 64), (63, 64), (64, 64), (65, 128), (102, 128), (49153, 49216),
                                         (50257, 50304), (128256, 128256), (128257, 128320)])
def test_padded_vocab_size(n, expected):
    assert padded_vocab_size(n) == expected
    assert padded_vocab_size(n, 8) == 8 * math.ceil(n / 8)


@pytest.mark.parametrize("tied", [False, True])
def test_resize_rounds_up_keeps_old_rows_and_ties(tied):
    tok = make_tokenizer(["<|start|>", "<|end|>", "<|tool|>", "<|sep|>"])  # 101 tokens, as the model's vocabulary
    model = make_tiny_llama(tie_word_embeddings=tied)
    V = model.config.vocab_size
    assert len(tok) == V == 101
    old_embed = model.get_input_embeddings().weight.detach().clone()
    old_head = model.get_output_embeddings().weight.detach().clone()
    ids = torch.randint(0, V, (3, 11), generator=torch.Generator().manual_seed(1))  # (B, T) old tokens only
    with torch.no_grad():
        old_logits = model(ids).logits  # (B, T, V)

    assert ensure_pad_token(tok) == "added"
    rng = torch.get_rng_state()
    rows = resize_for_tokenizer(model, tok)
    assert torch.equal(torch.get_rng_state(), rng)  # mean-resizing's draw did not move the caller's RNG

    assert rows == 128 == padded_vocab_size(102) and rows % VOCAB_MULTIPLE == 0
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert embed.shape == head.shape == (128, 32)
    assert model.config.vocab_size == 128
    assert (embed.data_ptr() == head.data_ptr()) == tied  # tied stays one tensor; untied stays two
    assert torch.equal(embed[:V], old_embed) and torch.equal(head[:V], old_head)  # old rows copied bit for bit
    with torch.no_grad():
        new_logits = model(ids).logits  # (B, T, 128)
        pad_logits = model(torch.full((1, 3), tok.pad_token_id)).logits  # the new id has a row: no index error
    assert new_logits.shape == (3, 11, 128) and torch.isfinite(pad_logits).all()
    # same hidden states, same old LM-head rows -> the same old logits (atol: a GEMM with more columns may block
    # its sums differently; it is exact here)
    torch.testing.assert_close(new_logits[..., :V], old_logits, rtol=0, atol=1e-6)
    # mean-resizing: each of the k = 27 new rows is (almost exactly) the mean old row, so its logit is the mean old
    # logit and by Jensen the new rows take at most k / (V + k) of the mass: every old log-prob drops by between 0
    # and log(1 + k/V) (1e-5: the new rows carry N(0, 1e-9 cov) noise around the mean)
    drop = old_logits.log_softmax(-1) - new_logits.log_softmax(-1)[..., :V]  # (B, T, V)
    assert drop.min() > 0 and drop.max() <= math.log1p(27 / V) + 1e-5
    torch.testing.assert_close(new_logits[..., V:], old_logits.mean(-1, keepdim=True).expand(-1, -1, 27),
                               rtol=0, atol=1e-3)


def test_no_resize_when_the_tokenizer_fits():
    model = make_tiny_llama()  # 101 rows: odd, but it covers every id, so it is left alone
    embed = model.get_input_embeddings().weight
    for specials in (["<|start|>", "<|end|>", "<|tool|>", "<|sep|>"], ["<|end|>"]):  # len 101, len 98
        assert resize_for_tokenizer(model, make_tokenizer(specials)) is None
    assert model.get_input_embeddings().weight is embed and model.config.vocab_size == 101

    tok = AutoTokenizer.from_pretrained(TINY_LLAMA)  # the embedded default: 512 tokens, 512 rows
    tiny = AutoModelForCausalLM.from_pretrained(TINY_LLAMA)
    assert ensure_pad_token(tok) == "kept" and resize_for_tokenizer(tiny, tok) is None
    assert tiny.get_input_embeddings().weight.shape[0] == tiny.config.vocab_size == 512


def test_reused_pad_needs_no_resize():
    tok = make_tokenizer(["<|start|>", "<|end|>", "<|reserved_special_token_0|>", "<|finetune_right_pad_id|>"])
    model = make_tiny_llama()
    assert ensure_pad_token(tok) == "reused" and tok.pad_token == "<|finetune_right_pad_id|>"
    assert resize_for_tokenizer(model, tok) is None and model.config.vocab_size == len(tok) == 101


def _mapped_kib(path):
    """KiB of `path`'s pages resident in this process (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux: reads /proc/self/smaps")
def test_release_file_pages_unmaps_only_the_tensor(tmp_path):
    """A weight read through a memory map, as transformers reads safetensors: after release_file_pages the pages wholly
    inside it leave the process's resident memory, and the neighbour that shares a page with it keeps its values."""
    path = str(tmp_path / "weights.bin")
    values = torch.arange(3 * 2**18, dtype=torch.float32)  # 3 MiB: two "tensors" of 1.5 MiB, back to back
    values.numpy().tofile(path)
    mapped = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c"))  # private copy-on-write map, like safetensors
    first, second = mapped[: 3 * 2**17 + 5], mapped[3 * 2**17 + 5:]  # a boundary in the middle of a page
    assert first.sum().item() > 0 and second.sum().item() > 0  # read every page
    before = _mapped_kib(path)
    assert before >= 3 * 1024 - 8
    release_file_pages(first)
    after = _mapped_kib(path)
    # at least the first tensor's whole pages (a kernel that maps the file in large folios may drop a neighbouring
    # part of one too: those pages are read from the file again when touched, below)
    assert before - after >= 1.5 * 1024 - 8
    assert torch.equal(second, values[3 * 2**17 + 5:])  # the neighbour, sharing a page with it, is intact
    assert torch.equal(first, values[: 3 * 2**17 + 5])  # a file-backed page comes back from the file if read
