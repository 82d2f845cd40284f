"""Run the `grace` command recording what this process writes (used by tests/test_ranks.py, one copy per rank).

A Python audit hook sees every file opened for writing, renamed, removed, copied or made; safetensors files, which
Rust writes, are recorded by wrapping `safetensors.torch.save_file`. Events under the folders in $GRACE_WRITE_WATCH
(separated by os.pathsep) go to $GRACE_WRITE_LOG/rank<RANK>.jsonl as [event, absolute path] lines.
$GRACE_KILL_AT = "<rank>:<path fragment>" kills that rank with SIGKILL when it starts writing such a path."""
import faulthandler, json, os, signal, sys
from pathlib import Path

RANK = os.environ.get("RANK", "0")
WATCH = [os.path.realpath(p) for p in os.environ["GRACE_WRITE_WATCH"].split(os.pathsep)]
KILL = os.environ.get("GRACE_KILL_AT", "")
Path(os.environ["GRACE_WRITE_LOG"]).mkdir(parents=True, exist_ok=True)
LOG = open(Path(os.environ["GRACE_WRITE_LOG"])/f"rank{RANK}.jsonl", "a", buffering=1)  # opened before the hook
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def record(event, path):
    if not isinstance(path, (str, bytes, os.PathLike)): return  # a file descriptor
    where = os.path.abspath(os.fsdecode(path))
    if not any(where == w or where.startswith(w + os.sep) for w in WATCH): return
    LOG.write(json.dumps([event, where]) + "\n")
    if KILL and KILL.split(":", 1)[0] == RANK and KILL.split(":", 1)[1] in where:
        LOG.flush(); os.kill(os.getpid(), signal.SIGKILL)


def hook(event, args):
    if event == "open" and len(args) == 3 and isinstance(args[2], int) and args[2] & WRITE_FLAGS: record("open", args[0])
    elif event in ("os.rename", "shutil.copyfile", "shutil.copytree"): record(event, args[1])
    elif event in ("os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate"): record(event, args[0])


faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints where a hung rank waits
sys.addaudithook(hook)
import safetensors.torch  # noqa: E402  (after the hook, before grace_nb imports save_file)
_save_file = safetensors.torch.save_file
def _recorded_save_file(tensors, filename, metadata=None):
    record("safetensors", filename)
    return _save_file(tensors, filename, metadata)
safetensors.torch.save_file = _recorded_save_file

from grace_nb.cli import main  # noqa: E402
sys.exit(main(sys.argv[1:]))
