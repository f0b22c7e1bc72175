"""minirlhf/checkpoint.py and outdir.py without a model: checkpoints load with weights_only=True (a crafted file runs
no code), a damaged checkpoint is one clear line, a leftover checkpoint.old never breaks a save, and
outdir.prepare_out_dir guards the output folder (unusable --out, an interrupted run in the way, --overwrite). Tiny
tensors only: the file runs in seconds.
"""
import dataclasses
import io
import json
import os
import pathlib
import random
import zipfile

import numpy as np
import pytest
import torch

from minirlhf import checkpoint as ck
from minirlhf import determinism, outdir
from minirlhf.atomic import atomic_directory
from minirlhf.distributed import DistInfo
from minirlhf.errors import InputError
from minirlhf.tracking import RunLog


@pytest.fixture(autouse=True)
def release_locks():
    """prepare_out_dir locks the folders it prepares (for the life of the process): release them after each test."""
    yield
    outdir.release_out_dir()


@dataclasses.dataclass
class Args:
    out: str = "runs/x"
    lr: float = 1e-3
    seed: int = 0
    lora_targets: list = dataclasses.field(default_factory=lambda: ["q_proj", "v_proj"])
    resume: str = None
    overwrite: bool = False


class Tiny(torch.nn.Module):
    def __init__(self, width=3):
        super().__init__()
        self.frozen = torch.nn.Linear(width, width)
        self.frozen.requires_grad_(False)
        self.lora_A = torch.nn.Parameter(torch.randn(2, width))
        self.lora_B = torch.nn.Parameter(torch.zeros(width, 2))


def one_line(error):
    message = str(error.value)
    assert "\n" not in message, message
    return message


def save_tiny(out, step=3, **extras):
    """A save_training checkpoint of a tiny model whose optimizer has taken one step, with the script-style extras."""
    torch.manual_seed(0)
    model, head = Tiny(), torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(list(p for p in model.parameters() if p.requires_grad) + list(head.parameters()))
    (model.lora_A.sum() + model.lora_B.sum() + head.weight.sum()).backward()
    opt.step()
    generator = torch.Generator().manual_seed(7)
    ck.save_training(str(out), DistInfo(), step=step, args=Args(out=str(out)), model=model, heads={"value": head},
                     optimizer=opt,
                     shared={"kl_controller": {"value": 0.3, "target": 1.0, "horizon": 10000.0},
                             "before": {"eval/gold": np.float64(2.25), "eval/kl": 0.0},
                             "before_samples": [{"prompt": "p", "response": "r", "gold": 3.5, "reward": None}],
                             **extras},
                     local={"epoch": 1, "order": [4, 2, 0], "recent": [(0.5, 0.25)], "generator": generator.get_state(),
                            "baseline": {"mean": 0.1, "count": 3}, "losses": torch.tensor([1.0, 2.0])})
    return model, head, opt


def write_file(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def torch_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# --- 1. no pickled objects ---------------------------------------------------------------------------------------

def test_a_script_checkpoint_round_trips_under_weights_only(tmp_path):
    model, head, opt = save_tiny(tmp_path)
    file = tmp_path / "checkpoint" / "trainer.pt"
    raw = torch.load(file, map_location="cpu", weights_only=True)  # the strict loader reads every entry
    assert raw["before"]["eval/gold"] == 2.25 and type(raw["before"]["eval/gold"]) is float
    state, local = ck.load_checkpoint(str(tmp_path), Args(out=str(tmp_path)), DistInfo())
    assert state["step"] == 3 and state["loaded_from"] == str(file)
    assert state["before_samples"] == [{"prompt": "p", "response": "r", "gold": 3.5, "reward": None}]
    assert state["kl_controller"] == {"value": 0.3, "target": 1.0, "horizon": 10000.0}
    assert local["order"] == [4, 2, 0] and local["epoch"] == 1 and local["baseline"] == {"mean": 0.1, "count": 3}
    assert local["recent"] == [(0.5, 0.25)] and torch.equal(local["losses"], torch.tensor([1.0, 2.0]))
    g = torch.Generator()
    g.set_state(local["generator"])
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=torch.Generator().manual_seed(7)))

    torch.manual_seed(1)
    fresh, fresh_head = Tiny(), torch.nn.Linear(3, 1)
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad] + list(fresh_head.parameters()))
    ck.restore_training((state, local), model=fresh, heads={"value": fresh_head}, optimizer=fresh_opt)
    assert torch.equal(fresh.lora_A, model.lora_A) and torch.equal(fresh_head.weight, head.weight)
    for p, q in zip(fresh_opt.param_groups[0]["params"], opt.param_groups[0]["params"]):
        ours, theirs = fresh_opt.state.get(p, {}), opt.state.get(q, {})
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert len(fresh_opt.state) == 3  # lora_A, lora_B, the head's weight (its bias had no gradient)


