"""grace_nb as an installed library (issue 14): the wheel, installed into a fresh virtual environment that does not
see the repository, used from an empty folder as a new user would.

The environment reuses this one's installed dependencies through one .pth line naming its site-packages: a folder
named in a .pth file goes on sys.path, but the .pth files inside it (the editable grace_nb finder among them) are not
run, so `import grace_nb` can only find the wheel's copy. Nothing is downloaded. `pytest -s` prints every command
with what it printed: the transcript of a user's session.
"""
import json, os, shutil, subprocess, sys, sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--train-steps", "3", "--clip-steps", "3", "--caption-steps", "3", "--identifiers", "atomic",
        "--pretrain-images", "40", "--pretrain-steps", "3", "--pretrain-clip-steps", "3"]  # seconds, not minutes


def _wheel(repo: Path, tmp: Path) -> Path:
    "Build the wheel from a copy of the sources (setuptools writes build/ and *.egg-info beside them)."
    src = tmp/"src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "settings.ini"): shutil.copy2(repo/name, src/name)
    # grace_nb/settings.ini stays a link to ../settings.ini, as in the repository; the wheel stores the file itself
    shutil.copytree(repo/"grace_nb", src/"grace_nb", symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                            "--no-index", "--no-cache-dir", "-q", "-w", str(tmp/"dist")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    return next((tmp/"dist").glob("grace_nb-*.whl"))


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    "A fresh venv with the wheel installed, and `run(*command)`, which runs a command there from an empty folder."
    tmp = tmp_path_factory.mktemp("installed")
    wheel, venv = _wheel(ROOT, tmp), tmp/"venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv/"bin"/"python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")  # this venv's packages
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GRACE_SETTINGS", "VIRTUAL_ENV")}
    env |= {"PATH": f"{venv/'bin'}{os.pathsep}{env['PATH']}", "GRACE_CACHE": str(tmp/"cache"), "PYTHONNOUSERSITE": "1",
            "OMP_NUM_THREADS": "1"}
    folder = tmp/"empty"
    folder.mkdir()

    def run(*command, expect=0):
        out = subprocess.run(list(command), cwd=folder, env=env, capture_output=True, text=True, timeout=900)
        shown = " ".join(str(c) for c in command).replace(str(tmp), "$TMP")
        print(f"\n$ {shown}   # exit status {out.returncode}\n{out.stdout.strip()}".replace(str(tmp), "$TMP"))
        if out.returncode != 0 and out.stderr.strip(): print(out.stderr.strip().splitlines()[-1].replace(str(tmp), "$TMP"))
        assert out.returncode == expect, out.stderr
        return out

    run("python", "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", str(wheel))
    return run, folder, Path(site)


def test_import_is_the_installed_wheel(user, repo_root):
    run, folder, site = user
    out = run("python", "-c", "import sys, grace_nb, grace_nb.core as core; print(grace_nb.__file__); "
                              "print(core.packaged_settings()); print(any('editable' in m for m in sys.modules))")
    module, packaged, editable = out.stdout.split()
    assert Path(module) == site/"grace_nb"/"__init__.py" and editable == "False"
    assert not Path(packaged).is_symlink() and Path(packaged).read_bytes() == (repo_root/"settings.ini").read_bytes()


def test_profiles_are_the_packaged_ones(user):
    run, folder, site = user
    lines = run("grace", "profiles").stdout.splitlines()
    assert [l.split()[0] for l in lines] == ["shapes", "flickr30k", "coco"]
    assert all(str(site/"grace_nb"/"settings.ini") in l and "packaged" in l for l in lines)
    assert "against the current folder" in " ".join(run("grace", "profiles", "--help").stdout.split())


def test_data_shapes_writes_into_the_current_folder(user):
    run, folder, _ = user
    out = run("grace", "data", "shapes", "--out", "data/mine", "--n-train", "24", "--n-val", "2", "--n-test", "6")
    assert out.stdout.strip() == "data/mine/dataset_shapes.json"
    assert len(json.loads((folder/"data/mine/dataset_shapes.json").read_text())["images"]) == 32


def test_own_dataset_checked_and_given_a_profile(user):
    run, folder, _ = user
    (folder/"data/mine/images/shapes_000003.png").unlink()
    out = run("grace", "data", "karpathy-check", "data/mine/dataset_shapes.json", expect=1)
    assert "usable: train 23, val 2, test 6; bad: 1" in out.stdout and "entry 3 ('shapes_000003.png'): missing image" in out.stdout
    (folder/"mine.ini").write_text("[mine]\nextends = shapes\ncorpus = karpathy\ndata_dir = data/mine\n")
    mine = run("grace", "profiles", "--settings", "mine.ini").stdout.splitlines()[-1].split()
    assert mine == ["mine", "tiny", str(folder/"mine.ini")]


def test_reproduce_stops_at_a_bad_entry_then_skips_it(user):
    run, folder, _ = user
    out = run("grace", "reproduce", "--settings", "mine.ini", "--profile", "mine", *TINY, expect=2)
    assert "entry 3 ('shapes_000003.png'): image file not found" in out.stderr and "--on-error skip" in out.stderr
    out = run("grace", "reproduce", "--settings", "mine.ini", "--profile", "mine", "--on-error", "skip", *TINY)
    assert "skipped 1 of 32 entries" in out.stdout
    metrics = json.loads((folder/"runs/mine/metrics.json").read_text())  # the default run folder: runs/PROFILE
    assert metrics["profile"] == "mine" and metrics["dataset"]["train"]["images"] == 23
    assert [(r["method"], r["identifier"]) for r in metrics["runs"]] == [("clip", None), ("grace", "atomic")]
    assert (folder/"runs/mine/grace-atomic/model/model.safetensors").is_file()
