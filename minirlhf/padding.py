"""Choosing the pad token, and growing the embeddings for it only when there is no other way.

Why pad must differ from EOS: if pad == EOS, masking the padding also masks the real EOS that ends every response, so
the model never learns to stop, and a reward read "at the last real token" can land on padding. minirlhf never
derives a mask from token ids (attention and response masks are explicit everywhere), so the pad token only has to be
an id that is not EOS; its embedding is never seen by a real position. The rule (`ensure_pad_token`):
  1. the tokenizer already has a pad token distinct from EOS          -> "kept"
  2. else an existing token that is safe to pad with (unused_pad_candidate): its name says padding
     (<|finetune_right_pad_id|> of Llama 3.1), or reserved / unused (<|reserved_special_token_0|> of Llama 3)
                                                                        -> "reused": the vocabulary is unchanged
  3. else add PAD_TOKEN "<|pad|>" as a new special token               -> "added": the model must grow
     (resize_for_tokenizer), e.g. SmolLM2's 49152 tokens become 49153, and the embeddings 49216 rows.

Why the rows grow to a multiple of 64, not to len(tokenizer): the LM head is a (hidden x V) matrix multiply over
every position, often the largest single GEMM of a small model. GPU GEMM kernels compute the output in tiles (64 or
128 wide) and tensor cores need dimensions that are multiples of 8 (16-bit types) and run best at multiples of 64; an
odd V (49153) leaves a ragged last tile or falls back to a slower kernel for the whole product. nanoGPT pads GPT-2's
50257 to 50304 for exactly this ("padded up to nearest multiple of 64 for efficiency", model.py; Karpathy reported a
~25% speedup of nanoGPT from this change alone, 2023), and NVIDIA's "Matrix Multiplication Background" user guide
gives the alignment rules.
"""
import ctypes
import mmap
import re
import sys

import torch

PAD_TOKEN = "<|pad|>"  # the token added when no existing one can serve
VOCAB_MULTIPLE = 64    # embedding rows are rounded up to a multiple of this when they must grow

# Names meant for padding, most preferred first; any other name containing "pad" comes after them.
PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>", "<|finetune_right_pad_id|>")
# Reserved / unused slots (Llama 3, Gemma, BERT-style): after the pad names, lowest N first.
RESERVED = re.compile(r"<\|reserved_special_token_(\d+)\|>|<unused(\d+)>|\[unused(\d+)\]")


def _preference(token):
    """Sort key of a token that may serve as pad (smaller is better), or None if its name does not say so."""
    if token in PAD_NAMES:
        return (0, PAD_NAMES.index(token))
    if "pad" in token.lower():
        return (1, 0)
    m = RESERVED.fullmatch(token)
    if m:
        return (2, int(next(g for g in m.groups() if g is not None)))
    return None


def _template_text(tokenizer):
    """All the text of the tokenizer's chat template(s): a string, a dict of named templates, or nothing."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return "\n".join(template.values()) if isinstance(template, dict) else template


def unused_pad_candidate(tokenizer):
    """An existing token that is safe to pad with, or None.

    Safe: an added / special token of the tokenizer (added_tokens_decoder, all_special_tokens) that is not its EOS, BOS
    or UNK, does not occur in its chat template, and whose name says it is meant for padding or is reserved / unused
    (see _preference for the order; ties go to the lower id). Any other special token (SmolLM2's <file_sep>,
    <jupyter_code>, ...) is a real token of the pretraining data and is never picked: for SmolLM2 the answer is None."""
    tokens = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    for t in tokenizer.all_special_tokens:
        tokens.setdefault(tokenizer.convert_tokens_to_ids(t), t)
    taken = {tokenizer.eos_token, tokenizer.bos_token, tokenizer.unk_token} - {None}
    taken_ids = {tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id} - {None}
    template = _template_text(tokenizer)
    ranked = [(_preference(t), i, t) for i, t in tokens.items()
              if t not in taken and i not in taken_ids and t not in template and _preference(t) is not None]
    return min(ranked)[2] if ranked else None


def ensure_pad_token(tokenizer):
    """Give `tokenizer` a pad token distinct from EOS; return what was done: "kept", "reused" or "added".

    kept: it had one (nothing changes). reused: tokenizer.pad_token = unused_pad_candidate(tokenizer), the vocabulary
    is unchanged. added: PAD_TOKEN is added as a special token, len(tokenizer) grows by one and the model must follow
    (resize_for_tokenizer). Prints nothing: the caller says what happened."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return "kept"
    candidate = unused_pad_candidate(tokenizer)
    if candidate is not None:
        tokenizer.pad_token = candidate
        return "reused"
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return "added"


