"""Turn a settings dataclass into a command line: one flag per field, its comment as the help text.

Every script keeps its settings as a `@dataclass Args` at the top (cleanrl style), made of the shared groups of
settings.py plus its own algorithm's knobs; `parse_args(Args)` gives `--help` (one group per class),
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


def parse_args(cls, argv=None, description=None):
    """Parse argv into an instance of the dataclass `cls`; print the settings is the caller's job.

    --help lists the flags in groups: first the fields `cls` declares itself (the script's own algorithm), then one
    group per dataclass it is made of (settings.py), titled by that class's docstring. A flag renamed in a class's
    RENAMED table ({"--old-flag": "--new-flag"}) is refused with one line naming its new name."""
    argv = sys.argv[1:] if argv is None else list(argv)
    docs = field_docs(cls)
    own_doc = cls.__doc__ if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") else ""  # not dataclass's
    parser = argparse.ArgumentParser(description=description or own_doc.strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    renamed = {old: new for klass in reversed(cls.__mro__) for old, new in getattr(klass, "RENAMED", {}).items()}
    for arg in argv:
        if arg.split("=")[0] in renamed:
            raise InputError(f"{arg.split('=')[0]} is now {renamed[arg.split('=')[0]]} (same meaning); give that")
    groups = _groups(cls, parser)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag, help_ = "--" + f.name.replace("_", "-"), docs.get(f.name, f.metadata.get("help", " "))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        typ, group = hints[f.name], groups[f.name]
        if typ is bool:
            group.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=help_)
            continue
        base = _unwrap_optional(typ)
        if typing.get_origin(base) in (list, tuple):
            item = typing.get_args(base)[0] if typing.get_args(base) else str
            group.add_argument(flag, default=default, type=item, nargs="+", help=help_)
        else:
            group.add_argument(flag, default=default, type=_none_or(base) if base is not typ else base, help=help_)
    return cls(**vars(parser.parse_args(argv)))


def _groups(cls, parser):
    """field name -> the argparse group of the class that declares it first (its most basic class: a script that
    only changes a shared default keeps the flag in its shared group); the script's own group is created first."""
    owner = {}
    for klass in reversed(cls.__mro__):
        for name in klass.__dict__.get("__annotations__", {}):
            owner.setdefault(name, klass)
    titles = {cls: "settings of this script"}
    for klass in cls.__mro__[1:]:
        if dataclasses.is_dataclass(klass):
            titles[klass] = (klass.__doc__ or klass.__name__).strip().splitlines()[0]
    made = {klass: parser.add_argument_group(title) for klass, title in titles.items()}
    return {f.name: made[owner[f.name]] for f in dataclasses.fields(cls)}


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
        doc = sys.modules[main.__module__].__doc__ or ""  # the script's docstring: its first paragraph heads --help
        args = parse_args(args_cls, description=doc.strip().split("\n\n")[0])
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
