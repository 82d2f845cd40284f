"""The picture that opens the README and the website: a sample of the shapes corpus, and what a trained GRACE model
retrieves for one test caption. Written from the reference run (`grace reproduce --profile shapes --table1`, seed 42,
run folder runs/shapes-table1) to nbs/fig_front.png and nbs/results/front_example.json:

    .venv/bin/python nbs/results/front_figure.py [RUN_FOLDER]

The model is the GRACE run with the best test R@1 among those that generate identifiers (read from the run's
metrics.json); the query is the first caption of the first test image, whatever the model makes of it.
"""
import json, sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

from grace_nb.core import load_json, quiet, save_json
from grace_nb.data import load_karpathy
from grace_nb.evaluation import load_grace_model

NBS = Path(__file__).resolve().parents[1]
run = Path(sys.argv[1]) if len(sys.argv) > 1 else NBS.parent/"runs"/"shapes-table1"
quiet(progress=False)
metrics = load_json(run/"metrics.json")
rows = [r for r in metrics["runs"] if r["method"] == "grace" and not r.get("head") and "scratch" not in r["variant"]]
best = max(rows, key=lambda r: r["R@1"])
folder = run/(f"grace-{best['identifier']}" + ("-clip" if "clip init" in best["variant"] else ""))
dataset = load_karpathy(run/"data"/"dataset_shapes.json")
test = dataset.split("test")
query, gold = test[0].captions[0], test[0].image_id
model = load_grace_model(folder/"model")
ranked = model.retrieve([query], num_beams=10, num_return=10, length_penalty=1.0, progress=False)[0]
top = ranked.image_ids[:5]

fig = plt.figure(figsize=(12, 4.6))
grid = fig.add_gridspec(4, 12, wspace=0.08, hspace=0.08)
sample = dataset.split("train")[:16]
for i, record in enumerate(sample):
    ax = fig.add_subplot(grid[i // 4, i % 4]); ax.imshow(dataset.load_image(record)); ax.axis("off")
    if i == 1: ax.set_title("the corpus: generated scenes", fontsize=14, loc="left", x=-1.0)
for j, image_id in enumerate(top):
    ax = fig.add_subplot(grid[1:3, 5 + j])
    ax.imshow(dataset.load_image(image_id)); ax.set_xticks([]); ax.set_yticks([])
    hit = image_id == gold
    for side in ax.spines.values(): side.set_color("green" if hit else "grey"); side.set_linewidth(3 if hit else 1)
    ax.set_xlabel(f"#{j + 1}", fontsize=13)
rank = ranked.image_ids.index(gold) + 1 if gold in ranked.image_ids else None
ax = fig.add_subplot(grid[1:3, 11]); ax.imshow(dataset.load_image(gold)); ax.set_xticks([]); ax.set_yticks([])
for side in ax.spines.values(): side.set_color("green"); side.set_linewidth(3)
ax.set_xlabel(f"the caption's image:\nrank {rank}" if rank else "the caption's image:\nnot in the top 10", fontsize=12)
fig.text(0.43, 0.88, f"query: \u201c{query}\u201d", fontsize=14, ha="left", wrap=True)
# the caption in two lines, in a type that stays legible when the page shrinks the figure to its width
fig.text(0.43, 0.1, f"top 5 of GRACE, {best['identifier']} identifiers ({best['variant']}): test R@1 {best['R@1']:.1f}%, "
                    f"R@5 {best['R@5']:.1f}%\ngenerated under the trie, no image index searched", fontsize=13, ha="left")
fig.savefig(NBS/"fig_front.png", dpi=110, bbox_inches="tight")
save_json(dict(run=str(run.relative_to(NBS.parent)) if run.is_relative_to(NBS.parent) else str(run), model=best["identifier"],
               variant=best["variant"], query=query, gold=gold, top5=top, gold_rank=rank,
               R1=best["R@1"], R5=best["R@5"]), NBS/"results"/"front_example.json")
print("wrote", NBS/"fig_front.png", "query:", query, "top5:", top, "gold:", gold)
