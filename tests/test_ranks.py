"""`grace reproduce` under a launcher, with two CPU processes (gloo): rank 0 alone writes every file, once; the metrics
equal one process's with the same global batch (2 ranks x batch b = 1 process x batch 2b), under ZeRO-1 (torchrun) and
ZeRO-2 (the DeepSpeed launcher, as the README runs it); a rank killed while a checkpoint is half-written stops the
job, and `--resume` continues from the latest complete checkpoint.

Each process runs `grace` through tests/_write_audit.py, which logs every file it writes under the run folder and the
preset cache (and can SIGKILL itself when it starts writing a given path)."""
import collections, configparser, json, os, socket, subprocess, sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKER = Path(__file__).with_name("_write_audit.py")
ARGS = ["reproduce", "--profile", "shapes", "--n-train", "16", "--n-val", "0", "--n-test", "6", "--seed", "3",
        "--identifiers", "atomic", "--train-steps", "4", "--clip-steps", "3", "--caption-steps", "3",
        "--pretrain-images", "40", "--pretrain-steps", "3", "--pretrain-clip-steps", "3"]
MEMORIZE, RETRIEVE = 4, 8  # per rank; the one-process reference trains with twice these
KILL_AT = "0:step_000004/.state.json"  # rank 0 dies as it starts step 4's state.json (its weights are written)


def settings(folder: Path, zero: int, ranks: int) -> Path:
    "The repository's settings.ini, its shapes profile with small per-rank batches for `ranks` ranks and a ZeRO config."
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(ROOT/"settings.ini", encoding="utf-8")
    cfg["shapes"].update(memorize_batch_size=str(MEMORIZE * 2 // ranks), retrieve_batch_size=str(RETRIEVE * 2 // ranks),
                         eval_batch_size="4", pseudo_queries="2", checkpoint_every="2", warmup_steps="1",
                         deepspeed_config=str(ROOT/"configs"/"deepspeed"/f"zero{zero}_cpu.json"))
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder/"settings.ini", "w", encoding="utf-8") as f: cfg.write(f)
    return folder/"settings.ini"


DIST_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT",
             "TORCHELASTIC_RUN_ID", "CROSS_RANK", "CROSS_SIZE"}


def free_port() -> str:
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); return str(s.getsockname()[1])


