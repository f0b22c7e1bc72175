"""What minirlhf writes and reads back (minirlhf/formats.py): LoRA adapters in PEFT's on-disk format, checked against
PEFT itself (the independent reference implementation: it loads what we save and gives the same outputs, and we load
what it saves), and heads. Bad folders and files, one InputError line each: tests/test_model_files.py."""
import copy
import json
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from minirlhf import lora
from minirlhf.formats import load_adapter, load_head, save_adapter, save_head
from minirlhf.heads import RatingHead, ScalarHead
from test_lora import ALL_LINEAR, ids, logits, lora_names, randomize_B, tiny_llama  # the LoRA tests' tiny models


# ---- PEFT's on-disk format ----------------------------------------------------------------------------------------

def test_save_load_round_trip_exact(tmp_path):
    model, x = tiny_llama(), ids()
    lora.add_lora(model, ["q_proj", "v_proj"], r=4, alpha=16, dropout=0.1, adapter="policy")
    randomize_B(model, "policy")
    want = logits(model, x)
    save_adapter(model, tmp_path / "ad", "policy")
    assert sorted(os.listdir(tmp_path / "ad")) == ["adapter_config.json", "adapter_model.safetensors"]  # no temp files
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 16, 0.1)
    assert config["target_modules"] == ["q_proj", "v_proj"]
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "ad" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys and len(keys) == 8

    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "ad", "loaded")
    assert lora.active_adapter(fresh) == "loaded"
    assert torch.equal(logits(fresh, x), want)
    assert not fresh.model.layers[0].self_attn.q_proj.lora_dropout["loaded"].training  # an eval model stays in eval
    assert all(not p.requires_grad for p in lora.lora_parameters(fresh, "loaded"))  # frozen unless trainable=True
    load_adapter(fresh, tmp_path / "ad", "again", trainable=True)
    assert all(p.requires_grad for p in lora.lora_parameters(fresh, "again"))
    with torch.no_grad():  # loading into an existing adapter overwrites its weights
        lora.lora_parameters(fresh, "loaded")[1].zero_()
    load_adapter(fresh, tmp_path / "ad", "loaded")
    assert torch.equal(logits(fresh, x), want)


def test_peft_loads_what_we_save(tmp_path):
    peft = pytest.importorskip("peft")
    model, x = tiny_llama(torch.float32), ids()
    base = copy.deepcopy(model)
    lora.add_lora(model, "all-linear", r=4, alpha=8)
    randomize_B(model, "default")
    save_adapter(model, tmp_path / "ad")
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "ad").eval()
    assert theirs.peft_config["default"].target_modules == set(t.split(".")[1] for t in ALL_LINEAR)
    torch.testing.assert_close(logits(theirs, x), logits(model, x), atol=1e-6, rtol=0)


def test_we_load_what_peft_saves(tmp_path):
    peft = pytest.importorskip("peft")
    base, x = tiny_llama(torch.float32), ids()
    ours = copy.deepcopy(base)
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["k_proj", "down_proj"], task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(base, config)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "ad")
    load_adapter(ours, tmp_path / "ad", "peft")
    assert lora_names(ours, "peft") == {f"model.layers.{i}.{t}" for i in range(2) for t in
                                        ["self_attn.k_proj", "mlp.down_proj"]}
    torch.testing.assert_close(logits(ours, x), logits(theirs.eval(), x), atol=1e-6, rtol=0)


def test_load_rejects_an_adapter_that_does_not_fit(tmp_path):
    model = tiny_llama()
    lora.add_lora(model, ["q_proj"], r=4, alpha=8)
    save_adapter(model, tmp_path / "ad")
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"does not fit this model .*q_proj.lora_A.weight', \(4, 32\), \(4, 64\)"):
        load_adapter(wider, tmp_path / "ad")
    assert lora.adapter_names(wider) == []  # nothing half-added
    deeper = LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"'base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight', None"):
        load_adapter(deeper, tmp_path / "ad")
    lora.add_lora(model, ["q_proj"], r=2, alpha=8, adapter="small")
    save_adapter(model, tmp_path / "small", "small")
    with pytest.raises(ValueError, match="exists with other modules or rank"):
        load_adapter(model, tmp_path / "small", "default")
    cfg_path = tmp_path / "ad" / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "use_dora": True}))
    with pytest.raises(ValueError, match="only plain LoRA"):
        load_adapter(tiny_llama(), tmp_path / "ad")


# ---- heads --------------------------------------------------------------------------------------------------------

def test_head_save_load_round_trip_and_mismatch(tmp_path):
    for head in (ScalarHead(16), RatingHead(16, num_classes=5)):
        path = tmp_path / type(head).__name__
        save_head(head, path)
        assert sorted(os.listdir(path)) == ["head.safetensors", "head_config.json"]  # no temp files left
        loaded = load_head(path, hidden_size=16)
        x = torch.randn(3, 16)
        assert type(loaded) is type(head) and torch.equal(loaded(x), head(x))
    save_head(ScalarHead(256), tmp_path / "big")
    with pytest.raises(ValueError, match="scalar head in .* expects hidden size 256 but the model has 128"):
        load_head(tmp_path / "big", hidden_size=128)
    with pytest.raises(ValueError, match="is a scalar head, expected a rating head"):
        load_head(tmp_path / "big", kind="rating")
    with pytest.raises(ValueError, match="not a saved head"):
        load_head(tmp_path / "missing")


def test_head_records_the_base_precision_it_was_trained_on(tmp_path):
    """save_head(base=...) writes the base's precision into head_config.json; a head saved without one has none (and
    loads); a malformed record is one InputError line."""
    from minirlhf.errors import InputError
    from minirlhf.folders import read_head_config
    save_head(ScalarHead(16), tmp_path / "q", base={"quantization": "4bit", "dtype": "bfloat16"})
    assert read_head_config(tmp_path / "q")["base"] == {"quantization": "4bit", "dtype": "bfloat16"}
    save_head(ScalarHead(16), tmp_path / "plain")
    assert "base" not in read_head_config(tmp_path / "plain")
    load_head(tmp_path / "plain", hidden_size=16)
    config = json.loads((tmp_path / "q" / "head_config.json").read_text())
    for bad in ("4bit", {"quantization": "4bit"}, {"quantization": 4, "dtype": "float32"}):
        (tmp_path / "q" / "head_config.json").write_text(json.dumps({**config, "base": bad}))
        with pytest.raises(InputError, match="base="):
            read_head_config(tmp_path / "q", "--reward-model")
