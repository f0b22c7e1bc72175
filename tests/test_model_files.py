"""Bad model, adapter, head and reward-model folders, Hub ids and devices: each is one InputError line naming the flag
and the file, raised before anything heavy happens (never a safetensors / JSON traceback, a 50 s retry loop, or a run
that silently scores with the wrong model). Every fixture is a small local folder built in tmp_path."""
import json
import os
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file, save_file

from conftest import make_tiny_llama
from minirlhf import lora, models
from minirlhf.devices import get_device
from minirlhf.errors import InputError
from minirlhf.folders import check_adapter_dir, check_model_dir, check_reward_model_dir
from minirlhf.formats import load_adapter, load_head, save_adapter, save_head
from minirlhf.heads import ScalarHead
from minirlhf.models import load_model, load_reward_model, load_tokenizer

ASSET = os.path.join(os.path.dirname(models.__file__), "assets", "tiny-llama")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def truncate(file):
    data = open(file, "rb").read()
    open(file, "wb").write(data[:len(data) // 2])


def model_folder(tmp_path, tiny_llama_dir, name="model", tokenizer=True):
    """A copy of the tiny Llama (config.json + model.safetensors), with the repo's tokenizer beside it."""
    path = tmp_path / name
    shutil.copytree(tiny_llama_dir, path)
    for f in TOKENIZER_FILES if tokenizer else ():
        shutil.copy(os.path.join(ASSET, f), path / f)
    return path


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache and a Hub endpoint on a closed local port: a machine without network, whatever
    network the machine running the tests has. Returns a function that points the endpoint elsewhere."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connection refused
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    return lambda endpoint: monkeypatch.setattr(constants, "ENDPOINT", endpoint)


def serve(handler_status, body=b"{}", headers=()):
    """A local HTTP server answering every request with one status, body and headers; returns (server, url)."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(handler_status)
            for k, v in (("Content-Type", "application/json"), *headers):
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"


# ---------------------------------------------------------------- --model: local folders
def test_model_folder_problems_name_model_and_the_file(tmp_path, tiny_llama_dir):
    good = model_folder(tmp_path, tiny_llama_dir, "good")
    assert check_model_dir(good)["model_type"] == "llama"
    cases = {  # name -> (how to break a copy, words the message must hold)
        "not-json": (lambda p: (p / "config.json").write_text("{not json"), ["config.json", "is not valid JSON"]),
        "a-list": (lambda p: (p / "config.json").write_text("[1, 2]"), ["config.json", "JSON list, not an object"]),
        "no-type": (lambda p: (p / "config.json").write_text(json.dumps(
            {k: v for k, v in json.loads((p / "config.json").read_text()).items() if k != "model_type"})),
            ["config.json", 'has no "model_type"']),
        "unknown-type": (lambda p: (p / "config.json").write_text(json.dumps(
            {**json.loads((p / "config.json").read_text()), "model_type": "llama9"})),
            ["config.json", "model_type 'llama9'", "does not know"]),
    }
    for name, (breaks, words) in cases.items():
        path = model_folder(tmp_path, tiny_llama_dir, name)
        breaks(path)
        for load in (load_tokenizer, load_model):  # the tokenizer is loaded first: its message must name --model too
            with pytest.raises(InputError) as error:
                load(str(path))
            message = str(error.value)
            assert message.startswith(f"--model {str(path)!r}: ") and "\n" not in message, message
            assert all(w in message for w in words), (name, message)


@pytest.mark.parametrize("case, words", [
    ("missing", ["holds no model weights", "model.safetensors"]),
    ("empty", ["model.safetensors is empty (0 bytes)"]),
    ("truncated", ["model.safetensors is truncated or corrupt", "incomplete metadata"]),
    ("garbage", ["model.safetensors is truncated or corrupt"]),
    ("no-tensors", ["model.safetensors holds no tensors"]),
    ("shard-missing", ["model-00002-of-00002.safetensors is missing"]),
])
def test_broken_weights_are_refused_before_loading(tmp_path, tiny_llama_dir, case, words):
    path = model_folder(tmp_path, tiny_llama_dir, tokenizer=False)
    weights = path / "model.safetensors"
    if case == "missing":
        weights.unlink()
    elif case == "empty":
        weights.write_bytes(b"")
    elif case == "truncated":
        truncate(weights)
    elif case == "garbage":
        weights.write_bytes(os.urandom(1000))
    elif case == "no-tensors":
        save_file({}, weights)
    else:  # a sharded model whose second shard never arrived
        state = load_file(weights)
        weights.unlink()
        keys = sorted(state)
        save_file({k: state[k] for k in keys[:5]}, path / "model-00001-of-00002.safetensors")
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
            k: f"model-0000{1 + (i >= 5)}-of-00002.safetensors" for i, k in enumerate(keys)}}))
    for check in (check_model_dir, load_model):
        with pytest.raises(InputError) as error:
            check(str(path))
        message = str(error.value)
        assert message.startswith(f"--model {str(path)!r}: ") and all(w in message for w in words), message


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, tiny_llama_dir):
    """A valid safetensors file from another model: transformers would fill the missing tensors with random values
    (only a warning) or fail with a RuntimeError pointing at its log."""
    path = model_folder(tmp_path, tiny_llama_dir, tokenizer=False)
    state = load_file(path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, path / "model.safetensors", {"format": "pt"})
    with pytest.raises(InputError, match=r"^--model .*lack 1 tensor\(s\) .*'model.layers.1.mlp.up_proj.weight'.*"
                                         r"random values"):
        load_model(str(path))
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(5, 5)
    save_file(state, path / "model.safetensors", {"format": "pt"})
    with pytest.raises(InputError, match=r"^--model .*the weights do not fit config.json"):
        load_model(str(path))


def test_model_paths_that_are_not_folders(tmp_path, tiny_llama_dir):
    for load in (load_tokenizer, load_model):
        with pytest.raises(InputError, match=r"^--model '/nonexistent' is neither an existing local directory nor a "
                                             r"valid Hub id"):
            load("/nonexistent")
        with pytest.raises(InputError, match=r"^--model '.*model.safetensors': is a file, not a folder"):
            load(os.path.join(tiny_llama_dir, "model.safetensors"))
    with pytest.raises(InputError, match=r"^--model '.*': no tokenizer in the folder \(none of tokenizer.json"):
        load_tokenizer(tiny_llama_dir)  # a model saved without its tokenizer
    with pytest.raises(InputError, match=r"^--tokenizer '/nowhere' is neither"):
        load_tokenizer("/nowhere", flag="--tokenizer")
    with pytest.raises(InputError, match=r"^--model '.*': the folder has no config.json, so it is not a Hugging Face "
                                         r"model folder \(it holds a LoRA adapter: pass its base model as --model"):
        load_model(reward_folder(tmp_path))
    with pytest.raises(InputError, match=r"^--quantization must be one of \('none', '8bit', '4bit'\), got '3bit'$"):
        load_model(tiny_llama_dir, quantization="3bit")
    tok = load_tokenizer(str(model_folder(tmp_path, tiny_llama_dir)))  # the good folder still loads
    assert tok.pad_token_id is not None


# ---------------------------------------------------------------- --model: Hub ids
def test_unknown_hub_id_fails_fast_here(tmp_path, monkeypatch):
    """The real endpoint and this machine's network, whatever it is: no 50 s of retries. Offline it is "could not
    be downloaded (offline?)"; with a network, the Hub says there is no such model."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for load in (load_tokenizer, load_model):
        start = time.perf_counter()
        with pytest.raises(InputError) as error:
            load("nobody/no-such-model")
        seconds = time.perf_counter() - start
        message = str(error.value)
        assert seconds < 15, f"{load.__name__} took {seconds:.1f}s"
        assert message.startswith("--model 'nobody/no-such-model' is neither a local folder nor in the local Hugging "
                                  "Face cache") and "\n" not in message, message
        assert any(w in message for w in ("could not be downloaded: asking", "offline mode is on (HF_HUB_OFFLINE=1)",
                                          "Hub has no model")), message


def test_hub_id_with_no_network_a_silent_one_or_offline_mode(hub, monkeypatch):
    for load in (load_tokenizer, load_model):  # no network: connection refused
        start = time.perf_counter()
        with pytest.raises(InputError, match=r"^--model 'nobody/no-such-model' is neither a local folder nor in the "
                                             r"local Hugging Face cache \(.*hf-cache\), and could not be downloaded: "
                                             r"asking http://127.0.0.1:\d+ failed \(.*; offline\?\)"):
            load("nobody/no-such-model")
        assert time.perf_counter() - start < 5
    silent = socket.socket()  # a network that drops packets: the one question times out, no retries
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    hub(f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setattr("minirlhf.hub.HUB_TIMEOUT_S", 0.5)
    start = time.perf_counter()
    with pytest.raises(InputError, match=r"could not be downloaded: .*timed out.*offline\?"):
        load_model("nobody/no-such-model")
    assert time.perf_counter() - start < 3
    silent.close()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match=r"neither a local folder nor in the local Hugging Face cache .*offline mode "
                                         r"is on \(HF_HUB_OFFLINE=1\)"):
        load_tokenizer("nobody/no-such-model")


def test_hub_id_the_hub_does_not_know_and_one_it_knows(hub, monkeypatch, chat_tokenizer):
    server, url = serve(404, b'{"error": "Repository not found"}', [("X-Error-Code", "RepoNotFound")])
    hub(url)
    with pytest.raises(InputError, match=r"^--model 'nobody/no-such-model' is neither a local folder nor in the local "
                                         r"Hugging Face cache .*, and the Hugging Face Hub has no model "
                                         r"'nobody/no-such-model' \(or it is private"):
        load_model("nobody/no-such-model")
    server.shutdown()
    # With the network there and the model on the Hub, transformers goes on to download it (here: a stand-in).
    server, url = serve(200, json.dumps({"id": "org/real", "sha": "a" * 40, "private": False}).encode())
    hub(url)
    calls = []
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained",
                        lambda name, **kwargs: calls.append((name, kwargs)) or chat_tokenizer)
    assert load_tokenizer("org/real") is chat_tokenizer
    assert calls == [("org/real", {"trust_remote_code": False})]  # no local_files_only: a real download
    server.shutdown()


def test_cached_hub_id_loads_without_network(hub, tmp_path, tiny_llama_dir):
    repo = tmp_path / "hf-cache" / "models--org--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(model_folder(tmp_path, tiny_llama_dir), snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    start = time.perf_counter()
    tok = load_tokenizer("org/tiny")
    model = load_model("org/tiny", tokenizer=tok)
    assert time.perf_counter() - start < 10 and model.name_or_path == "org/tiny"
    (snapshot / "model.safetensors").unlink()  # the tokenizer is cached, the weights are not: that needs the Hub
    with pytest.raises(InputError, match=r"^--model 'org/tiny' is neither a local folder nor in the local Hugging "
                                         r"Face cache .*could not be downloaded"):
        load_model("org/tiny")


# ---------------------------------------------------------------- --device
def test_device_errors():
    with pytest.raises(InputError, match=r"^--device foo: must be auto, cpu, cuda or cuda:N$"):
        get_device("foo")
    with pytest.raises(InputError, match=r"^--device mps: must be auto, cpu, cuda or cuda:N$"):
        get_device("mps")
    assert get_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        with pytest.raises(InputError, match=rf"^--device cuda:{n}: this machine has {n} CUDA device"):
            get_device(f"cuda:{n}")
    else:
        for device in ("cuda", "cuda:0"):
            with pytest.raises(InputError, match=rf"^--device {device}: no CUDA device is available here "
                                                 r"\(torch.cuda.is_available\(\) is False\); use --device cpu or "
                                                 r"auto$"):
                get_device(device)
        with pytest.raises(InputError, match=r"^--device cuda:"):
            load_model(ASSET, device="cuda")


# ---------------------------------------------------------------- --reward-model
def reward_folder(tmp_path, name="reward_model", full=False):
    """A reward_model/ folder as train_reward.py writes it: LoRA adapter + scalar head, or full model + head."""
    path, model = tmp_path / name, make_tiny_llama()
    if full:
        model.save_pretrained(path)
    else:
        lora.add_lora(model, "all-linear", r=2, alpha=4, adapter="reward")
        with torch.no_grad():
            for p in lora.lora_parameters(model, "reward"):
                p.normal_()
        save_adapter(model, path, adapter="reward")
    save_head(ScalarHead(32), path)
    return path


@pytest.mark.parametrize("case, words", [
    ("nowhere", ["no such folder", "train_reward.py"]),
    ("no-head-config", ["no head_config.json in it"]),
    ("no-head-weights", ["head.safetensors is missing"]),
    ("no-adapter", ["no adapter_config.json in it", "neither the LoRA adapter", "nor the fully fine-tuned model"]),
    ("no-adapter-config", ["no adapter_config.json beside adapter_model.safetensors"]),
    ("no-adapter-weights", ["adapter_model.safetensors is missing"]),
    ("truncated-adapter", ["adapter_model.safetensors is truncated or corrupt"]),
    ("empty-head", ["head.safetensors is empty (0 bytes)"]),
    ("truncated-head", ["head.safetensors is truncated or corrupt"]),
    ("bad-head-config", ["head_config.json is not valid JSON"]),
    ("head-config-fields", ["head_config.json needs hidden_size (an int > 0)"]),
    ("bad-adapter-config", ["adapter_config.json is not valid JSON"]),
    ("full-no-weights", ["holds no model weights"]),
])
def test_reward_model_folder_problems_name_the_file(tmp_path, case, words):
    path = reward_folder(tmp_path, full=case.startswith("full"))
    file = {"head-config": "head_config.json", "head-weights": "head.safetensors", "adapter": "adapter_config.json",
            "adapter-config": "adapter_config.json", "adapter-weights": "adapter_model.safetensors"}
    if case == "nowhere":
        path = tmp_path / "nowhere"
    elif case.startswith("no-"):
        (path / file[case[3:]]).unlink()
        if case == "no-adapter":
            (path / "adapter_model.safetensors").unlink()
    elif case == "truncated-adapter":
        truncate(path / "adapter_model.safetensors")
    elif case == "empty-head":
        (path / "head.safetensors").write_bytes(b"")
    elif case == "truncated-head":
        truncate(path / "head.safetensors")
    elif case == "bad-head-config":
        (path / "head_config.json").write_text("kind: scalar")
    elif case == "head-config-fields":
        (path / "head_config.json").write_text(json.dumps({"kind": "scalar", "hidden_size": "32"}))
    elif case == "bad-adapter-config":
        (path / "adapter_config.json").write_text("{")
    else:
        (path / "model.safetensors").unlink()
    with pytest.raises(InputError) as error:
        check_reward_model_dir(str(path))
    message = str(error.value)
    assert message.startswith(f"--reward-model {str(path)!r}: ") and "\n" not in message, message
    assert all(w in message for w in words), message
    if case != "nowhere":  # loading it fails the same way (it never scores with the head on the bare base)
        with pytest.raises(InputError, match="^--reward-model "):
            load_reward_model(make_tiny_llama(), str(path))


def test_good_reward_model_folders(tmp_path, tiny_llama):
    assert check_reward_model_dir(reward_folder(tmp_path, "lora")) == "adapter"
    assert load_reward_model(tiny_llama, str(tmp_path / "lora"))[0] == "reward"
    assert check_reward_model_dir(reward_folder(tmp_path, "full", full=True)) == "full"
    with pytest.raises(InputError, match=r"did you mean '.*reward_model'\?"):  # the run folder, not reward_model/
        check_reward_model_dir(os.path.dirname(reward_folder(tmp_path / "run")), "--reward-model")
    # A fully fine-tuned reward model's head reads its own model: on another base it would score the wrong model.
    with pytest.raises(InputError, match=r"is a fully fine-tuned reward model, but the base loaded is .*expected "
                                         r"--model"):
        load_reward_model(tiny_llama, str(tmp_path / "full"))
    base = load_model(str(tmp_path / "full"))
    assert load_reward_model(base, str(tmp_path / "full"))[0] is None


def test_load_adapter_and_load_head_name_broken_files(tmp_path, tiny_llama):
    """Called directly (no check_reward_model_dir first): InputError naming the file, not a safetensors traceback."""
    path = reward_folder(tmp_path)
    truncate(path / "adapter_model.safetensors")
    with pytest.raises(InputError, match=r"^adapter folder '.*': .*adapter_model.safetensors is truncated or corrupt"):
        load_adapter(tiny_llama, path)
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(InputError, match=r"^--sft-adapter '.*': .*adapter_model.safetensors is missing"):
        load_adapter(tiny_llama, path, flag="--sft-adapter")
    truncate(path / "head.safetensors")
    with pytest.raises(InputError, match=r"^head folder '.*': .*head.safetensors is truncated or corrupt"):
        load_head(path)
    save_head(ScalarHead(32), path)
    state = load_file(path / "head.safetensors")
    save_file({k: v * float("nan") for k, v in state.items()}, path / "head.safetensors")
    with pytest.raises(InputError, match=r"head.safetensors holds NaN or inf values \(tensor 'linear\.(bias|weight)'"):
        load_head(path, flag="--reward-model")


# ---------------------------------------------------------------- --sft-adapter
def test_sft_adapter_folder_problems(tmp_path, tiny_llama_dir):
    run = tmp_path / "sft"
    model = make_tiny_llama()
    lora.add_lora(model, ["q_proj", "v_proj"], r=2, alpha=4, adapter="sft")
    save_adapter(model, run / "adapter", adapter="sft")
    assert check_adapter_dir(run / "adapter", "--sft-adapter")["r"] == 2
    for path, words in [(tmp_path / "nowhere", "no such folder; expected a LoRA adapter folder"),
                        (run, f"no adapter_config.json in it (did you mean {str(run / 'adapter')!r}?)"),
                        (tiny_llama_dir, "(it holds a full model, not an adapter: pass it as --model instead)"),
                        (run / "adapter" / "adapter_config.json", "is a file, not a folder")]:
        for check in (lambda p: check_adapter_dir(p, "--sft-adapter"),
                      lambda p: load_adapter(make_tiny_llama(), p, "policy", True, flag="--sft-adapter")):
            with pytest.raises(InputError) as error:
                check(path)
            assert str(error.value).startswith(f"--sft-adapter {str(path)!r}: ") and words in str(error.value)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "r": "2"}))
    with pytest.raises(InputError, match=r"adapter_config.json needs r \(an int > 0\).*got r='2'"):
        check_adapter_dir(run / "adapter", "--sft-adapter")
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match=r"adapter_model.safetensors is empty \(0 bytes\)"):
        check_adapter_dir(run / "adapter", "--sft-adapter")