def test_rng_state_survives_weights_only_and_continues_every_stream_exactly(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # a cached gaussian in both, the subtle part of their states
    file = tmp_path / "rng.pt"
    torch.save(determinism.rng_state(), file)
    expected = (random.random(), random.gauss(0, 1), np.random.standard_normal(3), np.random.randint(0, 2**31, 4),
                torch.rand(3))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    determinism.set_rng_state(torch.load(file, weights_only=True))
    again = (random.random(), random.gauss(0, 1), np.random.standard_normal(3), np.random.randint(0, 2**31, 4),
             torch.rand(3))
    assert expected[:2] == again[:2]
    assert np.array_equal(expected[2], again[2]) and np.array_equal(expected[3], again[3])
    assert torch.equal(expected[4], again[4])


def test_a_crafted_pickle_runs_no_code_on_resume(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return pathlib.Path.touch, (marker,)

    evil = torch_bytes({"step": 1, "args": {"out": str(tmp_path)}, "world_size": 1, "ranks": [{"x": Payload()}]})
    write_file(tmp_path / "decoy" / "trainer.pt", evil)  # the payload is real: a plain torch.load runs it
    torch.load(tmp_path / "decoy" / "trainer.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()

    write_file(tmp_path / "run" / "checkpoint" / "trainer.pt", evil)
    with pytest.raises(InputError) as e:
        ck.load_checkpoint(str(tmp_path / "run"), Args(out=str(tmp_path)), DistInfo())
    message = one_line(e)
    assert "is not a readable minirlhf checkpoint" in message and "pickled Python objects" in message, message
    assert str(tmp_path / "run" / "checkpoint" / "trainer.pt") in message
    assert not marker.exists()


def test_saving_something_the_loader_would_refuse_fails_at_the_save(tmp_path):
    class Opaque:
        pass

    with pytest.raises(TypeError, match=r"\['bad'\] is a .*Opaque"):
        save_tiny(tmp_path, bad=Opaque())
    with pytest.raises(TypeError, match="ndarray"):
        save_tiny(tmp_path, bad=np.zeros(3))
    assert not (tmp_path / "checkpoint").exists()


# --- 2. a damaged checkpoint is one line --------------------------------------------------------------------------

GOOD = {"step": 2, "args": {"out": "x", "lr": 1e-3}, "world_size": 1, "ranks": [{}]}
DAMAGED = {
    "empty": (b"", "the file is empty"),
    "random bytes": (bytes(random.Random(0).randrange(256) for _ in range(4096)), "not a file written by torch.save"),
    "truncated": (torch_bytes({**GOOD, "w": torch.zeros(1000)})[:3000], "truncated or damaged"),
    "a list": (torch_bytes([1, 2, 3]), "holds a list, not a dict"),
    "no step": (torch_bytes({k: v for k, v in GOOD.items() if k != "step"}), "no 'step'"),
    "no args": (torch_bytes({k: v for k, v in GOOD.items() if k != "args"}), "no 'args'"),
    "no ranks": (torch_bytes({k: v for k, v in GOOD.items() if k != "ranks"}), "no 'ranks'"),
    "no world_size": (torch_bytes({k: v for k, v in GOOD.items() if k != "world_size"}), "no 'world_size'"),
    "args not a dict": (torch_bytes({**GOOD, "args": ["--lr", "1"]}), "'args' is a list, not a dict"),
    "ranks too short": (torch_bytes({**GOOD, "world_size": 2}), "'ranks' holds 1 rank state(s) for 2 process(es)"),
    "damaged rng": (torch_bytes({**GOOD, "ranks": [{"rng": {"python": (3, (1, 2), None)}}]}),
                    "its random state is damaged: no 'numpy' entry"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_a_damaged_checkpoint_is_one_clear_line(tmp_path, case):
    data, reason = DAMAGED[case]
    file = tmp_path / "checkpoint" / "trainer.pt"
    write_file(file, data)
    with pytest.raises(InputError) as e:
        ck.load_checkpoint(str(tmp_path), Args(out="x"), DistInfo())
    message = one_line(e)
    assert message.startswith(f"--resume {tmp_path}: {file} is not a readable minirlhf checkpoint ("), message
    assert reason in message and "--overwrite instead of --resume" in message, message


def test_a_missing_checkpoint_and_other_settings_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="no checkpoint there"):
        ck.load_checkpoint(str(tmp_path), Args(), DistInfo())
    save_tiny(tmp_path)
    with pytest.raises(InputError, match=r"different settings: --lr 0.001 there, 0.5 here") as e:
        ck.load_checkpoint(str(tmp_path), Args(out=str(tmp_path), lr=0.5), DistInfo())
    one_line(e)
    with pytest.raises(InputError, match="written by 1 process"):
        ck.load_checkpoint(str(tmp_path), Args(out=str(tmp_path)), DistInfo(world_size=2))
    # settings that do not change the result may differ, --overwrite among them
    ck.load_checkpoint(str(tmp_path), Args(out="elsewhere", resume=str(tmp_path), overwrite=True), DistInfo())


def test_a_flag_of_one_or_several_values_given_one_is_the_same_setting(tmp_path):
    """--reward-model takes one folder or several: a checkpoint that holds one folder as a plain value resumes with
    the same folder given as a one-element list; another list is another setting."""
    model, head = Tiny(), torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(list(p for p in model.parameters() if p.requires_grad) + list(head.parameters()))
    ck.save_training(str(tmp_path), DistInfo(), step=1, args=Args(out=str(tmp_path), lora_targets="q_proj"),
                     model=model, heads={"value": head}, optimizer=opt, shared={}, local={})
    ck.load_checkpoint(str(tmp_path), Args(out=str(tmp_path), lora_targets=["q_proj"]), DistInfo())
    with pytest.raises(InputError, match=r"--lora-targets 'q_proj' there, \['q_proj', 'v_proj'\] here"):
        ck.load_checkpoint(str(tmp_path), Args(out=str(tmp_path)), DistInfo())
    with pytest.raises(InputError, match=r"--lora-targets 'q_proj' there, \['k_proj'\] here"):
        ck.load_checkpoint(str(tmp_path), Args(out=str(tmp_path), lora_targets=["k_proj"]), DistInfo())


def test_a_checkpoint_of_another_model_is_an_input_error(tmp_path):
    save_tiny(tmp_path)
    checkpoint = ck.load_checkpoint(str(tmp_path), Args(out=str(tmp_path)), DistInfo())

    def restore(model, head):
        params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
        ck.restore_training(checkpoint, model=model, heads={"value": head}, optimizer=torch.optim.AdamW(params))

    with pytest.raises(InputError, match=r"lora_A is \(2, 3\) there, \(2, 4\) here") as e:
        restore(Tiny(width=4), torch.nn.Linear(3, 1))
    one_line(e)
    renamed = Tiny()
    renamed.extra = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(InputError, match="1 trainable weights missing"):
        restore(renamed, torch.nn.Linear(3, 1))
    with pytest.raises(InputError, match="its value head differs") as e:
        restore(Tiny(), torch.nn.Linear(3, 2))
    one_line(e)
    with pytest.raises(InputError, match=r"is not a readable minirlhf checkpoint \(no heads\['reward'\] in it\)"):
        model = Tiny()
        ck.restore_training(checkpoint, model=model, heads={"reward": torch.nn.Linear(3, 1)},
                            optimizer=torch.optim.AdamW([model.lora_A]))
    with pytest.raises(InputError, match="does not fit this optimizer"):
        model = Tiny()
        ck.restore_training(checkpoint, model=model, heads={"value": torch.nn.Linear(3, 1)},
                            optimizer=torch.optim.AdamW([model.lora_A]))


# --- 3. leftovers of a kill never break a save --------------------------------------------------------------------

def test_a_leftover_old_and_tmp_folder_do_not_break_a_save(tmp_path):
    save_tiny(tmp_path, step=2)
    for leftover in ("checkpoint.old", "checkpoint.tmp"):  # a kill between the two renames / while writing
        write_file(tmp_path / leftover / "trainer.pt", b"stale")
        write_file(tmp_path / leftover / "sub" / "more", b"stale")
    save_tiny(tmp_path, step=4)  # was: OSError: [Errno 39] Directory not empty
    assert ck.load_checkpoint(str(tmp_path), Args(out=str(tmp_path)), DistInfo())[0]["step"] == 4
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]


def test_a_kill_between_the_two_renames_keeps_the_old_version_until_the_new_one_is_in_place(tmp_path):
    save_tiny(tmp_path, step=2)
    os.replace(tmp_path / "checkpoint", tmp_path / "checkpoint.old")  # killed between the two renames
    assert ck.load_checkpoint(str(tmp_path), Args(out=str(tmp_path)), DistInfo())[0]["step"] == 2

    def crash(tmp):
        raise RuntimeError("killed while writing")
    with pytest.raises(RuntimeError):
        atomic_directory(tmp_path / "checkpoint", crash)
    assert ck.load_checkpoint(str(tmp_path), Args(out=str(tmp_path)), DistInfo())[0]["step"] == 2  # .old still there
    save_tiny(tmp_path, step=4)
    assert ck.load_checkpoint(str(tmp_path), Args(out=str(tmp_path)), DistInfo())[0]["step"] == 4
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]


# --- 4. prepare_out_dir ------------------------------------------------------------------------------------------

def test_a_new_or_empty_out_is_created_and_accepted(tmp_path):
    outdir.prepare_out_dir(str(tmp_path / "new" / "run"), None, False)
    assert os.path.isdir(tmp_path / "new" / "run")
    assert os.listdir(tmp_path / "new" / "run") == [outdir.LOCK_FILE]  # the run's lock; no probe left
    outdir.prepare_out_dir(str(tmp_path / "new" / "run"), None, False)  # the lock is this process's own
    outdir.release_out_dir(str(tmp_path / "new" / "run"))
    assert os.listdir(tmp_path / "new" / "run") == []


def test_an_unusable_out_is_one_clear_line(tmp_path, monkeypatch):
    write_file(tmp_path / "a-file", b"x")
    with pytest.raises(InputError, match=f"--out {tmp_path / 'a-file'} is a file, not a directory") as e:
        outdir.prepare_out_dir(str(tmp_path / "a-file"), None, False)
    one_line(e)
    with pytest.raises(InputError, match=f"cannot be created: {tmp_path / 'a-file'} is a file") as e:
        outdir.prepare_out_dir(str(tmp_path / "a-file" / "run"), None, False)
    assert str(e.value).startswith(f"--out {tmp_path / 'a-file' / 'run'} ")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(outdir.tempfile, "mkstemp", refuse)  # what a read-only folder does (root ignores chmod)
    with pytest.raises(InputError, match=f"--out {tmp_path} is not writable \\(Permission denied\\)") as e:
        outdir.prepare_out_dir(str(tmp_path), None, False)
    one_line(e)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_refused(tmp_path):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    try:
        with pytest.raises(InputError, match="is not writable"):
            outdir.prepare_out_dir(str(tmp_path / "ro"), None, False)
        with pytest.raises(InputError, match="cannot be created"):
            outdir.prepare_out_dir(str(tmp_path / "ro" / "run"), None, False)
    finally:
        os.chmod(tmp_path / "ro", 0o700)


def test_an_interrupted_run_is_not_overwritten_without_overwrite(tmp_path):
    out = tmp_path / "run"
    save_tiny(out, step=6)
    write_file(out / "metrics.jsonl", b'{"step": 1}\n')
    with pytest.raises(InputError) as e:
        outdir.prepare_out_dir(str(out), None, False)
    assert one_line(e) == (f"--out {out} holds an interrupted run (checkpoint at step 6): continue it with "
                           f"--resume {out}, or pass --overwrite to start over")
    # a Ctrl-C'd run writes a summary that says it did not finish: still interrupted
    write_file(out / "summary.json", json.dumps({"train/finished": False}).encode())
    with pytest.raises(InputError, match="interrupted run"):
        outdir.prepare_out_dir(str(out), None, False)
    # killed between the two renames: checkpoint.old is the run's checkpoint
    os.replace(out / "checkpoint", out / "checkpoint.old")
    with pytest.raises(InputError, match="checkpoint at step 6"):
        outdir.prepare_out_dir(str(out), None, False)
    outdir.prepare_out_dir(str(out), str(out), False)  # --resume is what it is for
    assert os.path.isdir(out / "checkpoint.old")

    outdir.prepare_out_dir(str(out), None, True)  # --overwrite: the old checkpoint goes, the rest is the run's
    assert sorted(os.listdir(out)) == sorted([outdir.LOCK_FILE, "metrics.jsonl", "summary.json"])
    outdir.prepare_out_dir(str(out), None, False)


def test_an_unreadable_interrupted_checkpoint_is_named(tmp_path):
    write_file(tmp_path / "checkpoint" / "trainer.pt", b"\x00" * 10)
    with pytest.raises(InputError) as e:
        outdir.prepare_out_dir(str(tmp_path), None, False)
    assert one_line(e) == (f"--out {tmp_path} holds an interrupted run (its checkpoint "
                           f"{tmp_path / 'checkpoint' / 'trainer.pt'} is unreadable, so it cannot be resumed): pass "
                           "--overwrite to start over")
    outdir.prepare_out_dir(str(tmp_path), None, True)
    assert not (tmp_path / "checkpoint").exists()


def test_a_finished_run_folder_is_reused_as_it_is(tmp_path):
    save_tiny(tmp_path, step=8)
    write_file(tmp_path / "summary.json", json.dumps({"train/finished": True}).encode())
    before = sorted(os.listdir(tmp_path))
    outdir.prepare_out_dir(str(tmp_path), None, False)
    outdir.release_out_dir(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == before  # untouched (no probe file left, the lock released)
    # the new run's log drops the old summary: its "finished" must not vouch for the new run's checkpoints
    RunLog(str(tmp_path), Args(out=str(tmp_path)))
    assert not (tmp_path / "summary.json").exists()
    save_tiny(tmp_path, step=2)  # the new run is then killed after a checkpoint
    with pytest.raises(InputError, match="checkpoint at step 2"):
        outdir.prepare_out_dir(str(tmp_path), None, False)


def test_a_resumed_run_keeps_its_summary(tmp_path):
    write_file(tmp_path / "summary.json", json.dumps({"train/finished": False}).encode())
    write_file(tmp_path / "metrics.jsonl", b'{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    log = RunLog(str(tmp_path), Args(out=str(tmp_path)), resume_step=2)
    assert (tmp_path / "summary.json").exists() and [r["step"] for r in log.history] == [1, 2]


def test_resume_checks_the_folder_but_creates_nothing(tmp_path):
    outdir.prepare_out_dir(str(tmp_path / "missing"), str(tmp_path / "missing"), False)
    assert not (tmp_path / "missing").exists()  # load_checkpoint then says "no checkpoint there"
    write_file(tmp_path / "a-file", b"x")
    with pytest.raises(InputError, match="--resume .* is a file, not a directory"):
        outdir.prepare_out_dir(str(tmp_path / "a-file"), str(tmp_path / "a-file"), False)
    with pytest.raises(InputError, match="pass one of them"):
        outdir.prepare_out_dir(str(tmp_path), str(tmp_path), True)


def test_prepare_out_dir_is_fast_even_for_a_big_checkpoint(tmp_path):
    import time
    ck.save_checkpoint(str(tmp_path), {"step": 5, "args": {}, "big": torch.zeros(16_000_000)}, {}, DistInfo())
    start = time.perf_counter()
    with pytest.raises(InputError, match="step 5"):
        outdir.prepare_out_dir(str(tmp_path), None, False)
    assert time.perf_counter() - start < 0.5
    assert zipfile.is_zipfile(tmp_path / "checkpoint" / "trainer.pt")


def test_a_resume_with_many_other_settings_names_the_first_five(tmp_path):
    Many = dataclasses.make_dataclass("Many", [(f"flag_{i}", int, 0) for i in range(12)] + [("out", str, "")])
    saved = dataclasses.asdict(Many(**{f"flag_{i}": 1 for i in range(12)}))
    ck.save_checkpoint(str(tmp_path), {"step": 1, "args": saved}, {"rng": determinism.rng_state()}, DistInfo())
    with pytest.raises(InputError) as e:
        ck.load_checkpoint(str(tmp_path), Many(), DistInfo())
    assert one_line(e) == (f"--resume {tmp_path}: the checkpoint was trained with different settings: --flag-0 1 "
                           "there, 0 here, --flag-1 1 there, 0 here, --flag-10 1 there, 0 here, --flag-11 1 there, 0 "
                           "here, --flag-2 1 there, 0 here (and 7 more); resume with the checkpoint's settings")


def test_a_checkpoint_names_the_script_that_wrote_it(tmp_path):
    save_tiny(tmp_path, step=1)
    state = torch.load(tmp_path / "checkpoint" / "trainer.pt", weights_only=True)
    assert state["script"] == "test_checkpoint.py"  # the file defining the settings' class
    state["script"], state["args"]["lr"] = "train_other.py", 5.0
    torch.save(state, tmp_path / "checkpoint" / "trainer.pt")
    with pytest.raises(InputError) as e:
        ck.load_checkpoint(str(tmp_path), Args(out=str(tmp_path)), DistInfo())
    assert one_line(e) == (f"--resume {tmp_path} was written by train_other.py; resume it with python train_other.py "
                           f"--resume {tmp_path} and the settings in {tmp_path / 'args.json'} (this is "
                           "test_checkpoint.py)")
    state["args"]["lr"] = 1e-3  # a renamed copy of a script, with the same settings, resumes
    torch.save(state, tmp_path / "checkpoint" / "trainer.pt")
    assert ck.load_checkpoint(str(tmp_path), Args(out=str(tmp_path)), DistInfo())[0]["step"] == 1
