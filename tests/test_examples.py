"""examples/*.sh, the real-model recipes: every `python train_*.py ...` command in them must be accepted by that
script's flags, so a renamed or removed flag fails here rather than on a user's GPU. Nothing is trained: each
recipe runs under bash with `python` replaced by a recorder (bench/real_shapes.recipe_commands), and the recorded
arguments go through minirlhf.cli.parse_args with the script's own Args."""
import importlib
import os
import re

import pytest

from conftest import REPO, load_bench
from minirlhf.cli import parse_args

real_shapes = load_bench("real_shapes")

RECIPES = real_shapes.recipes()
OUT = "/recipes-out"  # the OUT the recipes are expanded with: every path under it is made by an earlier stage
OUTPUTS = ("reward_model", "model", "adapter", "policy", "value_head")  # folders the scripts write inside --out


def commands(name):
    return real_shapes.recipe_commands(RECIPES[name], {"OUT": OUT})


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
        earlier.append(real_shapes.flag_value(argv, "--out"))


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
        for argv in real_shapes.recipe_commands(RECIPES[name], {"OUT": OUT, "MODEL": "/local-model"}):
            model = real_shapes.flag_value(argv, "--model")
            assert model == "/local-model" or model.startswith(OUT + "/"), f"{name}.sh: {argv[0]} --model {model}"


def test_the_setups_defining_flags():
    """What the README promises of each setup (a recipe edited away from its setup fails here)."""
    def flags(name, script):
        return [argv for argv in commands(name) if argv[0] == script]
    qlora, = flags("qlora_dpo_r1", "train_dpo.py")
    for flag, values in {"--quantization": ["4bit"], "--lora-r": ["1"], "--lora-targets": ["q_proj", "v_proj"],
                         "--dtype": ["float16"], "--lr": ["5e-4"], "--batch-size": ["8"], "--max-steps": ["8"],
                         "--beta": ["0.1"], "--max-length": ["1024"]}.items():
        assert real_shapes.flag_values(qlora, flag) == values, flag
    rewards = flags("smollm2_helpsteer2_reward", "train_reward.py")
    assert sorted(real_shapes.flag_value(a, "--loss") for a in rewards) == ["bt", "distributional", "margin"]
    for argv in rewards:
        assert real_shapes.flag_values(argv, "--full-finetune") == []
        assert [real_shapes.flag_value(argv, f) for f in ("--lr", "--batch-size", "--epochs", "--max-length")] == \
            ["5e-5", "8", "1", "1024"]
    stack = commands("stackllama_8bit")
    assert [a[0] for a in stack] == ["train_sft.py", "train_reward.py", "train_ppo.py"]
    assert [real_shapes.flag_value(a, "--template") for a in stack] == ["qa"] * 3
    assert [real_shapes.flag_value(a, "--quantization", "none") for a in stack] == ["none", "8bit", "8bit"]
    multi = commands("multi_adapter_ppo_llama8b")
    assert [a[0] for a in multi] == ["train_reward.py", "train_ppo.py"]
    assert all(real_shapes.flag_value(a, "--quantization") == "4bit" for a in multi)
    assert all(real_shapes.flag_value(a, "--template") == "llama3" for a in multi)
    assert real_shapes.flag_value(multi[1], "--system-prompt") and real_shapes.flag_value(multi[1], "--cost-per-hour")


def test_examples_readme_lists_every_recipe():
    text = open(os.path.join(REPO, "examples", "README.md")).read()
    for name in RECIPES:
        assert f"{name}.sh" in text, name


# ---------------------------------------------------------------- the recorder and the benchmark's rewrites
def test_recorder_keeps_quoting_and_expansion(tmp_path):
    script = tmp_path / "recipe.sh"
    script.write_text('#!/usr/bin/env bash\nset -euo pipefail\nOUT=${OUT:-runs/x}\nSYSTEM="Be brief. Be kind."\n'
                      'echo this line prints nothing to the record\n'
                      'python train_ppo.py --system-prompt "$SYSTEM" \\\n    --out "$OUT/ppo"  # a comment\n'
                      "python -m minirlhf.compare --policies 'a b' c\n")
    assert real_shapes.recipe_commands(str(script)) == [
        ["train_ppo.py", "--system-prompt", "Be brief. Be kind.", "--out", "runs/x/ppo"],
        ["-m", "minirlhf.compare", "--policies", "a b", "c"]]
    assert real_shapes.recipe_commands(str(script), {"OUT": "/tmp/o"})[0][-1] == "/tmp/o/ppo"


def test_recorder_reports_a_failing_script(tmp_path):
    script = tmp_path / "recipe.sh"
    script.write_text("set -euo pipefail\necho $UNSET_VARIABLE\n")
    with pytest.raises(RuntimeError, match="UNSET_VARIABLE"):
        real_shapes.recipe_commands(str(script))