def padded_vocab_size(n, multiple=VOCAB_MULTIPLE):
    """n rounded up to a multiple of `multiple`: 49153 -> 49216, 128257 -> 128320, 50257 -> 50304."""
    return -(-n // multiple) * multiple


def resize_for_tokenizer(model, tokenizer):
    """Grow the model's token embeddings (and untied LM head) to cover len(tokenizer), rounded up to a multiple of
    VOCAB_MULTIPLE; return the new number of rows, or None if the vocabulary already fits (never shrinks, never touches
    a model whose embeddings already cover every id, even if their row count is odd).

    transformers' resize_token_embeddings(pad_to_multiple_of=...) does the work: it copies the old rows unchanged,
    sets config.vocab_size to the new row count and re-ties tied embeddings. The extra rows (the added pad token and
    the round-up slack) are ids the tokenizer never produces from text. transformers (5.x) initialises them by "mean
    resizing" (Hewitt 2021, "Initializing new word embeddings for pretrained language models"): each new row is drawn
    from N(mean of the old rows, 1e-9 * their covariance), i.e. it is the mean row, in the embeddings and the LM head
    alike. So a new token's logit is the mean of the old logits, and by Jensen exp(mean) <= mean(exp) the k new rows
    take at most k / (V + k) of the probability (old log-probs drop by at most log(1 + k/V): 0.0013 nats for SmolLM2's
    64 extra rows over 49152). The new rows are part of the softmax everywhere, for sampling and for log-probs alike,
    so the policy samples from exactly the distribution whose log-probs PPO / DPO / the KL use: consistent, and the
    sampler may (rarely) draw one of them, which then is simply a token of the response.
    The draw uses torch's global RNG: we run it in a forked RNG so that growing the vocabulary does not shift the
    random numbers of everything after it (LoRA init, sampling) for a given seed.
    Serving: a LoRA adapter of linear layers loads onto the unmodified base; only weights that include the embeddings
    or the LM head (full fine-tuning, a merged model, --lora-targets lm_head) have the new row count and must be
    served with this tokenizer (see docs/real_models.md, "The pad token").
    The old embedding (and untied LM head) tensors are dropped and their pages given back (release_file_pages): a
    reference to them kept from before the call reads undefined values."""
    n = len(tokenizer)
    if n <= model.get_input_embeddings().weight.shape[0]:
        return None
    old = [w.detach() for w in (model.get_input_embeddings().weight,  # its data, even if the parameter is reused
                                getattr(model.get_output_embeddings(), "weight", None)) if w is not None]
    device = old[0].device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model.resize_token_embeddings(n, pad_to_multiple_of=VOCAB_MULTIPLE, mean_resizing=True)
    in_use = {p.data_ptr() for p in model.parameters()}
    for weight in {w.data_ptr(): w for w in old if w.data_ptr() not in in_use}.values():  # tied: one
        release_file_pages(weight)
    return model.get_input_embeddings().weight.shape[0]


def release_file_pages(tensor):
    """Give back the memory pages of a CPU tensor nothing will read again (its values become undefined).

    transformers reads a safetensors checkpoint through a memory map: a weight's values are the file's pages, mapped
    into the process, and a page counts in its resident memory once read. Growing the embeddings copies the old rows
    into a new tensor; the old tensor is dropped, but its pages stay mapped as long as the other weights keep the map
    open: SmolLM2's 113 MB embedding would be resident twice for the whole run. madvise(MADV_DONTNEED) unmaps the
    pages that lie wholly inside the tensor (a page it shares with a neighbouring tensor is kept); a file-backed page
    would be read again from the file if touched, an anonymous one would read as zeros: either way nothing reads it.
    Linux only; elsewhere (and on a GPU, or for a tensor smaller than a page) it does nothing."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or not sys.platform.startswith("linux"):
        return
    page = mmap.PAGESIZE
    start = tensor.data_ptr()  # its own bytes only: the storage may be the whole file's map, shared with others
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // page) * page, end // page * page  # the whole pages inside [start, end)
    if last > first:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED
