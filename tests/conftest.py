"""Shared fixtures: a tiny random Llama built in memory (no download), and the same model saved to a folder; and
load_bench, the one way the tests import a bench/ script."""
import importlib.util
import os
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

# One intra-op thread: the test models are tiny, and when the 2 cores are shared with other processes, 2 OpenMP
# threads spin-wait on each other (measured here: tests/test_models.py + test_sampling.py 131 s with 2, 2.4 s with 1).
torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench(name):
    """bench/<name>.py as a module, with what it imports from its own folder (common) and the repository's root
    (the train_*.py scripts, imported for their Args) on sys.path, as when it runs as a script."""
    for folder in (REPO, os.path.join(REPO, "bench")):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            tie_word_embeddings=False)


def make_tiny_llama(seed=0, initializer_range=0.2, dtype=torch.float32, **overrides):
    """A 2-layer Llama with hidden size 32 and 101 tokens, in eval mode. A wide init (0.2, not 0.02) gives peaked,
    seed-dependent next-token distributions, so greedy decoding has no near-ties."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, "initializer_range": initializer_range, **overrides})
    return LlamaForCausalLM(config).to(dtype).eval()


def make_tiny_gpt2(seed=0, initializer_range=0.2, dtype=torch.float32):
    """A 2-layer GPT-2 (hidden 32, 101 tokens): learned ABSOLUTE positions, so unlike Llama's RoPE (which only sees
    relative positions) it gives wrong answers on left-padded input unless position ids come from the mask."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1,
                        eos_token_id=2, pad_token_id=0, initializer_range=initializer_range)
    return GPT2LMHeadModel(config).to(dtype).eval()


@pytest.fixture(autouse=True)
def fast_switches_on():
    """Every test starts and ends with minirlhf.fast's switches on, their default (a script run in-process with
    --no-fast-forward or --no-fast-decode turns one off for the whole process)."""
    from minirlhf import fast
    fast.enable(forward=True, decode=True)
    yield
    fast.enable(forward=True, decode=True)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """make_tiny_llama() saved with save_pretrained, for the from_pretrained / quantized paths."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama().save_pretrained(path)
    return str(path)


# ---- data: a tiny chat tokenizer built in memory (tests/test_templates.py, tests/test_tokenize.py) ----
CHATML = ("{% for message in messages %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_chat_tokenizer(chat_template=CHATML):
    """A byte-level BPE tokenizer (300 tokens, trained here in a few ms) wrapped in PreTrainedTokenizerFast, with a
    ChatML chat template, EOS <|im_end|> (id 2) and a distinct pad <|pad|> (id 0). No BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["What is the capital of France? Paris is the capital of France.",
                                 "Question: Answer: the user and the assistant"] * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   chat_template=chat_template)


@pytest.fixture(scope="session")
def chat_tokenizer():
    return make_chat_tokenizer()
