"""Rebuild the embedded default from scratch, deterministically:  python -m minirlhf.assets.build

    1. a byte-level BPE tokenizer (digits split one by one, VOCAB_SIZE tokens) trained on the built-in world's text,
       with a ChatML chat template, EOS <|im_end|> and a distinct <|pad|>;
    2. a fresh LlamaForCausalLM from MODEL_CONFIG (1.87M parameters, tied embeddings);
    3. train_sft.py on the world's SFT demonstrations (packed blocks), TRAIN_ARGS below;
    4. the result (config, safetensors, tokenizer) into minirlhf/assets/tiny-llama/, then the headroom check
       (check_headroom.py) prints the SFT model's gold scores on held-out prompts.
Other flags go to train_sft.py; `--threads 1` is much faster when other processes share the cores (measured: 2000
steps, 24 minutes with --threads 1 on 2 CPU cores busy with other jobs, about 3k tokens/s; the same steps run at
about 9k tokens/s on 2 idle cores). `--skip-train` only builds the tokenizer (a dry run).

What it printed (shipped model, 120 held-out prompts x 8 samples):
    sampled  gold 2.247 (56.2 % of max) | best(>=3.5) 26.4 % | ... | concise style 26.8 %, accuracy 93.4 %
    greedy   gold 3.233 (80.8 % of max) | best(>=3.5) 62.5 % | correct 99.2 % ...
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from minirlhf.assets import ASSETS_DIR, TINY_LLAMA
from minirlhf.assets.check_headroom import main as check_headroom
from minirlhf.atomic import atomic_directory
from minirlhf.data import world

REPO = os.path.dirname(os.path.dirname(ASSETS_DIR))
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|pad|>"]  # ids 0, 1, 2
# SmolLM2-Instruct's ChatML template without its default system prompt.
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
MODEL_CONFIG = {"model_type": "llama", "hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4,
                "num_attention_heads": 6, "num_key_value_heads": 6, "max_position_embeddings": 128,
                "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
TRAIN_ARGS = ["--dataset", "builtin", "--block-size", "128", "--batch-size", "16", "--max-steps", "2000",
              "--lr", "3e-3", "--warmup-steps", "60", "--eval-every", "250", "--seed", "0"]


def world_texts():
    """Every prompt and response of the world, chat-formatted, for training the BPE merges."""
    texts = []
    for split in world.SPLITS:
        for row in world.sft_rows(split):
            texts.append(f"<|im_start|>user\n{row['prompt'][0]['content']}<|im_end|>\n"
                         f"<|im_start|>assistant\n{row['response']}<|im_end|>\n")
        for row in world.preference_rows(split):
            texts.extend([row["chosen"], row["rejected"]])
    return texts


def build_tokenizer():
    """Byte-level BPE: any text round-trips; digits are pre-split so every number is one token per digit."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(world_texts(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
                                   model_max_length=MODEL_CONFIG["max_position_embeddings"])


def tidy_tokenizer_config(model_dir):
    """Drop load-time keys save_pretrained copies into tokenizer_config.json and name the class portably."""
    path = os.path.join(model_dir, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    config = {k: v for k, v in config.items() if k not in ("is_local", "local_files_only")}
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers 5 maps it to TokenizersBackend
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    start = time.time()
    work = tempfile.mkdtemp(prefix="minirlhf-build-")
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(work)  # the config beside it makes `work` a weightless HF model folder
    config = {**MODEL_CONFIG, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None}
    with open(os.path.join(work, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    print(f"tokenizer: {len(tokenizer)} tokens; model config: {json.dumps(config)}")
    if "--skip-train" in argv:
        shutil.rmtree(work, ignore_errors=True)
        return
    try:
        run = os.path.join(work, "run")
        cmd = [sys.executable, os.path.join(REPO, "train_sft.py"), "--init-config", os.path.join(work, "config.json"),
               "--tokenizer", work, "--out", run, *TRAIN_ARGS, *argv]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)

        def install(tmp_dir):
            shutil.copytree(os.path.join(run, "model"), tmp_dir, dirs_exist_ok=True)
            tidy_tokenizer_config(tmp_dir)
            for name in os.listdir(tmp_dir):
                os.chmod(os.path.join(tmp_dir, name), 0o644)  # readable by everyone, like any file in the repo
        atomic_directory(TINY_LLAMA, install)  # readers never see a half-written folder
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {TINY_LLAMA} in {time.time() - start:.0f}s")
    check_headroom([])


if __name__ == "__main__":
    main()
