"""distill.py and heads.response_divergence: each divergence against torch.distributions' KL (float64), the
generalized JSD against its formula on explicit mixture probabilities, its β -> 0 / 1 limits (forward / reverse KL),
gradients to the student only (reverse KL's against its closed form), tokens a filter dropped; the model-side pass
against a plain transformers forward of both adapters, chunked == one piece (values and gradients). train_distill.py:
a teacher equal to the student gives loss 0, another teacher a loss that falls, and the output contract."""
import json
import os

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from conftest import make_tiny_llama
from minirlhf import heads, lora
from minirlhf.distill import DIVERGENCES, token_divergence
from minirlhf.sampling import SamplingSettings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _logits(seed, B=3, T=5, V=11):
    g = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    teacher = student + 1.5 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    mask = torch.arange(T)[None] < torch.tensor([[T], [2], [4]])  # (B, T): rows of 5, 2 and 4 positions
    return student, teacher, mask


def _kl(p_logits, q_logits):
    return kl_divergence(Categorical(logits=p_logits), Categorical(logits=q_logits))


def _jsd(student, teacher, beta):
    """β KL(t ‖ m) + (1 - β) KL(s ‖ m) with the mixture's probabilities written out."""
    s, t = student.softmax(-1), teacher.softmax(-1)
    m = Categorical(probs=beta * t + (1 - beta) * s)
    return beta * kl_divergence(Categorical(probs=t), m) + (1 - beta) * kl_divergence(Categorical(probs=s), m)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind,beta", [("reverse-kl", None), ("forward-kl", None), ("jsd", 0.1), ("jsd", 0.5),
                                       ("jsd", 0.9)])
