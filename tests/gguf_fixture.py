"""Write a Llama model folder as a GGUF file, as llama.cpp's converter lays it out, so that the GGUF path
(minirlhf/assets/smollm2.py) is tested offline on the embedded tiny model instead of a downloaded file.

Layout (llama.cpp's convert_hf_to_gguf for LlamaForCausalLM): tensors renamed to token_embd / blk.N.attn_q / ... /
output_norm; the q and k projections' rows permuted from Hugging Face's rotate-half order to llama.cpp's interleaved
RoPE order (transformers undoes it when it reads the file); the tokenizer as a byte-level BPE ("gpt2") vocabulary
with its merges and token types; the chat template. Tensors are written in float32, so a round trip is exact.
"""
import json
import os

import numpy as np
import torch
from safetensors.torch import load_file

NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
         "lm_head.weight": "output.weight"}
LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def permute(w, n_head):
    """llama.cpp's q/k row order: within each head, rows (0, d/2, 1, d/2+1, ...) instead of (0, 1, ..., d-1)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(name):
    if name in NAMES:
        return NAMES[name]
    _, _, i, rest = name.split(".", 3)  # model.layers.<i>.<module>.weight
    return f"blk.{i}.{LAYER[rest.rsplit('.', 1)[0]]}.weight"


def write_gguf(model_dir, path):
    import gguf
    config = json.load(open(os.path.join(model_dir, "config.json")))
    tok = json.load(open(os.path.join(model_dir, "tokenizer.json")))
    template = open(os.path.join(model_dir, "chat_template.jinja")).read()
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-llama")
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    w.add_rope_dimension_count(config["hidden_size"] // n_head)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(config["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {t["id"]: t["content"] for t in tok["added_tokens"]}
    tokens = [added.get(i, t) for t, i in vocab] + [added[i] for i in sorted(added) if i >= len(vocab)]
    types = [gguf.TokenType.CONTROL if i in added else gguf.TokenType.NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(config["eos_token_id"])
    w.add_pad_token_id(config["pad_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(template)

    weights = load_file(os.path.join(model_dir, "model.safetensors"))
    for name, tensor in weights.items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        array = tensor.to(torch.float32).numpy()
        if name.endswith("q_proj.weight"):
            array = permute(array, n_head)
        elif name.endswith("k_proj.weight"):
            array = permute(array, n_kv)
        w.add_tensor(gguf_name(name), np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