def launch(tmp: Path, name: str, launcher: str, zero: int, resume: bool = False, kill_at: str = "") -> dict:
    "Run the tiny job in tmp/name with `launcher` (one | torchrun | deepspeed); returns its folder, return code and write logs."
    ranks = 1 if launcher == "one" else 2
    command = {"one": [sys.executable],
               "torchrun": [str(BIN/"torchrun"), "--standalone", "--nproc_per_node", "2"],
               "deepspeed": [str(BIN/"deepspeed"), "--master_port", free_port(), "--num_gpus", "2", "--no_local_rank"]}[launcher]
    logs = tmp/"logs"/(name + ("-resumed" if resume else ""))
    # a launcher's variables left in this process (an in-process DeepSpeed test sets RANK, MASTER_PORT, ...) must not
    # reach the launched job: it would try to join this process's group on a port that is already taken
    inherited = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env = inherited | {"GRACE_SETTINGS": str(settings(tmp/f"settings-{zero}-{ranks}", zero, ranks)), "GRACE_CACHE": str(tmp/"cache"),
                        "GRACE_WRITE_LOG": str(logs), "GRACE_WRITE_WATCH": os.pathsep.join([str(tmp/name), str(tmp/"cache")]),
                        "GRACE_KILL_AT": kill_at, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([*command, str(WORKER), *ARGS, "--out", str(tmp/name), *(["--resume"] if resume else [])],
                          env=env, capture_output=True, text=True, timeout=600)
    writes = {r: [tuple(json.loads(l)) for l in (logs/f"rank{r}.jsonl").read_text().splitlines()] if (logs/f"rank{r}.jsonl").is_file() else []
              for r in range(ranks)}
    return dict(out=tmp/name, returncode=done.returncode, stderr=done.stderr, writes=writes)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ranks")
    zero1 = launch(tmp, "zero1", "torchrun", 1)  # first: rank 0 builds the pretrained preset in the empty cache
    assert zero1["returncode"] == 0, zero1["stderr"][-3000:]
    one = launch(tmp, "one", "one", 1)
    assert one["returncode"] == 0, one["stderr"][-3000:]
    killed = launch(tmp, "zero2", "deepspeed", 2, kill_at=KILL_AT)
    half = sorted(p.name for p in (tmp/"zero2"/"grace-atomic"/"checkpoints").glob(".step_000004.*/step_000004/*"))
    finished = (tmp/"zero2"/"metrics.json").exists()
    complete = {p.name: (p/"model.safetensors").stat().st_ino for p in (tmp/"zero2"/"grace-atomic"/"checkpoints").glob("step_*")}
    resumed = launch(tmp, "zero2", "deepspeed", 2, resume=True)
    assert resumed["returncode"] == 0, resumed["stderr"][-3000:]
    return dict(tmp=tmp, zero1=zero1, one=one, killed=killed, half=half, complete=complete, finished=finished, resumed=resumed)


def finals(writes: list) -> list[str]:
    "Files a process put in place: written, renamed or copied to a path outside atomic_write's hidden temporaries."
    return [p for event, p in writes if event in ("open", "safetensors", "os.rename") and "/." not in p]  # a copy opens its target


def test_rank0_alone_writes_each_file_once(runs):
    tmp = runs["tmp"]
    for run in (runs["zero1"], runs["killed"], runs["resumed"]):
        assert run["writes"][1] == []  # rank 1 wrote, renamed, removed and made nothing
        assert [p for p, n in collections.Counter(finals(run["writes"][0])).items() if n > 1] == []
    written = finals(runs["zero1"]["writes"][0])
    for part in ("data/dataset_shapes.json", "data/images/shapes_000000.png", "clip/clip.safetensors", "preset-scratch",
                 "captioner/captions.json", "captioner/checkpoints/step_000003", "identifiers/atomic.json",
                 "grace-atomic/checkpoints/step_000004", "grace-atomic/model", "grace-atomic/row.json", "metrics.json", "table1.md"):
        assert any(str(tmp/"zero1"/part) == p or p.startswith(str(tmp/"zero1"/part) + "/") for p in written), part
    assert any(p.startswith(str(tmp/"cache"/"tiny-pretrained-")) for p in written)  # the preset cache, built by rank 0
    on_disk = [str(p) for p in (tmp/"zero1").rglob("*") if p.is_file()]
    assert [f for f in on_disk if not any(f == p or f.startswith(p + "/") for p in written)] == []  # all put there by rank 0


def rows(run: dict) -> list[dict]:
    keep = ("method", "identifier", "variant", "R@1", "R@5", "R@10", "n_queries", "invalid_rate", "collapse", "memorization",
            "budget", "final_loss", "pseudo_queries", "train_steps")
    return [{k: r.get(k) for k in keep} for r in json.loads((run["out"]/"metrics.json").read_text())["runs"]]


def max_weight_diff(a: Path, b: Path) -> float:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


@pytest.mark.parametrize("name", ["zero1", "resumed"])
def test_two_ranks_match_one_process_with_the_same_global_batch(runs, name):
    two, one = runs[name], runs["one"]
    assert rows(two) == rows(one)  # R@K, memorization, collapse, training budget, final loss: equal
    metrics = [json.loads((run["out"]/"metrics.json").read_text()) for run in (two, one)]
    assert metrics[0]["captioner"]["final_loss"] == metrics[1]["captioner"]["final_loss"]
    assert metrics[0]["captioner"]["quality"] == metrics[1]["captioner"]["quality"]
    captions = [json.loads((run["out"]/"captioner"/"captions.json").read_text())["captions"] for run in (two, one)]
    assert captions[0] == captions[1]  # captioning shared over the ranks: the same captions
    for kind in ("atomic", "structured", "semantic"):
        assert (two["out"]/"identifiers"/f"{kind}.json").read_bytes() == (one["out"]/"identifiers"/f"{kind}.json").read_bytes()
    # the trained weights: equal up to the order of floating-point sums (gradients summed over ranks)
    assert max_weight_diff(two["out"]/"grace-atomic"/"model"/"model.safetensors", one["out"]/"grace-atomic"/"model"/"model.safetensors") < 1e-5
    assert max_weight_diff(*(run["out"]/"captioner"/"checkpoints"/"step_000003"/"model.safetensors" for run in (two, one))) < 1e-5
    histories = [json.loads((run["out"]/"grace-atomic"/"checkpoints"/"step_000004"/"state.json").read_text()) for run in (two, one)]
    assert histories[0]["extra"]["world_size"] == 2 and histories[1]["extra"]["world_size"] == 1
    losses = [[h[k] for h in state["history"] for k in ("loss", "memorize", "retrieve")] for state in histories]
    assert losses[0] and losses[0] == pytest.approx(losses[1], abs=1e-4)  # the ranks' mean: the whole batch's loss


def test_a_rank_killed_mid_checkpoint_resumes_from_the_latest_complete_one(runs):
    killed, resumed, checkpoints = runs["killed"], runs["resumed"], runs["tmp"]/"zero2"/"grace-atomic"/"checkpoints"
    assert killed["returncode"] != 0 and KILL_AT.split(":")[1] in killed["writes"][0][-1][1]  # rank 0 died there
    assert not runs["finished"]
    assert list(runs["complete"]) == ["step_000002"]  # step 4 was cut off while being written...
    assert runs["half"] == ["model.safetensors", "optimizer.safetensors"]  # ...half-written (no state.json), in a hidden temporary
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000002", "step_000004"]  # the temporary is gone
    assert (checkpoints/"step_000002"/"model.safetensors").stat().st_ino == runs["complete"]["step_000002"]  # not redone
    assert not any("step_000002" in p for p in finals(resumed["writes"][0]))
    state = json.loads((checkpoints/"step_000004"/"state.json").read_text())
    assert state["step"] == 4 and state["extra"]["world_size"] == 2


ENGINE_SCRIPT = '''
import json, sys, torch
from pathlib import Path
from grace_nb.core import init_ranks, rank, world_size
from grace_nb.checkpoints import TorchEngine
init_ranks()
torch.manual_seed(rank())  # each rank starts from other weights: TorchEngine must start them all from rank 0's
model = torch.nn.Linear(3, 2)
optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
engine = TorchEngine(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), grad_clip=0.5)
x, y = torch.arange(24.0).view(8, 3) / 10, torch.ones(8, 2)
mine = slice(rank() * 8 // world_size(), (rank() + 1) * 8 // world_size())  # this rank's half of each batch
for step in range(3):
    engine.backward(((model(x[mine] * (step + 1)) - y[mine]) ** 2).mean()); engine.step()
# a file per rank: lines that two ranks print to one pipe can interleave
Path(sys.argv[1], f"rank{rank()}.json").write_text(json.dumps([p.tolist() for p in model.parameters()]))
'''


def test_plain_torch_engine_is_data_parallel(tmp_path):
    "Without a DeepSpeed config, two ranks with half batches end where one process with the whole batch ends."
    script = tmp_path/"engine.py"; script.write_text(ENGINE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS} | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    (tmp_path/"two").mkdir(); (tmp_path/"one").mkdir()
    two = subprocess.run([str(BIN/"torchrun"), "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path/"two")], env=env,
                         capture_output=True, text=True, timeout=300)
    one = subprocess.run([sys.executable, str(script), str(tmp_path/"one")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0 and one.returncode == 0, two.stderr[-2000:] + one.stderr[-2000:]
    weights = [json.loads((tmp_path/"two"/f"rank{r}.json").read_text()) for r in range(2)]
    assert len(weights) == 2 and weights[0] == weights[1]  # the ranks agree
    flat = lambda w: [v for p in w for row in (p if isinstance(p[0], list) else [p]) for v in row]
    assert flat(weights[0]) == pytest.approx(flat(json.loads((tmp_path/"one"/"rank0.json").read_text())), abs=1e-6)
