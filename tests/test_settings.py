"""The settings shared by several scripts are declared once (minirlhf/settings.py): one default and one help text per
flag wherever it appears, each script's own Args holds only its algorithm's knobs, a renamed flag is refused with a
pointer to its new name, and --help lists the script's own settings first."""
import contextlib
import dataclasses
import inspect
import io
import os
import sys

import pytest

from minirlhf import settings
from minirlhf.cli import field_docs, parse_args
from minirlhf.errors import InputError
from minirlhf.validation import check_ranges

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["train_sft", "train_reward", "train_dpo", "train_ppo", "train_grpo", "train_reinforce", "train_online_dpo",
           "train_distill"]
# a shared flag a script gives another meaning, with its own help: SFT's prompt cut applies without packing only
OWN_MEANING = {("train_sft", "max_prompt_length")}
# knobs of different algorithms that happen to share a name (DPO's beta is not GRPO's): each script's own help
SAME_NAME_OTHER_KNOB = {"loss", "beta", "reward_model", "batch_size", "max_steps"}


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, REPO)
    try:
        return {name: __import__(name) for name in SCRIPTS}
    finally:
        sys.path.remove(REPO)


def inherited(cls):
    """The fields a script's Args gets from the settings groups it is made of."""
    return {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}


def own_fields(cls):
    """The fields a script's Args declares itself and inherits from no group: its algorithm's knobs."""
    return [name for name in cls.__dict__.get("__annotations__", {}) if name not in inherited(cls)]


def test_every_flag_has_one_help_text_across_scripts(scripts):
    helps = {}
    for name, module in scripts.items():
        for field, text in field_docs(module.Args).items():
            if (name, field) not in OWN_MEANING and field not in SAME_NAME_OTHER_KNOB:
                helps.setdefault(field, {}).setdefault(" ".join(text.split()), []).append(name)
    drift = {field: texts for field, texts in helps.items() if len(texts) > 1}
    assert not drift, drift


def test_a_script_redeclares_a_shared_flag_only_to_change_its_default(scripts):
    """A field a script's Args inherits and declares again carries no help text of its own (its group's is the one
    --help shows), and changes the default."""
    for name, module in scripts.items():
        lines = inspect.getsource(module.Args).splitlines()
        redeclared = set(module.Args.__dict__["__annotations__"]) & inherited(module.Args)
        for field in redeclared - {f for s, f in OWN_MEANING if s == name}:
            line = next(i for i, text in enumerate(lines) if text.strip().startswith(field + ":"))
            following = lines[line + 1] if line + 1 < len(lines) else ""
            assert not following.strip().startswith('"""'), (name, field, following)
            base = next(b for b in module.Args.__mro__[1:] if field in getattr(b, "__dataclass_fields__", {}))
            assert getattr(parse_args(module.Args, []), field) != base.__dataclass_fields__[field].default, field


def test_each_script_shows_only_its_algorithms_knobs(scripts):
    counts = {name: len(own_fields(module.Args)) for name, module in scripts.items()}
    assert counts["train_grpo"] <= 14 and counts["train_ppo"] <= 12 and counts["train_reinforce"] <= 3, counts
    total = {name: len(dataclasses.fields(module.Args)) for name, module in scripts.items()}
    assert all(total[n] > 2 * counts[n] for n in SCRIPTS), (counts, total)  # most flags come from the groups


def test_the_rl_scripts_share_their_defaults(scripts):
    """Every shared flag has one default in the RL scripts (only --out differs)."""
    rl = [parse_args(scripts[n].Args, []) for n in ("train_ppo", "train_grpo", "train_reinforce", "train_online_dpo",
                                                    "train_distill")]
    for f in dataclasses.fields(settings.RLArgs):
        values = {repr(getattr(a, f.name)) for a in rl}
        assert len(values) == 1 or f.name == "out", (f.name, values)


@pytest.mark.parametrize("argv,new", [(["--entropy-coef", "0.2"], "--reward-entropy-coef"),
                                      (["--entropy-coef=0.2"], "--reward-entropy-coef")])
def test_a_renamed_flag_is_refused_with_its_new_name(scripts, argv, new):
    with pytest.raises(InputError, match=new):
        parse_args(scripts["train_grpo"].Args, argv)
    assert parse_args(scripts["train_grpo"].Args, ["--reward-entropy-coef", "0.2"]).reward_entropy_coef == 0.2


def test_help_lists_the_scripts_own_settings_first_then_the_groups(scripts):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse_args(scripts["train_grpo"].Args, ["--help"])
    text = out.getvalue()
    text = text[text.index("options:"):]  # the flags' entries, after the usage line
    own, rollout, model = (text.index(t) for t in ("settings of this script:", "the rollout loop and the reward it",
                                                   "the base model and the adapter trained on it:"))
    assert own < text.index("--group-size") < rollout < text.index("--reward-entropy-coef")
    assert text.index("--lora-r") > model and text.count("--lora-r ") == 1  # one entry, in its group


def test_the_ranges_declared_with_a_group_are_checked(scripts):
    with pytest.raises(InputError, match="--rollout-size"):
        check_ranges(parse_args(scripts["train_grpo"].Args, ["--rollout-size", "0"]), {})
    with pytest.raises(InputError, match="--kl-horizon"):
        check_ranges(parse_args(scripts["train_ppo"].Args, ["--kl-horizon", "0"]), {})
