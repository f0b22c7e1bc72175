"""The embedded default (minirlhf/assets/tiny-llama): loads offline like a Hub model, small, trained, rebuildable."""
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from minirlhf.assets import ASSETS_DIR, TINY_LLAMA
from minirlhf.data import world


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY_LLAMA, local_files_only=True)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(TINY_LLAMA, local_files_only=True).eval()


def test_special_tokens(tok):
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.convert_tokens_to_ids("<|im_start|>") not in (tok.pad_token_id, tok.eos_token_id)


def test_digits_are_single_tokens(tok):
    for d in "0123456789":
        assert tok.decode(tok.encode(d, add_special_tokens=False)) == d
        assert len(tok.encode(d, add_special_tokens=False)) == 1
    ids = tok.encode("What is 1234 plus 56?", add_special_tokens=False)
    assert [tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()] == list("123456")


def test_chat_template_is_chatml_without_system_prompt(tok):
    messages = [{"role": "user", "content": "What is 3 plus 4?"}]
    assert tok.apply_chat_template(messages, tokenize=False) == "<|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n"
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n<|im_start|>assistant\n")
    turns = [{"role": "system", "content": "Be brief."}, *messages, {"role": "assistant", "content": "7."}]
    assert tok.apply_chat_template(turns, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n"
        "<|im_start|>assistant\n7.<|im_end|>\n")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and tok.eos_token_id in ids


def test_world_text_round_trips(tok):
    rows = world.sft_rows("test")[:200] + [{"prompt": r["prompt"], "response": r["chosen"] + " 12 x\n y"}
                                          for r in world.preference_rows("test")[:100]]
    for r in rows:
        for text in (r["prompt"][0]["content"], r["response"]):
            assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_model_loads_and_is_tiny(model, tok):
    n = sum(p.numel() for p in model.parameters())
    assert type(model).__name__ == "LlamaForCausalLM" and 1_000_000 <= n <= 5_000_000
    assert model.config.vocab_size == len(tok) and model.config.tie_word_embeddings
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()


def test_model_is_trained_on_the_world(model, tok):
    """Held-out demonstrations: per-token loss far below a uniform guess (log V = 6.2 nats)."""
    texts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) + r["response"]
             + tok.eos_token for r in world.sft_rows("test")[:64]]
    tok.padding_side = "right"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with torch.no_grad():
        loss = model(**enc, labels=labels).loss.item()
    assert loss < 0.8, loss


def test_assets_are_small():
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ASSETS_DIR) for f in fs)
    assert total <= 20 * 2**20, total
    assert os.path.isfile(os.path.join(TINY_LLAMA, "model.safetensors"))


def test_tokenizer_rebuild_is_deterministic():
    """build.build_tokenizer() (the first step of `python -m minirlhf.assets.build`) gives the shipped vocabulary."""
    from minirlhf.assets.build import build_tokenizer
    shipped = json.load(open(os.path.join(TINY_LLAMA, "tokenizer.json")))["model"]
    rebuilt = json.loads(build_tokenizer().backend_tokenizer.to_str())["model"]
    assert rebuilt["vocab"] == shipped["vocab"] and rebuilt["merges"] == shipped["merges"]


# ---- train_sft.py, the script that builds the model (in-process, a few steps) ------------------------------------

@pytest.fixture
def train_sft(monkeypatch):
    """The train_sft module, its data cut to 300 demonstrations so a smoke run takes seconds."""
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo not in sys.path:
        sys.path.insert(0, repo)
    import train_sft
    rows = world.sft_rows
    monkeypatch.setattr(train_sft.world, "sft_rows", lambda split: rows(split)[:300])
    return train_sft


def test_train_sft_fine_tunes_every_parameter_and_writes_the_contract(tmp_path, train_sft):
    out = tmp_path / "run"
    args = train_sft.Args(model=TINY_LLAMA, max_steps=2, batch_size=2, block_size=64, log_every=1, eval_every=2,
                          lr=1e-3, warmup_steps=1, full_finetune=True, out=str(out))
    summary = train_sft.main(args)
    assert {"time/total_seconds", "params/trainable", "params/total", "train/loss", "eval/loss"} <= set(summary)
    assert summary["params/trainable"] == summary["params/total"]
    assert json.load(open(out / "args.json"))["max_steps"] == 2
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2]
    before = AutoModelForCausalLM.from_pretrained(TINY_LLAMA).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    assert before.keys() == after.keys()
    assert all(not torch.equal(before[k], after[k]) for k in before), "a parameter did not move"
    assert AutoTokenizer.from_pretrained(out / "model").pad_token == "<|pad|>"


