"""The pretraining pool on a second distribution (issue: your own photos): the landscapes corpus of 01a_landscapes run
through README's own-dataset recipe, once pretrained on its own train split (the default for a Karpathy corpus) and
once on the shapes pool. Writes nbs/results/pool_study.json.

    python nbs/results/pool_study.py setup            # corpus, settings.ini, the image-size measurement
    python nbs/results/pool_study.py run landscapes   # one reproduce run per profile (both may run at once,
    python nbs/results/pool_study.py run landscapes-shapes-pool   #   one thread each)
    python nbs/results/pool_study.py collect          # nbs/results/pool_study.json; then remove runs/pool-study
"""
import json, subprocess, sys, time
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from grace_nb.clip import evaluate_clip, train_clip
from grace_nb.backbone import Preset, tiny_clip_config
from grace_nb.core import load_json, save_json, seed_everything
from grace_nb.data import load_karpathy
from grace_nb.landscapes import write_landscapes_corpus

ROOT = Path(__file__).resolve().parents[2]
WORK, OUT = ROOT/"runs"/"pool-study", ROOT/"nbs"/"results"/"pool_study.json"
SIZES = [(64, 8), (96, 12), (128, 16)]  # the ViT grid stays 8 x 8: only the pixels per patch change
PROFILES = """[landscapes]
extends = shapes
corpus = karpathy
data_dir = data
dataset_json = ${{data_dir}}/dataset_landscapes.json
image_size = {image_size}
patch_size = {patch_size}

[landscapes-shapes-pool]
extends = landscapes
pretrain_pool = shapes
"""

def setup():
    json_path = write_landscapes_corpus(WORK/"data", n_train=400, n_val=50, n_test=200, seed=42, progress=False)
    corpus = load_karpathy(json_path, progress=False)
    sizes = []
    for image_size, patch_size in SIZES:  # CLIP on the train split, Recall@K on the val split
        run = train_clip(corpus, steps=300, batch_size=64, lr=5e-4, seed=42, progress=False,
                         config=tiny_clip_config(image_size, patch_size))
        metrics = evaluate_clip(run, corpus, "val", progress=False)
        sizes.append(dict(image_size=image_size, patch_size=patch_size, train_seconds=round(run.train_seconds, 1),
                          **{k: round(metrics[k], 2) for k in ("R@1", "R@5", "R@10")}))
        print(sizes[-1], flush=True)
    best = max(sizes, key=lambda s: (s["R@1"], -s["image_size"]))
    (WORK/"settings.ini").write_text(PROFILES.format(image_size=best["image_size"], patch_size=best["patch_size"]))
    save_json(dict(sizes=sizes, chosen=best), WORK/"sizes.json")

def run(profile:str):
    start = time.perf_counter()
    subprocess.run([str(ROOT/".venv"/"bin"/"grace"), "reproduce", "--profile", profile, "--out", profile],
                   cwd=WORK, check=True)
    save_json(dict(seconds=round(time.perf_counter() - start, 1)), WORK/profile/"wall.json")

def _tokens_per_caption(preset:Preset, captions:list[str]) -> dict:
    tok = AutoTokenizer.from_pretrained(str(preset.resolve(preset.tokenizer_path)))
    lengths = [len(tok(" " + c)["input_ids"]) for c in captions]
    words = [len(c.split()) for c in captions]
    return dict(mean=round(float(np.mean(lengths)), 2), per_word=round(float(np.sum(lengths) / np.sum(words)), 3),
                longest=int(max(lengths)), vocabulary=len(tok))

def collect():
    corpus = load_karpathy(WORK/"data"/"dataset_landscapes.json", progress=False)
    captions = [c for r in corpus.records for c in r.captions]
    rows = []
    for profile in ("landscapes", "landscapes-shapes-pool"):
        m = load_json(WORK/profile/"metrics.json")
        preset = Preset.load(m["backbone"]["preset"])
        pre = load_json(preset.root/"pretraining.json")
        gen = load_json(WORK/profile/"captioner"/"captions.json")["captions"]
        shown = [dict(gold=corpus.by_id(int(i)).captions[0], generated=c[0]) for i, c in list(gen.items())[:4]]
        rows.append(dict(profile=profile, pool=m["backbone"]["pretraining_pool"], tokens=_tokens_per_caption(preset, captions),
                         pretraining_final=pre["history"][-1], heldout_captions=list(pre["heldout_captions"].values())[:4],
                         captioner=m["captioner"], test_captions=shown, runs=m["runs"],
                         seconds=load_json(WORK/profile/"wall.json")["seconds"]))
    save_json(dict(corpus=corpus.summary(), sizes=load_json(WORK/"sizes.json"), rows=rows), OUT)
    print(f"wrote {OUT}")

if __name__ == "__main__":
    seed_everything(0)
    {"setup": setup, "run": lambda: run(sys.argv[2]), "collect": collect}[sys.argv[1]]()
