"""examples/*.sh, the real-model recipes: every `python train_*.py ...` command in them must be accepted by that
script's flags, so a renamed or removed flag fails here rather than on a user's GPU. Nothing is trained: each
recipe runs under bash with `python` replaced by a recorder (bench/common.recipe_commands), and the recorded
arguments go through minirlhf.cli.parse_args with the script's own Args."""
import glob
import importlib
import importlib.util
import os
import re

import pytest

from conftest import REPO, load_bench
from minirlhf.cli import parse_args

common = load_bench("common")

LAPTOP = os.path.join(REPO, "examples", "smollm2_cpu.sh")  # the CPU recipe, apart: bench/real_model.py runs it
RECIPES = {os.path.basename(path)[:-3]: path for path in sorted(glob.glob(os.path.join(REPO, "examples", "*.sh")))
           if path != LAPTOP}
OUT = "/recipes-out"  # the OUT the recipes are expanded with: every path under it is made by an earlier stage
OUTPUTS = ("reward_model", "model", "adapter", "policy", "value_head")  # folders the scripts write inside --out


def commands(name):
    return common.recipe_commands(RECIPES[name], {"OUT": OUT})


def test_the_five_setups_have_recipes():
    assert set(RECIPES) == {"smollm2_helpsteer2_reward", "smollm2_helpsteer2_reinforce", "qlora_dpo_r1",
                            "stackllama_8bit", "multi_adapter_ppo_llama8b"}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_command_is_accepted_by_its_script(name):
    found = commands(name)
    assert found, f"{name}.sh runs no python command"
    for argv in found:
        script = argv[0]
        assert re.fullmatch(r"train_\w+\.py", script) and os.path.isfile(os.path.join(REPO, script)), argv
        module = importlib.import_module(script[:-3])
        try:
            args = parse_args(module.Args, argv[1:])
        except SystemExit as e:  # argparse: an unknown flag or a bad value (its message is on stderr)
            pytest.fail(f"{name}.sh: {script} refuses {' '.join(argv[1:])} (exit {e.code})")
        assert args.out == OUT or args.out.startswith(OUT + "/"), f"{name}.sh: {script} writes outside $OUT"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_later_stages_read_what_earlier_stages_wrote(name):
    """A path under $OUT (a reward model, an SFT model) must be an output folder of an earlier command."""
    earlier = []
    for argv in commands(name):
        for i, word in enumerate(argv):
            if word.startswith(OUT) and argv[i - 1] != "--out":
                made = [out for out in earlier if word in (os.path.join(out, sub) for sub in OUTPUTS)]
                assert made, f"{name}.sh: {argv[0]} {argv[i - 1]} {word}: no earlier stage writes it"
        earlier.append(common.flag_value(argv, "--out"))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_are_strict_and_relocatable(name):
    text = open(RECIPES[name]).read()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text, "a failed stage must stop the recipe"
    assert re.search(r'^OUT=\$\{OUT:-runs/[\w/.-]+\}$', text, re.M), "OUT=${OUT:-runs/...} chooses the output folder"
    assert re.search(r'^MODEL=\$\{MODEL:-[\w./-]+\}$', text, re.M), "MODEL=${MODEL:-hub id} names the base"


def test_model_variable_reaches_every_base_model():
    """MODEL (or an earlier stage's model) is the base of every stage: the benchmark relies on it to run the recipes
    on a local model without downloading."""
    for name in RECIPES:
        for argv in common.recipe_commands(RECIPES[name], {"OUT": OUT, "MODEL": "/local-model"}):
            model = common.flag_value(argv, "--model")
            assert model == "/local-model" or model.startswith(OUT + "/"), f"{name}.sh: {argv[0]} --model {model}"


def test_the_setups_defining_flags():
    """What the README promises of each setup (a recipe edited away from its setup fails here)."""
    def flags(name, script):
        return [argv for argv in commands(name) if argv[0] == script]
    qlora, = flags("qlora_dpo_r1", "train_dpo.py")
    for flag, values in {"--quantization": ["4bit"], "--lora-r": ["1"], "--lora-targets": ["q_proj", "v_proj"],
                         "--dtype": ["float16"], "--lr": ["5e-4"], "--batch-size": ["8"], "--max-steps": ["8"],
                         "--beta": ["0.1"], "--max-length": ["1024"]}.items():
        assert common.flag_values(qlora, flag) == values, flag
    rewards = flags("smollm2_helpsteer2_reward", "train_reward.py")
    assert sorted(common.flag_value(a, "--loss") for a in rewards) == ["bt", "distributional", "margin"]
    for argv in rewards:
        assert common.flag_values(argv, "--full-finetune") == []
        assert [common.flag_value(argv, f) for f in ("--lr", "--batch-size", "--epochs", "--max-length")] == \
            ["5e-5", "8", "1", "1024"]
    stack = commands("stackllama_8bit")
    assert [a[0] for a in stack] == ["train_sft.py", "train_reward.py", "train_ppo.py"]
    assert [common.flag_value(a, "--template") for a in stack] == ["qa"] * 3
    assert [common.flag_value(a, "--quantization", "none") for a in stack] == ["none", "8bit", "8bit"]
    multi = commands("multi_adapter_ppo_llama8b")
    assert [a[0] for a in multi] == ["train_reward.py", "train_ppo.py"]
    assert all(common.flag_value(a, "--quantization") == "4bit" for a in multi)
    assert all(common.flag_value(a, "--template") == "llama3" for a in multi)
    assert common.flag_value(multi[1], "--system-prompt") and common.flag_value(multi[1], "--cost-per-hour")