def test_set_flag_replaces_every_value():
    argv = ["train_dpo.py", "--lora-targets", "q_proj", "v_proj", "--packing", "--lr", "-1", "--lora-targets", "x"]
    assert real_shapes.set_flag(argv, "--lora-targets", "o_proj") == \
        ["train_dpo.py", "--packing", "--lr", "-1", "--lora-targets", "o_proj"]
    assert real_shapes.flag_values(argv, "--packing") == [] and real_shapes.flag_values(argv, "--nope") is None
    assert real_shapes.flag_value(argv, "--lr") == "-1"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_benchmark_commands_are_accepted_too(name):
    """What bench/real_shapes.py runs (the recipe + its CPU overrides) parses, on the CPU, at the benchmark's size."""
    data_files = {dataset: f"/data/{i}.jsonl" for i, dataset in enumerate(real_shapes.LENGTHS)}
    for argv in commands(name):
        argv, shape = real_shapes.overrides(argv, data_files, threads=1, quick=False)
        args = parse_args(importlib.import_module(argv[0][:-3]).Args, argv[1:])
        files = data_files[args.dataset]
        assert (args.device, args.threads) == ("cpu", 1)
        assert args.data_files == (real_shapes.first_row_file(files) if argv[0] == "train_sft.py" else files)
        if hasattr(args, "iterations"):
            assert (args.iterations, args.rollout_size, args.minibatch_size) == (2, 2, 2)
            assert args.max_new_tokens <= 300 and args.eval_prompts == 1
        else:
            assert (args.max_steps, args.batch_size) == (3, 1)
        assert shape


def test_measure_reads_steps_losses_and_skipped_steps():
    rows = [(1.0, {"step": 1, "train/loss": 0.7, "train/grad_norm": float("nan")}),
            (3.0, {"step": 2, "train/loss": 0.6, "train/grad_norm": 2.0}),
            (7.0, {"step": 3, "train/loss": 0.5, "train/grad_norm": float("inf")})]
    result = dict(rows=rows, wall=9.0, peak_bytes=2**30, summary={"params/trainable": 10, "params/total": 100,
                                                                   "params/frozen_unchanged": True})
    m = real_shapes.measure(result, "train_dpo.py")
    assert m["step"] == 3.0  # the median of the intervals 2 s and 4 s: step 1 (before row 1) is not timed
    assert (m["first"], m["last"], m["frozen"]) == (0.7, 0.5, True)
    assert m["moved"] == "yes, down (-0.2); 2 of 3 steps skipped (non-finite gradients)"
    rl = real_shapes.measure(dict(result, rows=[(1.0, {"step": 1, "loss/total": 1.0})], summary={"eval/kl": 0.0}),
                             "train_ppo.py")
    assert rl["moved"].startswith("**no**") and rl["step"] is None


def test_written_rows_load_in_their_raw_schema(tmp_path):
    from transformers import AutoTokenizer

    from minirlhf.assets import TINY_LLAMA
    from minirlhf.data import load_preference_dataset, load_prompt_dataset
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    text = real_shapes.text_of(tokenizer, 300, seed=1)
    assert 290 <= len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 300
    lengths = {dataset: {part: (20, 40) for part in parts} for dataset, parts in real_shapes.LENGTHS.items()}
    files = real_shapes.write_data(str(tmp_path), tokenizer, lengths, rows=3)
    for dataset, path in files.items():
        if dataset == "rajpurkar/squad":
            prompts = load_prompt_dataset(dataset, "train", data_files=path)["prompt"]
            assert len(prompts) == 3
        else:
            pairs = load_preference_dataset(dataset, "train", data_files=path)
            assert len(pairs) == 3 and all(c != r for c, r in zip(pairs["chosen"], pairs["rejected"]))
            chosen = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in pairs["chosen"]]
            assert max(chosen) <= 40 and min(chosen) >= 15, chosen  # 40 -> 20 tokens over the rows


# ---------------------------------------------------------------- the laptop recipe (bench/real_model.py runs it)
LAPTOP = os.path.join(REPO, "examples", "smollm2_cpu.sh")


def laptop_commands():
    return real_shapes.recipe_commands(LAPTOP, {"OUT": OUT, "THREADS": "1"})


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
            path = real_shapes.flag_value(argv, flag)
            if path and path.startswith(OUT):
                assert any(path == os.path.join(out, "reward_model") for out in earlier), argv
        earlier.append(real_shapes.flag_value(argv, "--out"))
    text = open(LAPTOP).read()
    assert "\nset -euo pipefail\n" in text and re.search(r'^OUT=\$\{OUT:-runs/[\w/.-]+\}$', text, re.M)


def test_real_model_bench_adds_the_fp32_memory_yardstick():
    import train_ppo
    real_model = load_bench("real_model")
    found = dict(real_model.stages("/o", 1))
    assert "grpo_gold" in found and "best_of_n" in found
    fp32, ppo = (vars(parse_args(train_ppo.Args, found[k][1:])) for k in (real_model.FP32_YARDSTICK, "ppo_4bit"))
    assert (fp32["quantization"], fp32["iterations"], ppo["quantization"]) == ("none", 3, "4bit")
    differ = {k for k in ppo if ppo[k] != fp32[k]}
    assert differ == {"quantization", "iterations", "out"}, differ  # nothing else differs
