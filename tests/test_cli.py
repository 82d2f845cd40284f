"The `grace` console script, run as a user would (a subprocess), and the README's promises."
import hashlib, json, re, shutil, subprocess, sys
from pathlib import Path

import pytest

GRACE = shutil.which("grace", path=str(Path(sys.executable).parent)) or "grace"


def run(*args, cwd=None):
    return subprocess.run([GRACE, *args], capture_output=True, text=True, cwd=cwd)


def tree_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_profiles_lists_settings():
    out = run("profiles")
    assert out.returncode == 0, out.stderr
    assert [l.split()[0] for l in out.stdout.splitlines()] == ["shapes", "flickr30k", "coco"]


def test_profiles_say_which_file_each_comes_from(tmp_path):
    (tmp_path/"my.ini").write_text("[mine]\nextends = shapes\n")
    rows = [l.split() for l in run("profiles", "--settings", str(tmp_path/"my.ini")).stdout.splitlines()]
    assert [r[0] for r in rows] == ["shapes", "flickr30k", "coco", "mine"]
    assert rows[0][2].endswith("grace_nb/settings.ini") and "(packaged:" in rows[0]
    assert rows[-1] == ["mine", "tiny", str((tmp_path/"my.ini").resolve())]


def test_own_dataset_check_and_bad_entries(tmp_path):
    assert run("data", "shapes", "--out", str(tmp_path/"d"), "--n-train", "4", "--n-val", "0", "--n-test", "2").returncode == 0
    corpus = tmp_path/"d"/"dataset_shapes.json"
    clean = run("data", "karpathy-check", str(corpus))
    assert clean.returncode == 0 and "usable: train 4, test 2; bad: 0" in clean.stdout
    (tmp_path/"d"/"images"/"shapes_000001.png").write_bytes(b"not a png")
    found = run("data", "karpathy-check", str(corpus))
    assert found.returncode == 1 and "entry 1 ('shapes_000001.png'): undecodable image" in found.stdout
    assert run("data", "karpathy-check", str(corpus), "--check", "exists").returncode == 0
    (tmp_path/"d"/"images"/"shapes_000001.png").unlink()
    (tmp_path/"my.ini").write_text(f"[mine]\nextends = shapes\ncorpus = karpathy\ndata_dir = {tmp_path/'d'}\n")
    stopped = run("reproduce", "--settings", str(tmp_path/"my.ini"), "--profile", "mine", "--out", str(tmp_path/"r"))
    assert stopped.returncode == 2 and "image file not found" in stopped.stderr and "--on-error skip" in stopped.stderr


def test_data_shapes_is_byte_identical_per_seed(tmp_path):
    sizes = ["--n-train", "8", "--n-val", "2", "--n-test", "4"]
    for name, seed in [("a", "5"), ("b", "5"), ("c", "6")]:
        out = run("data", "shapes", "--out", str(tmp_path/name), "--seed", seed, *sizes)
        assert out.returncode == 0, out.stderr
        assert Path(out.stdout.strip().splitlines()[-1]).name == "dataset_shapes.json"
    a, b, c = (tree_digest(tmp_path/n) for n in "abc")
    assert a == b
    assert a != c
    data = json.loads((tmp_path/"a"/"dataset_shapes.json").read_text())
    assert [sum(i["split"] == s for i in data["images"]) for s in ("train", "val", "test")] == [8, 2, 4]


TINY = ["--train-steps", "3", "--clip-steps", "3", "--caption-steps", "3",
        "--pretrain-images", "40", "--pretrain-steps", "3", "--pretrain-clip-steps", "3"]  # a tiny pretraining pool (cached)


def test_reproduce_writes_metrics_table_and_models(tmp_path):
    out = run("reproduce", "--profile", "shapes", "--out", str(tmp_path/"run"),
              "--n-train", "30", "--n-val", "2", "--n-test", "10", "--seed", "1", *TINY)
    assert out.returncode == 0, out.stderr
    metrics = json.loads((tmp_path/"run"/"metrics.json").read_text())
    assert metrics["profile"] == "shapes" and metrics["seed"] == 1
    assert metrics["dataset"]["test"] == {"images": 10, "captions": 50}
    assert [(r["method"], r["identifier"], r["variant"]) for r in metrics["runs"]] == [
        ("clip", None, "trained from scratch"), ("grace", "atomic", "full, random init"), ("grace", "structured", "full")]
    assert all(r["pseudo_queries"] > 0 for r in metrics["runs"][1:])  # the captioner's pseudo-queries were trained on
    assert metrics["captioner"]["train_steps"] == 3 and "quality" in metrics["captioner"]
    for r in metrics["runs"]:
        assert all(0.0 <= r[k] <= 100.0 for k in ("R@1", "R@5", "R@10")) and r["R@1"] <= r["R@5"] <= r["R@10"]
        assert r["n_queries"] == 50 and r["train_seconds"] > 0 and r["eval_seconds"] > 0
    kinds = [r["identifier"] for r in metrics["identifiers"]]
    assert kinds == ["numeric", "string", "semantic", "structured", "atomic", "vq"]
    atomic = next(r for r in metrics["identifiers"] if r["identifier"] == "atomic")
    assert (atomic["images"], atomic["mean_tokens"], atomic["trie_identifiers"]) == (42, 1.0, 10)
    table = (tmp_path/"run"/"table1.md").read_text()
    assert "| GRACE | atomic | full, random init |" in table and "68.4" in table and "58.4" in table
    assert "R@1" in out.stdout and "grace" in out.stdout
    for kind in ("atomic", "structured"):
        assert (tmp_path/"run"/f"grace-{kind}"/"model"/"model.safetensors").is_file()
    found = run("retrieve", "--model", str(tmp_path/"run"/"grace-structured"/"model"), "--k", "3", "a big red circle")
    assert found.returncode == 0, found.stderr
    lines = [l for l in found.stdout.splitlines() if l.strip().startswith(("1.", "2.", "3."))]
    assert len(lines) == 3 and all(l.endswith(".png") and "C_" in l for l in lines)


