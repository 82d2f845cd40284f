"""Robustness: every bad input of issue 6 gives a clear error naming the item and loses nothing; a training process
killed with SIGKILL resumes to the uninterrupted run's weights and metrics; nothing is loaded with pickle.

Each case goes through the public API. "Names the item" means the message holds the file (and the entry index and
file name, or the key); "loses nothing" means the inputs are left unchanged, entries skipped on request are reported
by name, and nothing is half-written."""
import configparser, hashlib, json, os, pickle, re, shutil, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch
from PIL import Image

from grace_nb.backbone import BackboneError, Preset, grow_vocabulary, load_flamingo, tiny_lm_config, write_tiny_preset
from grace_nb.core import GraceError, load_json, save_json
from grace_nb.data import SHAPES_JSON, DataError, load_karpathy, write_shapes_corpus
from grace_nb.evaluation import EvaluationError, load_grace_model, save_grace_model
from grace_nb.identifiers import IdentifierError, build_identifiers, identifier_token_ids, train_bpe_tokenizer
from grace_nb.checkpoints import (DeepSpeedConfigError, _trainable_state, latest_checkpoint, load_checkpoint,
                                  load_deepspeed_config, save_checkpoint)
from grace_nb.training import (PROMPT_TEXTS, BatchFeatures, TrainConfig, TrainingError, cache_features, make_optimizer,
                               memorize_examples, retrieve_examples, train_grace)

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
GRACE = shutil.which("grace", path=str(Path(sys.executable).parent)) or "grace"
N_IMAGES = 10  # the corpus below: 6 train, 0 val, 4 test


def digest(path: Path) -> dict:
    "File -> sha256 of everything under `path` (or of `path` itself): a fingerprint that shows nothing changed."
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_shapes_corpus(tmp_path_factory.mktemp("corpus"), n_train=6, n_val=0, n_test=4, seed=11, progress=False)


@pytest.fixture
def damaged(corpus, tmp_path):
    "A fresh copy of the corpus with `edit(entries)` applied to its JSON and `files(folder)` to its images."
    def make(edit=None, files=None):
        folder = tmp_path/"copy"
        shutil.copytree(corpus.parent, folder)
        if edit is not None:
            data = load_json(folder/SHAPES_JSON); edit(data["images"]); save_json(data, folder/SHAPES_JSON)
        if files is not None: files(folder)
        return folder/SHAPES_JSON
    return make


# --- bad dataset entries and image files ---------------------------------------------------------------------------

def _corrupt_jpeg(folder):
    "Entry 3's image becomes a JPEG whose first 64 bytes are zeros."
    png = folder/"images"/"shapes_000003.png"
    with Image.open(png) as im: im.convert("RGB").save(png, format="JPEG")  # keeps the name, as many datasets do
    data = png.read_bytes(); png.write_bytes(b"\0" * 64 + data[64:])

def _truncate_png(folder):
    png = folder/"images"/"shapes_000003.png"; png.write_bytes(png.read_bytes()[:100])

def _remove_image(folder): (folder/"images"/"shapes_000003.png").unlink()

def _set(key, value): return lambda entries: entries[3].__setitem__(key, value)

