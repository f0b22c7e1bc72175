"""The embedded default: files that let everything run offline on a CPU.

    tiny-llama/   a 1.87M-parameter LlamaForCausalLM (4 layers, hidden 192, vocab 512) and its BPE tokenizer
                  (ChatML template, <|pad|> != <|im_end|>), SFT-trained on the built-in world; load it like a Hub model:
                  AutoModelForCausalLM.from_pretrained(TINY_LLAMA), AutoTokenizer.from_pretrained(TINY_LLAMA)
Rebuild from scratch with `python -m minirlhf.assets.build` (see build.py).
"""
import os

ASSETS_DIR = os.path.dirname(os.path.abspath(__file__))
TINY_LLAMA = os.path.join(ASSETS_DIR, "tiny-llama")
