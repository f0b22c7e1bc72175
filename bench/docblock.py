"""The generated block of a markdown file: what a benchmark writes between its two markers, the rest kept as written.

bench/run.py, bench/vs_trl.py, bench/sampler.py (docs/benchmarks.md), bench/real_shapes.py (docs/real_models.md) and
bench/frontier.py (docs/frontier.md) each own one block; the analysis around it is written by hand and survives every
re-run. machine() and load_average() give the facts every block's header states.
"""
import os
import platform


def machine():
    """(CPU model name, logical cores) of this machine."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return cpu, os.cpu_count()


def load_average():
    """The 1-minute load average, as /proc/loadavg writes it."""
    return open("/proc/loadavg").read().split()[0]


def replace_block(path, block, begin, end, new_file="", new_section=""):
    """Write `block` between the markers `begin` and `end` of the markdown file `path`, keeping the text around them.
    A missing file starts as `new_file`; a file without the markers gets `new_section` (a heading, say) and the markers
    appended. Atomic: written to path.tmp, then renamed into place."""
    text = open(path).read() if os.path.exists(path) else new_file
    if begin not in text or end not in text:
        text = text.rstrip() + (f"\n\n{new_section}" if new_section else "") + f"\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(f"{head}{begin}\n{block}\n{end}{tail}")
    os.replace(path + ".tmp", path)