# case -> (json edit, file edit, check level, skip reason, message fragment after "entry 3 ('<filename>'): ")
BAD = {
    "corrupted JPEG": (None, _corrupt_jpeg, "decode", "undecodable image", "cannot decode image"),
    "truncated PNG": (None, _truncate_png, "decode", "undecodable image", "cannot decode image"),
    "missing image file": (None, _remove_image, "exists", "missing image", "image file not found"),
    "entry without sentences": (lambda e: e[3].pop("sentences"), None, "exists", "no sentences", "entry has no 'sentences'"),
    "duplicate filename": (_set("filename", "shapes_000001.png"), None, "exists", "duplicate filename",
                           "'images/shapes_000001.png' is also entry 1"),
    "empty caption": (lambda e: e[3]["sentences"][2].update(raw="   "), None, "exists", "empty caption", "sentences[2] is empty"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_entry_is_named_and_skipping_reports_it(damaged, case, capsys):
    edit, files, check, reason, message = BAD[case]
    path = damaged(edit, files)
    before = digest(path.parent)
    filename = load_json(path)["images"][3]["filename"]
    with pytest.raises(DataError) as info: load_karpathy(path, check=check, progress=False)
    text = str(info.value)
    assert str(path) in text and f"entry 3 ({filename!r}): {message}" in text, text
    ds = load_karpathy(path, check=check, on_error="skip", progress=False)  # loses nothing: skipped, named, counted
    assert ds.skipped == {reason: [f"entry 3 ({filename!r})"]} and len(ds) == N_IMAGES - 1
    assert 3 not in {r.image_id for r in ds}
    printed = capsys.readouterr().out
    assert f"skipped 1 of {N_IMAGES} entries" in printed and f"entry 3 ({filename!r})" in printed
    assert digest(path.parent) == before  # the loader never writes to the dataset


@pytest.mark.parametrize("case", ["corrupted JPEG", "truncated PNG", "missing image file"])
def test_bad_image_found_later_is_named_by_the_feature_code(damaged, case):
    "With the cheap default check ('exists'), a bad image surfaces when its features are computed: the file is named."
    _, files, *_ = BAD[case]
    path = damaged(files=files if case != "missing image file" else None)
    ds = load_karpathy(path, progress=False)
    if case == "missing image file": _remove_image(path.parent)
    f = load_flamingo(_tiny_preset(path.parent, ds))
    bad = path.parent/"images"/"shapes_000003.png"
    for features in (lambda: cache_features(f, ds, ds.records, progress=False), lambda: BatchFeatures(f, ds, workers=1)([0, 3])):
        with pytest.raises(DataError, match=re.escape(str(bad))): features()


def _tiny_preset(folder: Path, ds):
    tok = train_bpe_tokenizer([c for r in ds.records for c in r.captions] + list(PROMPT_TEXTS), vocab_size=400)
    return write_tiny_preset(folder/"preset", tok, lm_config=tiny_lm_config(len(tok), d_model=32, n_layers=2, n_heads=2))


def test_cmyk_grayscale_and_alpha_images_load_as_rgb_and_encode(damaged):
    "Odd image modes are not errors: they load as RGB through the dataset and give finite vision features."
    modes = {4: Image.new("CMYK", (64, 64), (0, 255, 255, 0)), 5: Image.new("L", (64, 64), 90),
             6: Image.new("LA", (64, 64), (200, 0)), 7: Image.new("RGBA", (64, 64), (255, 0, 0, 128)),
             8: Image.new("I;16", (64, 64), 40000)}
    def write(folder):  # the CMYK one is a JPEG under a .png name, as mislabelled files in real datasets are
        for i, image in modes.items(): image.save(folder/"images"/f"shapes_{i:06d}.png", format="JPEG" if image.mode == "CMYK" else "PNG")
    path = damaged(files=write)
    ds = load_karpathy(path, check="decode", progress=False)
    assert len(ds) == N_IMAGES and ds.skipped == {}
    assert all(ds.load_image(i).mode == "RGB" and ds.load_image(i).size == (64, 64) for i in modes)
    assert ds.load_image(6).getpixel((0, 0)) == (255, 255, 255)  # fully transparent -> white background
    f = load_flamingo(_tiny_preset(path.parent, ds))
    feats = BatchFeatures(f, ds, workers=1)(list(modes))
    assert feats.shape[0] == len(modes) and torch.isfinite(feats).all()


def test_non_ascii_captions_survive_loading_and_tokenization(damaged):
    captions = ["un cœur rouge à gauche", "赤いハート", "ein großer Stern ★", "مربع أزرق", "😀 a smiling square"]
    def edit(entries):
        for sentence, caption in zip(entries[1]["sentences"], captions): sentence["raw"] = caption
    ds = load_karpathy(damaged(edit), progress=False)
    assert ds.by_id(1).captions == captions
    tok = train_bpe_tokenizer(["a red circle"] + list(PROMPT_TEXTS), vocab_size=300)  # never saw these scripts
    imap = build_identifiers("atomic", [r.image_id for r in ds.records])
    from grace_nb.identifiers import add_identifier_tokens
    add_identifier_tokens(tok, imap)
    examples = retrieve_examples(tok, identifier_token_ids(imap, tok), [(c, 1) for c in captions])
    assert [c in tok.decode(e.prompt_ids) for c, e in zip(captions, examples)] == [True] * len(captions)  # byte-level BPE


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    "A tiny Flamingo with atomic identifiers, its examples and a saved model folder."
    tmp = tmp_path_factory.mktemp("model")
    ds = load_karpathy(corpus, progress=False)
    preset = _tiny_preset(tmp, ds)
    imap = build_identifiers("atomic", [r.image_id for r in ds.records])
    def fresh():
        f = load_flamingo(preset); grow_vocabulary(f, imap); return f
    f = fresh()
    ids = identifier_token_ids(imap, f.tokenizer)
    folder = save_grace_model(tmp/"model", f, imap, [r.image_id for r in ds.split("test")])
    return dict(tmp=tmp, ds=ds, imap=imap, fresh=fresh, ids=ids, folder=folder,
                mem=memorize_examples(f.tokenizer, ids, [r.image_id for r in ds.records]),
                ret=retrieve_examples(f.tokenizer, ids, ds.queries("train")))


def test_10000_character_caption_loads_intact_and_training_names_it(damaged, trained, tmp_path):
    long = ("a big red circle in the top left corner next to a small blue star " * 160)[:10_000]
    ds = load_karpathy(damaged(lambda e: e[2]["sentences"][0].update(raw=long)), progress=False)
    assert ds.by_id(2).captions[0] == long  # the loader keeps it: it is text, not damage
    f = trained["fresh"]()
    ret = retrieve_examples(f.tokenizer, trained["ids"], ds.queries("train"))
    weights = {k: v.clone() for k, v in _trainable_state(f.model).items()}
    with pytest.raises(TrainingError) as info:
        train_grace(f, [], ret, None, TrainConfig(train_steps=2), out=tmp_path/"run", progress=False)
    text = str(info.value)
    assert "retrieve query of image 2" in text and "a big red circle" in text and "more than the language model's 256" in text
    assert not (tmp_path/"run").exists()  # refused before anything was written or trained
    assert all(torch.equal(v, _trainable_state(f.model)[k]) for k, v in weights.items())


def test_10000_character_query_at_retrieval_is_named(trained):
    from grace_nb.inference import retrieve
    with pytest.raises(GraceError, match="query 1"):
        retrieve(trained["fresh"](), ["a red circle", "a red circle " * 770], trained["ids"], progress=False)


# --- identifiers, model folders, DeepSpeed configs ---------------------------------------------------------------

def test_identifier_map_that_does_not_match_the_tokenizer(trained, tmp_path):
    plain = train_bpe_tokenizer(["a red circle"] + list(PROMPT_TEXTS), vocab_size=300)  # no I_n tokens added
    with pytest.raises(IdentifierError, match=r"lacks 10 tokens of this atomic map, e\.g\. 'I_0'"):
        identifier_token_ids(trained["imap"], plain)
    dest = tmp_path/"other-map"; shutil.copytree(trained["folder"], dest)
    build_identifiers("atomic", [100 + r.image_id for r in trained["ds"].records]).save(dest/"identifiers.json")
    before = digest(dest)
    with pytest.raises(EvaluationError) as info: load_grace_model(dest)
    assert str(dest/"identifiers.json") in str(info.value) and "'I_100'" in str(info.value)
    assert digest(dest) == before


MODEL_PARTS = ["preset", "tokenizer", "identifiers.json", "trie.safetensors", "model.safetensors", "config.json",
               "preset/preset.json", "preset/lm/config.json", "preset/lm/model.safetensors", "tokenizer/tokenizer.json",
               "preset/clip/grace-tiny-clip.json"]


@pytest.mark.parametrize("part", MODEL_PARTS)
def test_model_folder_missing_a_file_is_refused_naming_it(trained, tmp_path, part):
    dest = tmp_path/"m"; shutil.copytree(trained["folder"], dest)
    shutil.rmtree(dest/part) if (dest/part).is_dir() else (dest/part).unlink()
    before = digest(dest)
    with pytest.raises(GraceError) as info: load_grace_model(dest)
    assert isinstance(info.value, (EvaluationError, BackboneError))
    name = Path(part).name if "/" not in part else str(Path(part).parent)
    assert name in str(info.value) and str(dest) in str(info.value), str(info.value)
    assert digest(dest) == before


def test_failed_save_keeps_the_previous_model_folder(trained, monkeypatch):
    "A save that fails half-way (disk full, a kill) leaves the old folder whole and no temporary folder behind."
    import grace_nb.evaluation as evaluation
    before = digest(trained["folder"])
    real = evaluation.save_file
    def failing(tensors, path, *a, **k):
        if path.endswith("model.safetensors"): raise OSError(28, "No space left on device")
        return real(tensors, path, *a, **k)
    monkeypatch.setattr(evaluation, "save_file", failing)
    with pytest.raises(OSError): save_grace_model(trained["folder"], trained["fresh"](), trained["imap"], [6, 7])
    assert digest(trained["folder"]) == before
    assert sorted(p.name for p in trained["folder"].parent.iterdir() if p.name.startswith(".")) == []


def test_failed_checkpoint_keeps_the_previous_one(trained, tmp_path, monkeypatch):
    import grace_nb.checkpoints as checkpoints
    f = trained["fresh"](); opt = make_optimizer(f.model, 1e-3, 0.1)
    save_checkpoint(tmp_path/"ck"/"step_000001", f.model, opt, 1, [])
    monkeypatch.setattr(checkpoints, "save_json", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError): save_checkpoint(tmp_path/"ck"/"step_000002", f.model, opt, 2, [])
    assert latest_checkpoint(tmp_path/"ck").name == "step_000001"
    assert sorted(p.name for p in (tmp_path/"ck").iterdir()) == ["step_000001"]
    assert load_checkpoint(tmp_path/"ck"/"step_000001", trained["fresh"]().model)["step"] == 1


@pytest.mark.parametrize("config, key", [
    ({"train_micro_batch_size_per_gpu": 1, "zero_optimisation": {"stage": 2}}, "zero_optimisation"),
    ({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2, "overlap_comms": True}}, "zero_optimization.overlap_comms"),
    ({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "reduce_bucket_size": "big"}},
     "zero_optimization.reduce_bucket_size"),
    ({"train_micro_batch_size_per_gpu": 1, "bf16": {"enable": True}}, "bf16.enable"),
    ({"train_micro_batch_size_per_gpu": 1, "fp16": True}, "fp16 must be a JSON object"),
    ({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 4}}, "zero_optimization.stage must be 0-3"),
])
def test_deepspeed_config_with_a_bad_key_is_named_before_any_work(trained, tmp_path, config, key):
    path = tmp_path/"ds.json"; save_json(config, path)
    with pytest.raises(DeepSpeedConfigError) as info: load_deepspeed_config(path)
    assert str(path) in str(info.value) and key in str(info.value), str(info.value)
    f = trained["fresh"](); weights = {k: v.clone() for k, v in _trainable_state(f.model).items()}
    with pytest.raises(DeepSpeedConfigError, match=re.escape(key)):
        train_grace(f, [], trained["ret"], None, TrainConfig(train_steps=2, deepspeed_config=str(path)), out=tmp_path/"run",
                    progress=False)
    assert not (tmp_path/"run").exists()
    assert all(torch.equal(v, _trainable_state(f.model)[k]) for k, v in weights.items())


