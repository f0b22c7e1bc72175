"""Turn a settings dataclass into a command line: one flag per field, its comment as the help text.

Every script keeps its settings as a `@dataclass Args` at the top (cleanrl style); `parse_args(Args)` gives `--help`,
`--field-name VALUE` flags (underscores become dashes), and booleans as `--flag` / `--no-flag`. Field help comes from
`field(metadata={"help": ...})` or, more readably, from the docstring-style string literal under each field, which
`field_docs` reads from the source.
"""
import argparse
import ast
import dataclasses
import errno
import inspect
import os
import sys
import textwrap
import typing

from .errors import Diverged, InputError


def field_docs(cls):
    """Map field name -> the string literal written on the line after it (cleanrl's field docstrings), from `cls`
    and the dataclasses it inherits from (a subclass's own text wins)."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = str(nxt.value.value)
    return docs


@dataclasses.dataclass
class MachineArgs:
    """The flags of every script that are about the machine and the run around the algorithm, not the algorithm:
    each script's `Args(MachineArgs)` inherits them (they come first in --help)."""
    dtype: str = "auto"
    """compute dtype: auto (bf16 on GPUs with native bf16, fp16 on older GPUs, fp32 on the CPU) | float32 | bfloat16 |
    float16 (with loss scaling). Trainable weights stay float32 (minirlhf/precision.py)"""
    forward_batch_size: int = 64
    """rows per forward pass without gradient (scoring a rollout, the reference, evaluation, held-out pairs) and per
    micro-batch of an RL minibatch: bounds memory, not the result"""
    deterministic: bool = False
    """deterministic CUDA kernels (torch.use_deterministic_algorithms), for bit-exact resume on a GPU; slower"""
    cost_per_hour: typing.Optional[float] = None
    """price of the machine in $ per hour: summary.json then reports the cost per training sample"""
    report_to: str = "none"
    """none | tensorboard: also write the logged metrics as TensorBoard events in DIR/tensorboard"""
    system_prompt: typing.Optional[str] = None
    """a system message put before every prompt (chat templates and --template llama3 render it)"""


def parse_args(cls, argv=None, description=None):
    """Parse argv into an instance of the dataclass `cls`; print the settings is the caller's job."""
    docs = field_docs(cls)
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag, help_ = "--" + f.name.replace("_", "-"), docs.get(f.name, f.metadata.get("help", " "))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        typ = hints[f.name]
        if typ is bool:
            parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=help_)
            continue
        base = _unwrap_optional(typ)
        if typing.get_origin(base) in (list, tuple):
            item = typing.get_args(base)[0] if typing.get_args(base) else str
            parser.add_argument(flag, default=default, type=item, nargs="+", help=help_)
        else:
            parser.add_argument(flag, default=default, type=_none_or(base) if base is not typ else base,
                                help=help_)
    return cls(**vars(parser.parse_args(argv)))


def _unwrap_optional(typ):
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    return args[0] if typing.get_origin(typ) in (typing.Union, getattr(__import__("types"), "UnionType", None)) \
        and len(args) == 1 else typ


def _none_or(base):
    """For Optional[X] flags: the word 'none' means None."""
    def convert(text):
        return None if text.lower() == "none" else base(text)
    convert.__name__ = base.__name__
    return convert


def format_args(args):
    """The settings, one per line, for the top of every run's output."""
    return "\n".join(f"  {k:<28} {v}" for k, v in dataclasses.asdict(args).items())


def run_script(main, args_cls, prog=None):
    """The `if __name__ == "__main__"` of every script: parse the flags into `args_cls`, call main(args).

    Bad input (errors.InputError) and a diverged run (errors.Diverged) end in one line, `script.py: error: ...`,
    exit status 1; a Ctrl-C outside the training loop (while loading, evaluating before training) or a second Ctrl-C
    inside it ends in one line, status 130 (the first Ctrl-C inside the loop saves and exits 0:
    stopping.GracefulStop). A full disk or quota (OSError ENOSPC / EDQUOT, wherever a checkpoint, adapter, summary or
    log was being written) is one line too, saying what was kept and how to continue (outdir.out_of_space). Any other
    exception is a bug in minirlhf and keeps its traceback. However it ends, the --out folder's lock
    (outdir.lock_out_dir) is released."""
    from .outdir import out_of_space, release_out_dir
    prog = prog or os.path.basename(sys.argv[0])
    args = None
    try:
        args = parse_args(args_cls)
        return main(args)
    except (InputError, Diverged) as e:
        raise SystemExit(f"{prog}: error: {e}") from None
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise SystemExit(f"{prog}: error: {out_of_space(e, args)}") from None
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; nothing more was written (a checkpoint saved earlier is intact)",
              file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        release_out_dir()