@pytest.mark.parametrize("args, message", [
    (["reproduce", "--profile", "nope"], "valid profiles: shapes, flickr30k, coco"),
    (["reproduce", "--profile", "flickr30k", "--out", "RUN"], "dataset_flickr30k.json"),
    (["reproduce", "--out", "RUN", "--n-train", "4", "--n-val", "0", "--n-test", "0"], "at least one test image"),
    (["data", "shapes", "--out", "RUN", "--n-train", "-5"], "n_train must be a non-negative integer"),
    (["retrieve", "--model", "RUN", "a red circle"], "does not exist"),
    (["profiles", "--settings", "RUN/none.ini"], "settings.ini not found: "),
    (["data", "karpathy-check", "RUN/none.json"], "JSON file not found"),
    (["reproduce", "--out", "RUN", "--identifiers", "atomik"], "cannot train 'atomik' identifiers"),
])
def test_user_errors_are_one_line(tmp_path, args, message):
    out = run(*[a.replace("RUN", str(tmp_path/"r")) for a in args])
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_readme_states_exactly_the_two_commands(repo_root):
    readme = (repo_root/"README.md").read_text()
    commands = re.findall(r"^make (\w+)", readme, re.M)
    assert commands == ["demo", "test"]
    ci = (repo_root/".ci"/"run").read_text()
    assert [l for l in ci.splitlines() if l and not l.startswith("#") and not l.startswith(("set ", "cd "))] == ["exec make test"]


def test_readme_is_generated_from_index(repo_root):
    "README.md is `make readme`'s output: every prose paragraph of nbs/index.ipynb appears in it."
    readme = " ".join((repo_root/"README.md").read_text().split())
    cells = json.loads((repo_root/"nbs"/"index.ipynb").read_text())["cells"]
    prose = [" ".join("".join(c["source"]).split()) for c in cells if c["cell_type"] == "markdown"]
    # make readme points the notebook's pictures (nbs/fig_*.png, shown by name) at nbs/
    prose = [re.sub(r"\]\(([\w.-]+\.(?:png|jpg|svg))\)", r"](nbs/\1)", block) for block in prose]
    for block in prose[1:]:  # the title cell becomes the README's heading
        for paragraph in block.split("## "):
            first_sentence = paragraph.split(". ")[0].strip()
            assert first_sentence in readme, f"README.md is stale (run `make readme`): missing {first_sentence[:60]!r}"


def test_reproduce_is_repeatable_with_the_same_seed(tmp_path):
    args = ["--n-train", "40", "--n-val", "2", "--n-test", "12", "--identifiers", "atomic", *TINY]
    for name, seed in [("a", "3"), ("b", "3"), ("c", "4")]:
        out = run("reproduce", "--out", str(tmp_path/name), "--seed", seed, *args)
        assert out.returncode == 0, out.stderr
    a, b, c = (tree_digest(tmp_path/n/"identifiers") for n in "abc")
    assert len(a) == 6 and a == b
    assert a["numeric.json"] != c["numeric.json"]
    assert tree_digest(tmp_path/"a"/"data") == tree_digest(tmp_path/"b"/"data")
    runs = [json.loads((tmp_path/n/"metrics.json").read_text())["runs"] for n in "ab"]
    recall = lambda rs: [(r["method"], r["R@1"], r["R@5"], r["R@10"]) for r in rs]
    assert recall(runs[0]) == recall(runs[1])
    weights = [tree_digest(tmp_path/n/"grace-atomic"/"model") for n in "ab"]  # config.json names each run's own files
    for name in ("model.safetensors", "trie.safetensors", "identifiers.json"): assert weights[0][name] == weights[1][name]


def test_reproduce_beam_sweep_flag(tmp_path):
    out = run("reproduce", "--out", str(tmp_path/"run"), "--n-train", "20", "--n-val", "0", "--n-test", "6",
              "--identifiers", "structured", "--beams", *TINY)
    assert out.returncode == 0, out.stderr
    sweep = json.loads((tmp_path/"run"/"metrics.json").read_text())["beam_sweep"]
    assert [r["beams"] for r in sweep] == [1, 5, 10, 20] and {r["identifier"] for r in sweep} == {"structured"}
    assert sweep[0]["R@1"] == sweep[0]["R@10"]  # one beam, one identifier
    assert (tmp_path/"run"/"fig6_beams.png").stat().st_size > 10_000 and "Figure 6" in out.stdout