def test_shipped_deepspeed_configs_pass_the_check():
    for path in sorted((ROOT/"configs"/"deepspeed").glob("*.json")): load_deepspeed_config(path)


# --- a training process killed with SIGKILL -------------------------------------------------------------------------

def _small_settings(folder: Path) -> Path:
    """The repository's settings.ini with the shapes profile checkpointing every 10 steps, smaller batches, no captioner.

    `grace reproduce` has no --checkpoint-every flag; settings.ini is found through GRACE_SETTINGS first, so a copy
    with two changed keys is how a subprocess gets a shorter checkpoint interval."""
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(ROOT/"settings.ini", encoding="utf-8")
    cfg["shapes"].update(checkpoint_every="10", memorize_batch_size="8", retrieve_batch_size="16", warmup_steps="5",
                         pseudo_queries="0")  # no captioner: it would triple the test's time and is not what is tested
    with open(folder/"settings.ini", "w", encoding="utf-8") as f: cfg.write(f)
    return folder/"settings.ini"


def test_sigkilled_training_resumes_to_the_same_weights_and_metrics(tmp_path):
    env = os.environ | {"GRACE_SETTINGS": str(_small_settings(tmp_path)), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = ["reproduce", "--profile", "shapes", "--n-train", "30", "--n-val", "2", "--n-test", "20", "--seed", "5",
            "--train-steps", "30", "--clip-steps", "3", "--identifiers", "atomic",
            "--pretrain-images", "40", "--pretrain-steps", "3", "--pretrain-clip-steps", "3"]
    whole = subprocess.run([GRACE, *args, "--out", str(tmp_path/"whole")], env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]

    run = tmp_path/"killed"; checkpoints = run/"grace-atomic"/"checkpoints"
    proc = subprocess.Popen([GRACE, *args, "--out", str(run)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (checkpoints/"step_000010"/"state.json").is_file():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    fingerprint = lambda p: ((p/"state.json").stat().st_ino, (p/"model.safetensors").stat().st_ino)  # new files get new inodes
    done = {p.name: fingerprint(p) for p in checkpoints.glob("step_*") if (p/"state.json").is_file()}
    assert "step_000030" not in done and not (run/"metrics.json").exists()  # killed mid-run

    again = subprocess.run([GRACE, *args, "--out", str(run), "--resume"], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    for name, files in done.items():  # the resumed run continued from them instead of redoing their steps
        assert fingerprint(checkpoints/name) == files
    assert (checkpoints/"step_000030"/"state.json").is_file()
    model = lambda folder: (folder/"grace-atomic"/"model"/"model.safetensors").read_bytes()
    assert model(run) == model(tmp_path/"whole")  # exact: same data order, schedule, optimizer state, fp32 on one thread
    recall = lambda folder: [(r["method"], r["R@1"], r["R@5"], r["R@10"]) for r in json.loads((folder/"metrics.json").read_text())["runs"]]
    assert recall(run) == recall(tmp_path/"whole")


# --- no pickle ---------------------------------------------------------------------------------------------------------

def test_library_source_has_no_pickle_loading():
    "The only torch.load reads a third-party OpenFlamingo checkpoint.pt, with weights_only=True (tensors only)."
    offenders = []
    for py in sorted((ROOT/"grace_nb").glob("*.py")):
        for n, line in enumerate(py.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"\b(pickle|cPickle|dill|joblib|cloudpickle|shelve)\b|torch\.save\(|allow_pickle\s*=\s*True", code) or \
               ("torch.load(" in code and "weights_only=True" not in code):
                offenders.append(f"{py.name}:{n}: {line.strip()}")
    assert offenders == []


def test_round_trips_never_unpickle(trained, tmp_path, monkeypatch):
    "Save and load every kind of file grace_nb writes with pickle and torch.load made to fail."
    def refuse(*a, **k): raise AssertionError("pickle was used")
    for name in ("load", "loads", "Unpickler"): monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    from grace_nb.clip import load_clip, save_clip, train_clip
    from grace_nb.identifiers import IdentifierMap
    ds = trained["ds"]
    clip = train_clip(ds, steps=1, batch_size=4, progress=False)
    save_clip(clip, tmp_path/"clip.safetensors"); load_clip(tmp_path/"clip.safetensors")
    trained["imap"].save(tmp_path/"ids.json"); assert IdentifierMap.load(tmp_path/"ids.json") == trained["imap"]
    f = trained["fresh"]()
    result = train_grace(f, trained["mem"], trained["ret"], cache_features(f, ds, ds.records, progress=False),
                         TrainConfig(train_steps=2, memorize_batch_size=2, retrieve_batch_size=2, warmup_steps=1,
                                     checkpoint_every=1), out=tmp_path/"run", progress=False)
    assert result.steps == 2
    g = trained["fresh"]()
    load_checkpoint(latest_checkpoint(tmp_path/"run"/"checkpoints"), g.model, make_optimizer(g.model, 1e-3, 0.1))
    save_grace_model(tmp_path/"model", f, trained["imap"], [r.image_id for r in ds.split("test")])
    assert load_grace_model(tmp_path/"model").kind == "atomic"
