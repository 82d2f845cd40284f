"""Assemble `shapes_seed42.json` from the reference runs' metrics files, so that no number in README or the notebooks is
typed by hand. The runs (seed 42, the `[shapes]` profile) and the commands that made them:

- `runs/shapes-table1`: `grace reproduce --profile shapes --out runs/shapes-table1 --table1 --length-penalties`
  (Table 1 with the classifier-head and from-scratch rows, and the length-penalty sweep on the validation split);
- `runs/shapes-t2`: `grace reproduce --profile shapes --out runs/shapes-t2 --ablations --beams --resume`, its data,
  CLIP, captioner, identifiers and main-job runs linked from `runs/shapes-table1` (Table 2 for the main job's
  identifier types, and Figure 6, whose image is copied to nbs/fig6_beams.png);
- `nbs/results/efficiency_tiny_cpu.json`: Figure 4 at the profile's `efficiency_sizes` with the tiny backbone, the run
  10c_figure4 made (what `--efficiency` measures; its image is nbs/fig4_efficiency.png).

The training budget is studied in 08a_memorization (`nbs/results/memorization_study.json`), not here.

Run from the repository root: `python nbs/results/assemble_shapes_seed42.py` (it loads the cached pretrained preset
for the distinctness numbers). `python nbs/results/assemble_shapes_seed42.py --efficiency` rewrites only the Figure 4
entry from `nbs/results/efficiency_tiny_cpu.json` (after 10c_figure4's slow cells ran again), without the runs."""
import json, logging, shutil, sys
from pathlib import Path
logging.disable(logging.WARNING)
from grace_nb.core import load_json, save_json, load_profile
from grace_nb.data import load_karpathy
from grace_nb.backbone import load_flamingo, Preset
from grace_nb.training import cache_features
from grace_nb.experiments import caption_quality
from grace_nb.pipeline import vision_distinctness, pretrain_stage, plot_length_penalty, _efficiency_summary
from grace_nb.figure4 import EfficiencyRun
from grace_nb.evaluation import load_grace_model
from grace_nb.memorization import position_accuracy

ROOT = Path(__file__).resolve().parents[2]

def efficiency_entry() -> dict:
    "shapes_seed42.json's Figure 4 entry, as --efficiency writes it, from 10c_figure4's run."
    figure4 = EfficiencyRun(**load_json(ROOT/"nbs/results/efficiency_tiny_cpu.json"))
    return dict(summary=_efficiency_summary(figure4), rows=figure4.rows, settings=figure4.settings,
                source="nbs/results/efficiency_tiny_cpu.json")

if "--efficiency" in sys.argv:
    results = load_json(ROOT/"nbs/results/shapes_seed42.json")
    save_json(results | dict(efficiency=efficiency_entry()), ROOT/"nbs/results/shapes_seed42.json")
    print(json.dumps(results["efficiency"]["summary"], indent=1), "->", json.dumps(efficiency_entry()["summary"], indent=1))
    sys.exit()

table1 = load_json(ROOT/"runs/shapes-table1/metrics.json")
t2 = load_json(ROOT/"runs/shapes-t2/metrics.json") if (ROOT/"runs/shapes-t2/metrics.json").is_file() else {}

strip = lambda row: {k: v for k, v in row.items() if k not in ("model",)}
prof = load_profile("shapes")
preset = pretrain_stage(prof, progress=False)
report = load_json(preset.root/"pretraining.json")
ds = load_karpathy(ROOT/"runs/shapes-table1/data/dataset_shapes.json", progress=False)
base = load_flamingo(preset)
feats = cache_features(base, ds, [r for r in ds.records if r.split in ("train", "test")], progress=False)
scratch = load_flamingo(Preset.load(ROOT/"runs/shapes-table1/preset-scratch"))
# the captioner's scores, by today's caption_quality (01_data's caption parser) on the run's captions and gold captions
captions = {int(k): v for k, v in load_json(ROOT/"runs/shapes-table1/captioner/captions.json")["captions"].items()}
scores = dict(quality=caption_quality(captions, ds), gold_reference=caption_quality({r.image_id: r.captions for r in ds.split("test")}, ds, top=None))
gold = [len(ids) + 1 for ids in base.tokenizer([c for r in ds.split("train") for c in r.captions], add_special_tokens=False).input_ids]
# teacher-forced accuracy of each identifier token (08a's position_accuracy) of the pretrained Table 1 models, over
# every memorized (train and test) image: which token stops a type that does not memorize
memorized = [r.image_id for r in ds.records if r.split in ("train", "test")]
token_accuracy = {r["identifier"]: position_accuracy(load_grace_model(ROOT/r["model"]), feats, memorized)
                  for r in table1["runs"] if r["method"] == "grace" and r.get("variant") in ("full", "full, random init")}
out = dict(
    source="grace reproduce --profile shapes --table1 --length-penalties, and --ablations --beams (the main job's types), "
           "seed 42; Figure 4 from 10c_figure4's run",
    profile=table1["profile"], seed=table1["seed"], dataset=table1["dataset"], ceiling=table1["ceiling"],
    runs=[strip(r) for r in table1["runs"]], identifiers=table1["identifiers"],
    captioner=table1["captioner"] | scores | dict(longest_gold_tokens=max(gold), max_new_tokens=32, length_penalty=1.0),
    length_penalty=table1.get("length_penalty"),
    table2=[strip(r) for r in t2.get("table2") or []] or None, beam_sweep=t2.get("beam_sweep"),
    efficiency=efficiency_entry(),
    token_accuracy=token_accuracy,
    vision_distinctness={"pretrained": vision_distinctness(base, feats), "scratch": vision_distinctness(scratch, feats)},
    pretraining=dict(config=report["config"], seconds=report["seconds"], final=report["history"][-1],
                     clip_final_loss=report["clip_history"][-1]["loss"], heldout_captions=report["heldout_captions"]),
    # wall times of the two runs (one after the other, two threads each; tests and notebook runs shared the CPU at times)
    seconds=dict(table1_run=table1["seconds"], ablations_beams_run=t2.get("seconds")),
    stage_seconds=dict(table1_run=table1.get("stage_seconds"), ablations_beams_run=t2.get("stage_seconds")))
save_json(out, ROOT/"nbs/results/shapes_seed42.json")
import matplotlib; matplotlib.use("Agg")
if out["length_penalty"]:
    plot_length_penalty(out["length_penalty"]["rows"], ROOT/"nbs/fig_length_penalty.png",
                        title="Length penalty on the validation split (shapes, seed 42)")
if (ROOT/"runs/shapes-t2/fig6_beams.png").is_file():  # drawn by the run itself
    shutil.copyfile(ROOT/"runs/shapes-t2/fig6_beams.png", ROOT/"nbs/fig6_beams.png")
print(json.dumps({k: out[k] for k in ("ceiling", "vision_distinctness", "seconds")}, indent=1))