def test_train_sft_max_eval_blocks_bounds_every_evaluation(tmp_path, train_sft, monkeypatch):
    """--max-eval-blocks N: the periodic and the final held-out loss cover the first N blocks of the test split, and
    summary.json and the last line say how many of how many; 0 evaluates them all."""
    seen = []
    eval_loss = train_sft.eval_loss
    monkeypatch.setattr(train_sft, "eval_loss", lambda model, data, rows: seen.append(data[0]) or eval_loss(
        model, data, rows))
    runs = {}
    for limit in (0, 3):
        seen.clear()
        summary = train_sft.main(train_sft.Args(model=TINY_LLAMA, max_steps=2, batch_size=2, block_size=64,
                                                log_every=1, eval_every=1, max_eval_blocks=limit, threads=1,
                                                out=str(tmp_path / str(limit))))
        assert len(seen) == 2  # steps 1 and 2 (the last one's is the final eval/loss)
        runs[limit] = summary, list(seen)
    (whole, whole_seen), (bounded, bounded_seen) = runs[0], runs[3]
    available = len(whole_seen[0])
    assert available > 3 and whole["eval/blocks"] == whole["eval/blocks_available"] == available
    assert (bounded["eval/blocks"], bounded["eval/blocks_available"]) == (3, available)
    for blocks in bounded_seen:
        assert torch.equal(blocks, whole_seen[0][:3])  # the first 3 blocks, at every evaluation
    assert bounded["train/loss"] == whole["train/loss"]  # the bound changes the evaluation only
    assert bounded["eval/loss"] != whole["eval/loss"]


def test_train_sft_from_a_config(tmp_path, train_sft):
    config = json.dumps({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "vocab_size": 512, "tie_word_embeddings": True})
    args = train_sft.Args(init_config=config, tokenizer=TINY_LLAMA, max_steps=1, batch_size=2, block_size=64,
                          out=str(tmp_path / "fresh"))
    summary = train_sft.main(args)
    assert summary["params/total"] < 100_000 and (tmp_path / "fresh" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("change, message", [(dict(init_config="{}"), "needs --tokenizer"),
                                             (dict(dataset="squad"), "unknown"),
                                             (dict(merge=True, full_finetune=True), "--merge")])
def test_train_sft_bad_input_is_a_clear_error(tmp_path, train_sft, change, message):
    with pytest.raises(ValueError, match=message):
        train_sft.main(train_sft.Args(out=str(tmp_path / "x"), **change))


def test_train_sft_lora_completion_only_and_merge(tmp_path, train_sft):
    """LoRA SFT without packing (loss on responses only), then --merge: the merged model saved with save_pretrained
    gives the same logits as the base with the saved adapter on top, and the frozen base never moved."""
    from minirlhf import lora
    from minirlhf.formats import load_adapter
    out = tmp_path / "lora"
    args = train_sft.Args(model=TINY_LLAMA, max_steps=3, batch_size=4, block_size=48, log_every=1, eval_every=3,
                          lr=1e-2, warmup_steps=1, packing=False, merge=True, threads=1, out=str(out))
    summary = train_sft.main(args)
    assert summary["params/frozen_unchanged"] is True
    assert 0 < summary["params/trainable"] < summary["params/total"]
    ids = torch.tensor([[5, 17, 42, 99, 7, 64, 3]])
    merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    base = AutoModelForCausalLM.from_pretrained(TINY_LLAMA).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        load_adapter(base, str(out / "adapter"), adapter="sft")
        lora.set_active_adapter(base, "sft")
        adapted = base(ids).logits
        merged_logits = merged(ids).logits
    assert not torch.allclose(adapted, base_logits, atol=1e-4), "the adapter did not train"
    assert torch.allclose(merged_logits, adapted, atol=1e-4)


def test_completion_only_loss_masks_the_prompt(train_sft):
    """Without packing, only response tokens (and their EOS) carry loss."""
    from minirlhf.models import load_tokenizer
    tok = load_tokenizer(TINY_LLAMA)
    rows = world.sft_rows("test")[:3]
    args = train_sft.Args(block_size=64, max_prompt_length=64)
    ids, attention, loss_mask = train_sft.padded_examples(tok, rows, args)
    for i, r in enumerate(rows):
        real = ids[i][attention[i].bool()].tolist()
        response = real[len(real) - int(loss_mask[i].sum()):]
        assert tok.decode(response[:-1]) == r["response"] and response[-1] == tok.eos_token_id