def test_each_divergence_matches_torch_distributions(seed, kind, beta):
    student, teacher, mask = _logits(seed)
    want = {"reverse-kl": lambda: _kl(student, teacher), "forward-kl": lambda: _kl(teacher, student),
            "jsd": lambda: _jsd(student, teacher, beta)}[kind]() * mask
    got = token_divergence(student, teacher, mask, kind, beta if beta is not None else 0.5)
    assert got.shape == mask.shape and got[mask].min() > 1e-3 and (got[~mask] == 0).all()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_jsd_limits_are_the_two_kls():
    """JSD_β / β -> KL(t ‖ s) as β -> 0 and JSD_β / (1 - β) -> KL(s ‖ t) as β -> 1 (GKD's convention: β weighs the
    teacher), and the symmetric JSD (β = 1/2) is symmetric."""
    student, teacher, mask = _logits(2)
    eps = 1e-6
    torch.testing.assert_close(token_divergence(student, teacher, mask, "jsd", eps) / eps,
                               _kl(teacher, student) * mask, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(token_divergence(student, teacher, mask, "jsd", 1 - eps) / eps,
                               _kl(student, teacher) * mask, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(token_divergence(student, teacher, mask, "jsd", 0.5),
                               token_divergence(teacher, student, mask, "jsd", 0.5), rtol=1e-12, atol=1e-14)
    assert token_divergence(student, teacher, mask, "jsd", 0.5).max() <= torch.log(torch.tensor(2.0))  # JSD <= log 2


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_zero_where_the_student_is_the_teacher(kind):
    student, _, mask = _logits(3)
    torch.testing.assert_close(token_divergence(student, student.clone(), mask, kind), torch.zeros(mask.shape,
                               dtype=torch.float64), rtol=0, atol=1e-14)


def test_a_student_equal_to_its_teacher_gets_a_gradient_of_exactly_zero():
    """Reverse KL at s = t: value and gradient exactly 0 in float32 (Adam would turn a rounding-sized gradient into a
    step of the size of the learning rate)."""
    student, _, mask = _logits(7)
    student = student.float().requires_grad_()
    loss = token_divergence(student, student.detach().clone(), mask, "reverse-kl")
    loss.sum().backward()
    assert (loss == 0).all() and (student.grad == 0).all()


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_gradient_reaches_the_student_only_and_matches_the_reference(kind):
    student, teacher, mask = _logits(4)
    weights = torch.linspace(0.5, 2.0, mask.numel(), dtype=torch.float64).view(mask.shape) * mask  # a weighted sum
    s1, t1 = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    (token_divergence(s1, t1, mask, kind) * weights).sum().backward()
    assert t1.grad is None  # the teacher is a fixed target
    s2, t2 = student.clone().requires_grad_(), teacher.clone()
    ref = {"reverse-kl": lambda: _kl(s2, t2), "forward-kl": lambda: _kl(t2, s2), "jsd": lambda: _jsd(s2, t2, 0.5)}
    (ref[kind]() * weights).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-10, atol=1e-12)
    assert s1.grad[mask].abs().sum() > 1e-2 and (s1.grad[~mask] == 0).all()
    if kind == "reverse-kl":  # closed form: d KL(s ‖ t) / d z_s = s (log s - log t - KL(s ‖ t))
        log_s, log_t = student.log_softmax(-1), teacher.log_softmax(-1)
        kl = (log_s.exp() * (log_s - log_t)).sum(-1, keepdim=True)
        torch.testing.assert_close(s1.grad, log_s.exp() * (log_s - log_t - kl) * weights[..., None], rtol=1e-10,
                                   atol=1e-12)


def test_a_token_the_student_cannot_sample_adds_nothing():
    """Top-k filtered student logits (-inf outside the 4 largest): the reverse KL and the JSD stay finite, with finite
    gradients, equal to torch.distributions' (which scores 0 log 0 as 0); the forward KL is infinite."""
    student, teacher, mask = _logits(5)
    kth = student.topk(4, dim=-1).values[..., -1:]
    filtered = student.masked_fill(student < kth, float("-inf")).requires_grad_()
    for kind, want in [("reverse-kl", _kl(filtered.detach(), teacher)), ("jsd", _jsd(filtered.detach(), teacher, 0.3))]:
        got = token_divergence(filtered, teacher, mask, kind, 0.3)
        torch.testing.assert_close(got, want * mask, rtol=1e-12, atol=1e-12)
        filtered.grad = None
        got.sum().backward()
        assert torch.isfinite(filtered.grad).all() and (filtered.grad[(filtered == float("-inf")).detach()] == 0).all()
    assert torch.isinf(token_divergence(filtered.detach(), teacher, mask, "forward-kl")[mask]).all()


def test_bad_kind_or_beta():
    student, teacher, mask = _logits(6)
    with pytest.raises(ValueError, match="kind"):
        token_divergence(student, teacher, mask, "kl")
    for beta in (0.0, 1.0):
        with pytest.raises(ValueError, match="beta"):
            token_divergence(student, teacher, mask, "jsd", beta)


# ---------------------------------------------------------------- heads.response_divergence on a model
def two_adapters():
    """A float64 tiny Llama with a student adapter "policy" (active) and a teacher adapter "teacher", both with
    random B; a batch of 3 rows of 12 tokens (no padding) whose responses are the last 7, 4 and 6 tokens."""
    model = make_tiny_llama(dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    for name in ("policy", "teacher"):
        lora.add_lora(model, "all-linear", r=4, alpha=8, adapter=name)
        for _, m in lora.lora_layers(model, name):
            m.lora_B[name].weight.data.copy_(0.1 * torch.randn(m.lora_B[name].weight.shape, generator=g))
    lora.set_active_adapter(model, "policy")  # the student
    ids = torch.randint(3, 101, (3, 12), generator=g)
    attention = torch.ones_like(ids)
    response = (torch.arange(12)[None] >= torch.tensor([[5], [8], [6]])).long()
    return model, ids, attention, response


def test_response_divergence_matches_a_plain_forward_of_both_adapters():
    """The divergence at response token t is between the two adapters' distributions predicting it: transformers'
    logits at position t - 1, / the temperature; the student's log-probs are of the tokens it sampled."""
    model, ids, attention, response = two_adapters()
    sampling = SamplingSettings(temperature=0.7)
    with torch.no_grad():
        student = model(input_ids=ids).logits / 0.7  # (B, T, V): position t - 1 predicts token t
        with lora.use_adapter(model, "teacher"):
            teacher = model(input_ids=ids).logits / 0.7
    mask = response[:, 1:].bool()  # (B, T - 1) on the grid of the predicting position
    for kind in DIVERGENCES:
        divergence, logprobs, entropy = heads.response_divergence(model, "teacher", ids, attention, response,
                                                                  sampling, kind, 0.5)
        want = {"reverse-kl": _kl(student, teacher), "forward-kl": _kl(teacher, student),
                "jsd": _jsd(student, teacher, 0.5)}[kind][:, :-1] * mask
        torch.testing.assert_close(divergence[:, 1:], want, rtol=1e-9, atol=1e-12)
        assert (divergence[:, 0] == 0).all() and divergence[mask.nonzero(as_tuple=True)[0],
                                                            mask.nonzero(as_tuple=True)[1] + 1].min() > 1e-4
    picked = student.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * mask
    torch.testing.assert_close(logprobs[:, 1:], picked, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(entropy[:, 1:], Categorical(logits=student[:, :-1]).entropy() * mask, rtol=1e-9,
                               atol=1e-12)


def test_response_divergence_in_chunks_equals_one_piece(monkeypatch):
    """LOGITS_CHUNK = 5 over 17 response positions (chunks of 5, 5, 5, 2, checkpointed): the same divergences and
    the same gradient of the student's adapter; the teacher's adapter gets none."""
    model, ids, attention, response = two_adapters()
    student_params, teacher_params = lora.lora_parameters(model, "policy"), lora.lora_parameters(model, "teacher")
    for p in student_params + teacher_params:
        p.requires_grad_(True)  # a gradient to the teacher would show up

    def run():
        model.zero_grad(set_to_none=True)
        out = heads.response_divergence(model, "teacher", ids, attention, response, SamplingSettings(0.8), "jsd", 0.3)
        (out[0] * torch.linspace(-1, 2, 12, dtype=torch.float64)).sum().backward()
        assert all(p.grad is None for p in teacher_params)
        return [x.detach() for x in out] + [p.grad.clone() for p in student_params]
    whole = run()
    monkeypatch.setattr(heads, "LOGITS_CHUNK", 5)
    chunked = run()
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    assert whole[0].sum() > 1e-3 and sum(g.abs().sum() for g in whole[3:]) > 1e-3


# ---------------------------------------------------------------- train_distill.py on the built-in world
FLAGS = ["--iterations", "4", "--warmup-iterations", "0", "--rollout-size", "16", "--minibatch-size", "8",
         "--eval-prompts", "4", "--eval-samples", "1", "--max-new-tokens", "8", "--eval-every", "0", "--threads", "1",
         "--reward", "gold"]


def teacher_folder(path, b_std):
    """A teacher adapter folder on the embedded tiny Llama: B = 0 (the student at the start: the base itself) or
    random B ~ N(0, b_std) (another policy)."""
    from minirlhf.assets import TINY_LLAMA
    from minirlhf.formats import save_adapter
    from minirlhf.models import load_model
    model = load_model(TINY_LLAMA, dtype="float32", device="cpu")
    lora.add_lora(model, "all-linear", r=8, alpha=16, adapter="policy")
    g = torch.Generator().manual_seed(0)
    for _, m in lora.lora_layers(model, "policy"):
        m.lora_B["policy"].weight.data.copy_(b_std * torch.randn(m.lora_B["policy"].weight.shape, generator=g))
    save_adapter(model, str(path), "policy")
    return str(path)


def test_the_teacher_is_required(monkeypatch):
    from minirlhf.cli import parse_args
    from minirlhf.errors import InputError
    monkeypatch.syspath_prepend(REPO)
    module = __import__("train_distill")
    with pytest.raises(InputError, match="--teacher DIR is required"):
        module.check_args(parse_args(module.Args, []))


def run_distill(tmp_path, monkeypatch, teacher, *extra):
    from minirlhf.cli import parse_args
    monkeypatch.syspath_prepend(REPO)
    module = __import__("train_distill")
    out = tmp_path / "out"
    summary = module.main(parse_args(module.Args, FLAGS + ["--teacher", teacher, "--out", str(out), *extra]))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return summary, [r["loss/distill"] for r in rows if "loss/distill" in r], out


def test_a_teacher_equal_to_the_student_gives_loss_zero(tmp_path, monkeypatch):
    summary, losses, out = run_distill(tmp_path, monkeypatch, teacher_folder(tmp_path / "teacher", 0.0))
    assert losses == [0.0] * 4  # reverse KL: its gradient is exactly 0 too, so the student never leaves the teacher
    assert summary["eval/kl"] == 0 and summary["eval/gold_after"] == summary["eval/gold_before"]
    for key in ("eval/gold_before", "eval/gold_after", "eval/headroom_closed", "eval/kl", "eval/reward_after",
                "params/frozen_unchanged", "train/iterations", "time/update_seconds"):
        assert key in summary, key
    assert summary["params/frozen_unchanged"] is True  # the teacher adapter too
    assert os.path.isfile(out / "policy" / "adapter_model.safetensors")
    assert os.path.isfile(out / "last_rollout.safetensors")


@pytest.mark.parametrize("divergence", ["reverse-kl", "jsd"])
def test_another_teacher_gives_a_loss_and_trains_the_student(tmp_path, monkeypatch, divergence):
    summary, losses, out = run_distill(tmp_path, monkeypatch, teacher_folder(tmp_path / "teacher", 0.3),
                                       "--divergence", divergence)
    assert min(losses) > 0.1, losses
    from safetensors.torch import load_file
    trained = load_file(str(out / "policy" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in trained.items() if k.endswith("lora_B.weight"))
    assert summary["params/frozen_unchanged"] is True  # the base, and the teacher adapter


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_steps_of_the_update_pull_the_student_to_the_teacher(monkeypatch, divergence):
    """minibatch_gradient + AdamW on one rollout of the embedded model, 20 steps: its divergence to the teacher
    falls below 0.6 of where it started."""
    from minirlhf.assets import TINY_LLAMA
    from minirlhf.cli import parse_args
    from minirlhf.evaluation import generate
    from minirlhf.models import load_model, load_tokenizer
    from minirlhf.precision import LossScaler
    from minirlhf.training import make_optimizer
    monkeypatch.syspath_prepend(REPO)
    module = __import__("train_distill")
    tokenizer = load_tokenizer(TINY_LLAMA)
    model = load_model(TINY_LLAMA, dtype="float32", device="cpu", tokenizer=tokenizer)
    torch.manual_seed(0)
    lora.add_lora(model, "all-linear", r=4, alpha=8, adapter="policy")  # the student, B = 0: the base
    lora.add_lora(model, "all-linear", r=4, alpha=8, adapter=module.TEACHER)
    for _, m in lora.lora_layers(model, module.TEACHER):
        m.lora_B[module.TEACHER].weight.data.normal_(std=0.3)
        m.lora_B[module.TEACHER].weight.requires_grad_(False)
        m.lora_A[module.TEACHER].weight.requires_grad_(False)
    model.eval()
    prompts = [tokenizer(text)["input_ids"] for text in ("Name a colour.", "What is 2 + 2?", "Say hello.")]
    batch = generate(model, tokenizer, prompts, max_new_tokens=6, temperature=1.0,
                     generator=torch.Generator().manual_seed(0))
    P = batch["input_ids"].shape[1] - batch["response_ids"].shape[1]
    batch = {**batch, "P": P, "mask": batch["response_mask"][:, P:].bool()}
    params = lora.lora_parameters(model, "policy")
    optimizer, scaler = make_optimizer(params, 1e-2), LossScaler(model)
    args = parse_args(module.Args, ["--divergence", divergence, "--forward-batch-size", "2"])
    losses = []
    for _ in range(20):
        optimizer.zero_grad(set_to_none=True)
        stats = module.minibatch_gradient(model, batch, 1.0, torch.arange(3), batch["logprobs"][:, P:], args, scaler)
        optimizer.step()
        losses.append(stats["loss/distill"].item())
    assert losses[0] > 0.1 and losses[-1] < 0.6 * losses[0], losses