def test_examples_readme_lists_every_recipe():
    text = open(os.path.join(REPO, "examples", "README.md")).read()
    for name in RECIPES:
        assert f"{name}.sh" in text, name


# ---------------------------------------------------------------- the recorder and the flags it reads
def test_recorder_keeps_quoting_and_expansion(tmp_path):
    script = tmp_path / "recipe.sh"
    script.write_text('#!/usr/bin/env bash\nset -euo pipefail\nOUT=${OUT:-runs/x}\nSYSTEM="Be brief. Be kind."\n'
                      'echo this line prints nothing to the record\n'
                      'python train_ppo.py --system-prompt "$SYSTEM" \\\n    --out "$OUT/ppo"  # a comment\n'
                      "python -m minirlhf.compare --policies 'a b' c\n")
    assert common.recipe_commands(str(script)) == [
        ["train_ppo.py", "--system-prompt", "Be brief. Be kind.", "--out", "runs/x/ppo"],
        ["-m", "minirlhf.compare", "--policies", "a b", "c"]]
    assert common.recipe_commands(str(script), {"OUT": "/tmp/o"})[0][-1] == "/tmp/o/ppo"


def test_recorder_reports_a_failing_script(tmp_path):
    script = tmp_path / "recipe.sh"
    script.write_text("set -euo pipefail\necho $UNSET_VARIABLE\n")
    with pytest.raises(RuntimeError, match="UNSET_VARIABLE"):
        common.recipe_commands(str(script))


def test_set_flag_replaces_every_value():
    argv = ["train_dpo.py", "--lora-targets", "q_proj", "v_proj", "--packing", "--lr", "-1", "--lora-targets", "x"]
    assert common.set_flag(argv, "--lora-targets", "o_proj") == \
        ["train_dpo.py", "--packing", "--lr", "-1", "--lora-targets", "o_proj"]
    assert common.flag_values(argv, "--packing") == [] and common.flag_values(argv, "--nope") is None
    assert common.flag_value(argv, "--lr") == "-1"


# ---------------------------------------------------------------- the laptop recipe (bench/real_model.py runs it)


def laptop_commands():
    return common.recipe_commands(LAPTOP, {"OUT": OUT, "THREADS": "1"})


def test_laptop_recipe_commands_are_accepted_and_chained():
    from minirlhf import best_of_n
    found = laptop_commands()
    assert [argv[0] for argv in found].count("train_reward.py") == 2 and ["-m", "minirlhf.best_of_n"] in \
        [argv[:2] for argv in found]
    earlier = []
    for argv in found:
        if argv[0] == "-m":
            assert argv[1] == "minirlhf.best_of_n", argv
            args = parse_args(best_of_n.Args, argv[2:])
        else:
            args = parse_args(importlib.import_module(argv[0][:-3]).Args, argv[1:])
            assert args.out.startswith(OUT + "/"), argv
        assert (args.model, args.threads) == ("smollm2", 1), argv  # the real model, the threads the bench asks for
        for flag in ("--reward-model",):
            path = common.flag_value(argv, flag)
            if path and path.startswith(OUT):
                assert any(path == os.path.join(out, "reward_model") for out in earlier), argv
        earlier.append(common.flag_value(argv, "--out"))
    text = open(LAPTOP).read()
    assert "\nset -euo pipefail\n" in text and re.search(r'^OUT=\$\{OUT:-runs/[\w/.-]+\}$', text, re.M)


def test_vs_trl_times_the_laptop_recipes_grpo_stage():
    """dev/vs_trl.py --model smollm2 times the laptop recipe's GRPO stage, shortened (fewer iterations and new tokens):
    every other setting it writes out, and its update layout, must be the recipe's, or a change to one side alone
    would time another job."""
    import train_grpo
    spec = importlib.util.spec_from_file_location("dev_vs_trl", os.path.join(REPO, "dev", "vs_trl.py"))
    vs_trl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vs_trl)
    stage = [argv for argv in laptop_commands() if argv[0] == "train_grpo.py"]
    assert len(stage) == 1
    recipe = vars(parse_args(train_grpo.Args, stage[0][1:]))
    job = vars(parse_args(train_grpo.Args, ["--model", "smollm2", *vs_trl.SMOLLM2_UPDATE]))
    job.update(vs_trl.SMOLLM2_GRPO)
    shortened = {"iterations", "max_new_tokens"}
    assert shortened < set(vs_trl.SMOLLM2_GRPO) and all(job[k] < recipe[k] for k in shortened)
    same = set(vs_trl.SMOLLM2_GRPO) - shortened | {"group_minibatches", "micro_batch_size"}
    assert {k: job[k] for k in same} == {k: recipe[k] for k in same}
    assert job["micro_batch_size"] == 4 and job["group_minibatches"]  # the layout the flags name, not defaults


def test_real_model_bench_adds_the_fp32_memory_yardstick():
    import train_ppo
    real_model = load_bench("real_model")
    found = dict(real_model.stages("/o", 1))
    assert "grpo_gold" in found and "best_of_n" in found
    fp32, ppo = (vars(parse_args(train_ppo.Args, found[k][1:])) for k in (real_model.FP32_YARDSTICK, "ppo_4bit"))
    assert (fp32["quantization"], fp32["iterations"], ppo["quantization"]) == ("none", 3, "4bit")
    differ = {k for k in ppo if ppo[k] != fp32[k]}
    assert differ == {"quantization", "iterations", "out"}, differ  # nothing else differs
