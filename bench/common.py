"""What the bench/ and dev/ scripts share: a training script run as a child process and measured, the commands of a
recipe (examples/*.sh) and their flags, the machine a measurement ran on, and the generated block of a markdown file.

A script that measures writes its table between two markers of a docs/ page (write_doc); the analysis around the
block is written by hand and survives every re-run. The dev/ scripts import this file with bench/ on sys.path.
"""
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a child's environment for runs that must not reach the network or print progress bars
OFFLINE = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               TOKENIZERS_PARALLELISM="false")


# ----------------------------------------------------------------------------------------------- the machine
def machine():
    """(CPU model name, logical cores) of this machine."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return cpu, os.cpu_count()


def load_average():
    """The 1-minute load average, as /proc/loadavg writes it."""
    return open("/proc/loadavg").read().split()[0]


def mib(nbytes):
    """Bytes as MiB for a table: whole MiB, two decimals below one."""
    return f"{nbytes / 2**20:,.0f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**20:.2f} MiB"


# ---------------------------------------------------------------------------------------------- a child process
def status_kib(pid, field):
    """A field of /proc/PID/status in KiB (VmRSS: resident now, VmHWM: its high-water mark); None once it is gone."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None


class Child:
    """`python ARGV` started from the repository root, its output (stdout and stderr) written to `log`.

    threads: OMP_NUM_THREADS and MKL_NUM_THREADS of the child (its --threads flag is the caller's); env: more
    variables (OFFLINE, say). poll() reads the child's VmHWM while it runs (exec starts it afresh, so nothing of this
    process is counted) and, once it has exited, its exit status and CPU seconds (os.wait4: CPU time well below wall
    time means the run waited for a core)."""

    def __init__(self, argv, log, threads=None, env=None):
        extra = {} if threads is None else dict(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.argv, self.log, self.started = list(argv), log, time.time()
        self.returncode = self.cpu_seconds = self.wall_seconds = None
        self.peak_kib = 0
        with open(log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, *self.argv], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                         env=dict(os.environ, **extra, **(env or {})))

    @property
    def peak_rss_bytes(self):
        return self.peak_kib * 1024

    def poll(self):
        """True once the child has exited (returncode, cpu_seconds and wall_seconds are then set)."""
        if self.returncode is not None:
            return True
        self.peak_kib = max(self.peak_kib, status_kib(self.proc.pid, "VmHWM") or 0)
        pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        if pid == 0:
            return False
        self.returncode = self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.cpu_seconds, self.wall_seconds = usage.ru_utime + usage.ru_stime, time.time() - self.started
        return True

    def wait(self, poll=0.2, timeout=None, watch=None):
        """Poll every `poll` seconds until the child exits (killed after `timeout` seconds), calling watch() at each
        poll and once at the end. Returns self."""
        while not self.poll():
            if watch:
                watch()
            if timeout is not None and time.time() - self.started > timeout:
                os.kill(self.proc.pid, signal.SIGKILL)  # not Popen.kill: its poll() would reap the child before wait4
            time.sleep(poll)
        if watch:
            watch()
        return self

    def tail(self, n=30):
        """The last n lines of the child's output."""
        return "".join(open(self.log, errors="replace").readlines()[-n:])

    def result_line(self):
        """The last line of the output that starts with "{": the JSON result a child prints when it is done."""
        return next((line for line in reversed(open(self.log).read().splitlines()) if line.startswith("{")), "")


def run_script(argv, log, threads=None, env=None, poll=0.2, timeout=None, watch=None):
    """Run `python ARGV` from the repository root to its end (Child, Child.wait); returns the Child."""
    return Child(argv, log, threads, env).wait(poll, timeout, watch)


# -------------------------------------------------------------------------------------- a recipe's commands
END_OF_ARGS = "--minirlhf-end-of-command--"  # what the recording `python` function writes after each command


def recipe_commands(script, env=None):
    """The `python ...` commands of a recipe, in order, as argument lists without "python" (e.g. ["train_dpo.py",
    "--model", ...]), exactly as bash expands them: the script runs under bash with `python` defined as a function
    that appends its arguments to a file. `env`: the variables the script reads (MODEL, OUT); nothing else of this
    process's environment leaks in, so the defaults written in the script apply. Nothing is trained or downloaded."""
    with tempfile.NamedTemporaryFile(prefix="minirlhf-dry-run-") as record:
        recorder = f'python() {{ printf "%s\\0" "$@" {END_OF_ARGS} >> "$MINIRLHF_DRY_RUN"; }}; . "$0"'
        clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
                 "MINIRLHF_DRY_RUN": record.name, **(env or {})}
        proc = subprocess.run(["bash", "-c", recorder, os.path.abspath(script)], env=clean, cwd=REPO,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{script}: bash exited {proc.returncode}: {proc.stderr.strip()}")
        words = open(record.name, "rb").read().decode().split("\0")[:-1]
    commands, current = [], []
    for word in words:
        if word == END_OF_ARGS:
            commands.append(current)
            current = []
        else:
            current.append(word)
    return commands


def flag_values(argv, flag):
    """The values after the last occurrence of `flag` in argv ([] for a boolean flag, None when absent)."""
    values = None
    for i, word in enumerate(argv):
        if word == flag:
            values = []
            for value in argv[i + 1:]:
                if value.startswith("--"):
                    break
                values.append(value)
    return values


def flag_value(argv, flag, default=None):
    values = flag_values(argv, flag)
    return values[0] if values else default


def set_flag(argv, flag, *values):
    """argv with every occurrence of `flag` (and its values) removed and `flag values...` appended."""
    out, skipping = [], False
    for word in argv:
        if word.startswith("--"):
            skipping = word == flag
        if not skipping:
            out.append(word)
    return out + [flag, *map(str, values)]


def with_flags(argv, **flags):
    """set_flag for each keyword: max_steps=3 sets --max-steps 3."""
    for name, value in flags.items():
        argv = set_flag(argv, "--" + name.replace("_", "-"), value)
    return argv


# ------------------------------------------------------------------------------------- the generated block
def write_doc(path, block, begin, end, new_file="", new_section=""):
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
