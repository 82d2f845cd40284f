"""The memorization study of 08a_memorization: top-1 memorization of train and test images against memorize passes per
image and against other levers, for numeric, string, structured and atomic identifiers, on a small shapes corpus
(150 train / 50 test images, seed 42) trained from the `[shapes]` profile's pretrained preset.

    python nbs/results/memorization_study.py setup            # corpus, CLIP, identifiers, features (once)
    OMP_NUM_THREADS=1 python nbs/results/memorization_study.py run 0 2 &   # the cells, split over two processes
    OMP_NUM_THREADS=1 python nbs/results/memorization_study.py run 1 2 &
    python nbs/results/memorization_study.py collect          # writes nbs/results/memorization_study.json

Every cell is a `grace_stage` run in runs/memorization-study/ (resumable: a finished cell is read back from its
row.json). The runs folder can be deleted after `collect`."""
import logging, sys, time
from pathlib import Path
logging.disable(logging.WARNING)
import numpy as np
from grace_nb.core import load_profile, load_json, save_json
from grace_nb.backbone import load_flamingo
from grace_nb.pretraining import scratch_preset
from grace_nb.memorization import plot_budget_contrast, plot_study, position_accuracy, steps_for_passes, study_cells
from grace_nb.evaluation import load_grace_model
from grace_nb.pipeline import plan_job, pretrain_stage, identifier_stage, clip_stage, image_embedding_table, grace_stage

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT/"runs/memorization-study"
SIZES = dict(n_train=150, n_val=0, n_test=50)
KINDS = ["numeric", "string", "structured", "atomic"]

def profile():
    "The shapes profile, restricted to the study's identifier types; every memorized image is checked."
    prof = load_profile("shapes")
    # the study's own step: 32 memorize + 96 retrieve examples (the paper's 1 : 3), warm-up 50 of 640 steps' share
    return prof.replace(identifier_types=" ".join(KINDS), memorization_sample=None, pseudo_queries=0,
                        memorize_batch_size=32, retrieve_batch_size=96, train_steps=640, warmup_steps=50, lr=1e-3)

def backbone(prof, cell:dict|None, dataset, job, cache:dict):
    """The cell's preset and the frozen features of its vision encoder: the profile's pretrained preset (the lever's keys
    changed; an architecture lever pretrains its own, cached), or its from-scratch twin."""
    changed = prof.replace(**(cell or {}).get("profile", {}))
    # the tutorial corpus's pretrained preset: its pool excludes the [shapes] corpus's scenes, of which these are the first
    full = sum(int(load_profile("shapes")[k]) for k in ("n_train", "n_val", "n_test"))
    preset = pretrain_stage(changed, corpus_seed=job.seed, corpus_images=full, progress=False)
    if cell and cell["backbone"] == "scratch": preset = scratch_preset(preset, OUT/"preset-scratch")
    if preset.root not in cache: cache[preset.root] = (preset, job.vision_features(load_flamingo(preset), dataset, lap=None))
    return cache[preset.root]

def setup(prof, cells=()):
    "Corpus, CLIP embeddings, identifiers, and the presets of `cells` (saved or cached, so every worker reads the same)."
    job = plan_job(prof, out=OUT, identifiers=["atomic"], verbose=False, resume=True, **SIZES)
    dataset = job.corpus()
    clip_run, _ = clip_stage(prof, dataset, OUT, job.seed, resume=True, progress=False)
    clip_table = image_embedding_table(clip_run, dataset, progress=False)
    embeddings = np.stack([clip_table[r.image_id] for r in dataset.records])
    maps = identifier_stage(dataset, prof, embeddings, OUT, seed=job.seed, progress=False)
    cache = {}
    for cell in cells: backbone(prof, cell, dataset, job, cache)  # builds and caches each lever's preset once
    return job, dataset, clip_table, maps

def run(worker:int, workers:int):
    prof = profile()
    job, dataset, clip_table, maps = setup(prof)
    cache = {}
    memorized = len(dataset.split("train")) + len(dataset.split("test"))
    for i, cell in enumerate(study_cells(KINDS)):
        if i % workers != worker: continue
        steps = steps_for_passes(cell["passes"], memorized, int(prof.memorize_batch_size))
        warmup = max(1, round(steps * prof.warmup_steps / prof.train_steps))  # the profile's warm-up share
        changed = prof.replace(warmup_steps=warmup, **cell["profile"])
        start = time.perf_counter()
        preset, features = backbone(prof, cell, dataset, job, cache)
        row = grace_stage(cell["kind"], changed, preset, dataset, maps[cell["kind"]], features, OUT, job.seed,
                          clip_table, train_steps=steps, resume=True, progress=False, variant=cell["lever"], name=cell["name"])
        print(f"{cell['name']}: {steps} steps, memorized {row['memorization']['train']['top1']} / "
              f"{row['memorization']['test']['top1']}, R@1 {row['R@1']}, {time.perf_counter() - start:.0f} s", flush=True)

def collect():
    prof = profile()
    job, dataset, _, _ = setup(prof)
    _, features = backbone(prof, None, dataset, job, {})  # the profile's preset: every "profile" run's vision encoder
    memorized = [r.image_id for r in dataset.records if r.split in ("train", "test")]
    rows = []
    for cell in study_cells(KINDS):
        path = OUT/f"grace-{cell['name']}"/"row.json"
        if not path.is_file(): print("missing", cell["name"]); continue
        row = load_json(path)
        mem = row["memorization"]
        rows.append(dict(identifier=cell["kind"], lever=cell["lever"], passes=cell["passes"], steps=row["train_steps"],
                         memorize_passes=row["budget"]["memorize_passes"], retrieve_epochs=row["budget"]["retrieve_epochs"],
                         memorized_train=mem["train"]["top1"], memorized_test=mem["test"]["top1"],
                         memorized_train_top10=mem["train"]["top10"], memorized_test_top10=mem["test"]["top10"],
                         **{k: row[k] for k in ("R@1", "R@5", "R@10")}, collapsed=row["collapse"]["collapsed"],
                         final_loss=row["final_loss"], train_seconds=row["train_seconds"]))
        if cell["lever"] == "profile":  # teacher-forced accuracy of each identifier token (08a's position_accuracy)
            model = load_grace_model(OUT/f"grace-{cell['name']}"/"model")
            rows[-1]["token_accuracy"] = position_accuracy(model, features, memorized)
    save_json(dict(rows=rows, corpus=SIZES | dict(seed=prof.seed, memorized_images=SIZES["n_train"] + SIZES["n_test"]),
                   profile="shapes", memorize_batch_size=int(prof.memorize_batch_size),
                   retrieve_batch_size=int(prof.retrieve_batch_size), lr=float(prof.lr),
                   source="python nbs/results/memorization_study.py setup / run / collect"),
              ROOT/"nbs/results/memorization_study.json")
    import matplotlib; matplotlib.use("Agg")  # the figures README and index show
    plot_study(rows, ROOT/"nbs/fig_memorization.png"); plot_budget_contrast(rows, ROOT/"nbs/fig_budget_contrast.png")
    print(len(rows), "rows")

if __name__ == "__main__":
    what = sys.argv[1]
    if what == "setup": setup(profile(), study_cells(KINDS))
    elif what == "run": run(int(sys.argv[2]), int(sys.argv[3]))
    elif what == "collect": collect()
