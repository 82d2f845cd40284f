"Cross-cutting and robustness tests of `grace_nb.data`: determinism, round trips, every validation error, odd images."
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from grace_nb.core import GraceError, load_json, save_json
from grace_nb.data import (SHAPES_JSON, DataError, KarpathyDataset, check_karpathy, load_karpathy, read_rgb, to_rgb,
                           write_shapes_corpus)

SIZES = dict(n_train=12, n_val=2, n_test=4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    "A tiny shapes corpus shared by the read-only tests."
    return write_shapes_corpus(tmp_path_factory.mktemp("shapes"), **SIZES, seed=0, progress=False)


@pytest.fixture
def copy_corpus(corpus, tmp_path):
    "Copy the tiny corpus to a fresh folder, optionally editing its entries; returns the copy's JSON path."
    def make(edit=None, name="copy"):
        folder = tmp_path / name
        shutil.copytree(corpus.parent, folder)
        if edit is not None:
            data = load_json(folder / SHAPES_JSON)
            edit(data["images"])
            save_json(data, folder / SHAPES_JSON)
        return folder / SHAPES_JSON
    return make


def _all_bytes(json_path: Path) -> dict:
    folder = json_path.parent
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- the shapes generator ---------------------------------------------------------------------------------

def test_same_seed_gives_byte_identical_corpus(corpus, tmp_path):
    again = write_shapes_corpus(tmp_path / "again", **SIZES, seed=0, progress=False)
    assert _all_bytes(again) == _all_bytes(corpus)


def test_other_seed_gives_other_corpus(corpus, tmp_path):
    other = write_shapes_corpus(tmp_path / "other", **SIZES, seed=1, progress=False)
    a, b = _all_bytes(corpus), _all_bytes(other)
    assert a.keys() == b.keys()
    assert a[SHAPES_JSON] != b[SHAPES_JSON]
    assert sum(a[k] != b[k] for k in a if k.endswith(".png")) >= 15


def test_corpus_schema_and_unique_scenes(corpus):
    data = load_json(corpus)
    assert data["dataset"] == "shapes"
    images = data["images"]
    assert [e["split"] for e in images] == ["train"] * 12 + ["val"] * 2 + ["test"] * 4
    assert [e["imgid"] for e in images] == list(range(18))
    for e in images:
        assert e["filepath"] == "images" and e["filename"] == f"shapes_{e['imgid']:06d}.png"
        assert len(e["sentences"]) == 5 and len({s["raw"] for s in e["sentences"]}) == 5
        assert e["sentids"] == [s["sentid"] for s in e["sentences"]]
        for s in e["sentences"]:
            assert s["imgid"] == e["imgid"] and s["tokens"] == s["raw"].lower().replace(",", " ").replace(":", " ").split()
        objects = e["scene"]["objects"]
        assert 1 <= len(objects) <= 3 and len({(o["row"], o["col"]) for o in objects}) == len(objects)
    scenes = {json.dumps(e["scene"], sort_keys=True) for e in images}
    assert len(scenes) == len(images)
    with Image.open(corpus.parent / "images" / "shapes_000000.png") as img:
        assert img.size == (64, 64) and img.mode == "RGB"


def test_image_size_and_captions_are_configurable(tmp_path):
    path = write_shapes_corpus(tmp_path, n_train=3, n_val=0, n_test=1, image_size=32, n_captions=2, progress=False)
    ds = load_karpathy(path, check="decode")
    assert ds.summary() == {"train": {"images": 3, "captions": 6}, "test": {"images": 1, "captions": 2},
                            "total": {"images": 4, "captions": 8}}
    assert ds.load_image(0).size == (32, 32)


@pytest.mark.parametrize("kwargs, message", [(dict(n_train=-1), "n_train must be a non-negative integer"),
                                             (dict(n_train=0, n_val=0, n_test=0), "at least one image"),
                                             (dict(image_size=8), "image_size must be at least 16"),
                                             (dict(n_captions=0), "n_captions must be between 1 and 8"),
                                             (dict(seed=1.5), "seed must be a non-negative integer")])
def test_generator_rejects_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(DataError, match=message):
        write_shapes_corpus(tmp_path, **{**SIZES, **kwargs}, progress=False)


# --- the loader ---------------------------------------------------------------------------------------------

def test_round_trip(corpus):
    data, ds = load_json(corpus), load_karpathy(corpus, check="decode")
    assert isinstance(ds, KarpathyDataset) and len(ds) == 18 and ds.name == "shapes"
    for entry, record in zip(data["images"], ds.records):
        assert record.image_id == entry["imgid"] and record.split == entry["split"]
        assert record.path == corpus.parent / "images" / entry["filename"]
        assert record.captions == [s["raw"] for s in entry["sentences"]]
        assert record.scene == entry["scene"] and record.extra == {"sentids": entry["sentids"]}
    assert [r.image_id for r in ds.split("val")] == [12, 13]
    assert ds.by_id(15).split == "test"
    queries = ds.queries("test")
    assert len(queries) == 20 and queries[0] == (ds.by_id(14).captions[0], 14)
    img = ds.load_image(ds.by_id(3))
    assert img.mode == "RGB" and img.size == (64, 64)
    assert "test" in repr(ds) and "18" in repr(ds)


def test_splits_option_and_image_root(corpus, tmp_path):
    ds = load_karpathy(corpus, splits=("test",))
    assert len(ds) == 4 and ds.split("train") == []
    moved = tmp_path / "elsewhere" / "dataset.json"
    moved.parent.mkdir()
    shutil.copy(corpus, moved)
    assert len(load_karpathy(moved, image_root=corpus.parent)) == 18
    with pytest.raises(DataError, match="entry 0 .*image file not found"):
        load_karpathy(moved, image_root=moved.parent)  # images are not next to the moved JSON
    assert len(load_karpathy(moved, image_root=moved.parent, check="none")) == 18


def _set(i, key, value):
    return lambda images: images[i].__setitem__(key, value)


BROKEN = {  # reason -> (edit, expected message fragment)
    "duplicate filename": (_set(3, "filename", "shapes_000001.png"), "entry 3 ('shapes_000001.png'): 'images/shapes_000001.png' is also entry 1"),
    "duplicate imgid": (_set(3, "imgid", 1), "entry 3 ('shapes_000003.png'): imgid 1 is also entry 1"),
    "no sentences": (lambda images: images[2].pop("sentences"), "entry 2 ('shapes_000002.png'): entry has no 'sentences'"),
    "empty sentences": (_set(2, "sentences", []), "entry 2 ('shapes_000002.png'): 'sentences' must be a non-empty list"),
    "empty caption": (lambda images: images[2]["sentences"][4].update(raw=" \t "), "entry 2 ('shapes_000002.png'): sentences[4] is empty"),
    "unknown split": (_set(5, "split", "dev"), "entry 5 ('shapes_000005.png'): split 'dev' is not one of"),
    "missing imgid": (lambda images: images[5].pop("imgid"), "entry 5 ('shapes_000005.png'): missing required key 'imgid'"),
    "missing filename": (lambda images: images[5].pop("filename"), "entry 5 (None): missing required key 'filename'"),
    "missing raw": (lambda images: images[1]["sentences"][0].pop("raw"), "entry 1 ('shapes_000001.png'): sentences[0] has no 'raw'"),
    "string imgid": (_set(1, "imgid", "1"), "'imgid' must be an integer"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_each_broken_entry_raises_naming_file_and_entry(copy_corpus, case):
    edit, message = BROKEN[case]
    path = copy_corpus(edit)
    with pytest.raises(DataError) as info:
        load_karpathy(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_missing_image_file(copy_corpus):
    path = copy_corpus()
    (path.parent / "images" / "shapes_000007.png").unlink()
    with pytest.raises(DataError, match=r"entry 7 \('shapes_000007.png'\): image file not found"):
        load_karpathy(path)


def test_truncated_png_is_caught_by_decode_check(copy_corpus):
    path = copy_corpus()
    png = path.parent / "images" / "shapes_000008.png"
    png.write_bytes(png.read_bytes()[:120])
    assert len(load_karpathy(path)) == 18  # "exists" only looks for the file
    with pytest.raises(DataError, match=r"entry 8 \('shapes_000008.png'\): cannot decode image"):
        load_karpathy(path, check="decode")
    with pytest.raises(DataError, match="cannot decode image"):
        load_karpathy(path).load_image(8)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupted_jpeg_is_caught_by_decode_check(copy_corpus, damage):
    def to_jpeg(images):
        images[9]["filename"] = "photo.jpg"
    path = copy_corpus(to_jpeg)
    jpeg = path.parent / "images" / "photo.jpg"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(jpeg, quality=90)
    assert load_karpathy(path, check="decode").by_id(9).path == jpeg
    data = jpeg.read_bytes()
    jpeg.write_bytes(b"\x00" * 64 + data[64:] if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(DataError, match=r"entry 9 \('photo.jpg'\): cannot decode image"):
        load_karpathy(path, check="decode")


def test_skip_reports_every_skipped_entry(copy_corpus, capsys):
    def break_several(images):
        images[1]["sentences"] = []
        images[2]["sentences"][0]["raw"] = ""
        images[3]["split"] = "dev"
        images[4]["filename"] = "shapes_000000.png"
        images[10]["sentences"] = []
    path = copy_corpus(break_several)
    (path.parent / "images" / "shapes_000006.png").unlink()
    ds = load_karpathy(path, on_error="skip")
    assert len(ds) == 18 - 6
    assert {k: len(v) for k, v in ds.skipped.items()} == {"no sentences": 2, "empty caption": 1, "unknown split": 1,
                                                          "duplicate filename": 1, "missing image": 1}
    assert ds.skipped["no sentences"] == ["entry 1 ('shapes_000001.png')", "entry 10 ('shapes_000010.png')"]
    printed = capsys.readouterr().out
    assert "skipped 6 of 18 entries" in printed and str(path) in printed and "shapes_000006.png" in printed
    assert "skipped 6" in repr(ds)


def test_skip_everything_is_an_error(copy_corpus):
    path = copy_corpus(lambda images: [e.update(sentences=[]) for e in images])
    with pytest.raises(DataError, match="no usable entries"):
        load_karpathy(path, on_error="skip")


def test_error_names_every_way_to_skip(copy_corpus):
    path = copy_corpus(_set(2, "split", "dev"))
    with pytest.raises(DataError) as info: load_karpathy(path)
    for way in ("on_error='skip'", "on_error = skip", "grace reproduce --on-error skip", "grace data karpathy-check"):
        assert way in str(info.value)


def test_check_reports_every_bad_entry_of_every_split(copy_corpus):
    def break_several(images):
        images[1]["sentences"] = []
        images[3]["split"] = "dev"
        images[4]["filename"] = "shapes_000000.png"
        images[15]["sentences"][0]["raw"] = " "  # a test image
    path = copy_corpus(break_several)
    (path.parent / "images" / "shapes_000006.png").unlink()
    png = path.parent / "images" / "shapes_000013.png"  # a val image, truncated: only decoding finds it
    png.write_bytes(png.read_bytes()[:120])
    report = check_karpathy(path, progress=False)
    assert (report["dataset"], report["entries"], report["usable"]) == ("shapes", 18, {"train": 8, "val": 1, "test": 3})
    assert [line.split(":")[0] for line in report["bad"]] == [
        "entry 1 ('shapes_000001.png')", "entry 3 ('shapes_000003.png')", "entry 4 ('shapes_000000.png')",
        "entry 6 ('shapes_000006.png')", "entry 13 ('shapes_000013.png')", "entry 15 ('shapes_000015.png')"]
    assert "missing image: image file not found" in report["bad"][3] and "undecodable image" in report["bad"][4]
    assert len(check_karpathy(path, check="exists", progress=False)["bad"]) == 5
    with pytest.raises(DataError, match="check must be"): check_karpathy(path, check="full")


def test_entries_outside_requested_splits_are_not_image_checked(copy_corpus):
    path = copy_corpus()
    (path.parent / "images" / "shapes_000000.png").unlink()  # a train image
    assert len(load_karpathy(path, splits=("val", "test"))) == 6


@pytest.mark.parametrize("content, message", [("", "not valid JSON"), ("[]", "not a Karpathy-format dataset file"),
                                              ('{"annotations": []}', "not a Karpathy-format dataset file"),
                                              ('{"images": []}', "'images' list is empty"),
                                              ('{"images": [1, 2]}', "entry 0: expected a JSON object")])
def test_not_a_karpathy_file(tmp_path, content, message):
    path = tmp_path / "dataset.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_karpathy(path, check="none")
    assert str(path) in str(info.value)
    assert isinstance(info.value, GraceError) and isinstance(info.value, ValueError)


def test_missing_json_and_bad_options(corpus, tmp_path):
    with pytest.raises(DataError, match="JSON file not found"):
        load_karpathy(tmp_path / "absent.json")
    for kwargs, message in [(dict(splits=("train", "dev")), "splits must be"), (dict(splits="test"), "splits must be"),
                            (dict(check="full"), "check must be"), (dict(on_error="ignore"), "on_error must be"),
                            (dict(splits=("test",), include_restval=True), "has no 'train'"),
                            (dict(image_root=tmp_path / "nowhere"), "image root not found")]:
        with pytest.raises(DataError, match=message):
            load_karpathy(corpus, **kwargs)
    ds = load_karpathy(corpus)
    with pytest.raises(DataError, match="unknown split 'dev'"):
        ds.split("dev")
    with pytest.raises(DataError, match="no image with id 99"):
        ds.load_image(99)


def test_restval_excluded_by_default_and_merged_on_request(copy_corpus):
    path = copy_corpus(lambda images: [e.update(split="restval", cocoid=900 + e["imgid"]) for e in images[:3]])
    default = load_karpathy(path)
    assert len(default) == 15 and all(r.split != "restval" for r in default)
    merged = load_karpathy(path, include_restval=True)
    assert len(merged.split("train")) == 12 and merged.split("restval") == []
    assert merged.by_id(0).extra == {"sentids": [0, 1, 2, 3, 4], "cocoid": 900, "karpathy_split": "restval"}
    assert [r.split for r in load_karpathy(path, splits=("restval",))] == ["restval"] * 3


def test_coco_style_filepath_and_flickr_style_without(tmp_path):
    for folder in ("train2014", "val2014"):
        (tmp_path / folder).mkdir()
    Image.new("RGB", (8, 6)).save(tmp_path / "train2014" / "a.jpg")
    Image.new("RGB", (8, 6)).save(tmp_path / "val2014" / "a.jpg")
    Image.new("RGB", (8, 6)).save(tmp_path / "b.jpg")
    entries = [{"filepath": "train2014", "filename": "a.jpg", "split": "train", "imgid": 0, "cocoid": 5,
                "sentences": [{"raw": "a cat", "tokens": ["a", "cat"], "imgid": 0, "sentid": 0}]},
               {"filepath": "val2014", "filename": "a.jpg", "split": "test", "imgid": 1,
                "sentences": [{"raw": "a dog", "tokens": ["a", "dog"], "imgid": 1, "sentid": 1}]},
               {"filename": "b.jpg", "split": "val", "imgid": 2,
                "sentences": [{"raw": "a cow", "tokens": ["a", "cow"], "imgid": 2, "sentid": 2}]}]
    save_json({"images": entries, "dataset": "coco"}, tmp_path / "dataset_coco.json")
    ds = load_karpathy(tmp_path / "dataset_coco.json", check="decode")
    assert [r.path for r in ds] == [tmp_path / "train2014" / "a.jpg", tmp_path / "val2014" / "a.jpg", tmp_path / "b.jpg"]
    assert ds.by_id(0).extra == {"cocoid": 5} and ds.name == "coco"


def test_non_ascii_captions_survive(copy_corpus):
    captions = ["un cœur rouge à gauche", "赤いハート", "ein großer Stern ★", "  مربع أزرق  "]
    def edit(images):
        for sentence, caption in zip(images[0]["sentences"], captions):
            sentence["raw"] = caption
    ds = load_karpathy(copy_corpus(edit))
    assert ds.by_id(0).captions[:4] == [c.strip() for c in captions]
    assert ds.queries("train")[1] == ("赤いハート", 0)


# --- images ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, color, fmt", [("CMYK", (0, 255, 255, 0), "JPEG"), ("L", 128, "PNG"), ("L", 128, "JPEG"),
                                              ("1", 1, "PNG"), ("P", None, "PNG"), ("RGBA", (255, 0, 0, 0), "PNG"),
                                              ("LA", (0, 255), "PNG"), ("I;16", 65535, "PNG")])
def test_odd_image_modes_load_as_rgb(tmp_path, mode, color, fmt):
    image = Image.new("RGB", (7, 5), (0, 0, 255)).convert("P") if mode == "P" else Image.new(mode, (7, 5), color)
    path = tmp_path / f"odd.{fmt.lower()}"
    image.save(path, format=fmt)
    rgb = read_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == (7, 5)
    if mode in ("RGBA",):
        assert rgb.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    if mode == "I;16":
        assert rgb.getpixel((0, 0)) == (255, 255, 255)


def test_palette_transparency_and_alpha_compositing():
    half = Image.new("RGBA", (2, 1), (0, 0, 0, 128))
    assert to_rgb(half).getpixel((0, 0)) in {(127, 127, 127), (128, 128, 128)}
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)


def test_odd_images_inside_a_dataset(tmp_path):
    modes = {"cmyk.jpg": Image.new("CMYK", (9, 4), (0, 0, 0, 255)), "gray.png": Image.new("L", (9, 4), 10),
             "alpha.png": Image.new("RGBA", (9, 4), (0, 0, 0, 0))}
    entries = []
    for i, (name, image) in enumerate(modes.items()):
        image.save(tmp_path / name)
        entries.append({"filename": name, "split": "test", "imgid": i, "sentences": [{"raw": f"image {i}"}]})
    save_json({"images": entries}, tmp_path / "d.json")
    ds = load_karpathy(tmp_path / "d.json", check="decode")
    assert all(ds.load_image(i).mode == "RGB" and ds.load_image(i).size == (9, 4) for i in range(3))
    assert ds.name == "d"


# --- caption truthfulness and prefix stability -------------------------------------------------------------------

def _words(mapping: dict) -> dict:
    "word -> canonical name, for one-word entries of a vocabulary mapping."
    return {w: name for name, words in mapping.items() for w in words if " " not in w}


@pytest.mark.parametrize("seed", [0, 7, 123])
def test_captions_only_mention_what_is_in_the_scene(tmp_path, seed):
    from grace_nb.data import BACKGROUND_WORDS, COLOR_WORDS, SHAPE_WORDS, SIZE_WORDS
    colors, shapes, sizes = _words(COLOR_WORDS), _words(SHAPE_WORDS) | {"plus": "cross"}, _words(SIZE_WORDS)
    counts = {"one": 1, "two": 2, "three": 3, "single": 1}
    path = write_shapes_corpus(tmp_path, n_train=40, n_val=0, n_test=0, seed=seed, image_size=16, progress=False)
    for entry in load_json(path)["images"]:
        objects = entry["scene"]["objects"]
        for sentence in entry["sentences"]:
            text = sentence["raw"]
            for words in BACKGROUND_WORDS.values():  # background colours ("light blue") are not object colours
                for w in words:
                    text = text.replace(f"{w} background", "background")
            tokens = text.replace(",", " ").replace(":", " ").split()
            assert {colors[t] for t in tokens if t in colors} <= {o["color"] for o in objects}, sentence["raw"]
            assert {shapes[t] for t in tokens if t in shapes} <= {o["shape"] for o in objects}, sentence["raw"]
            assert {sizes[t] for t in tokens if t in sizes} <= {o["size"] for o in objects}, sentence["raw"]
            assert all(counts[t] == len(objects) for t in tokens if t in counts), sentence["raw"]
            assert any(t in shapes for t in tokens), sentence["raw"]


def test_larger_corpus_with_same_seed_starts_with_the_same_images(corpus, tmp_path):
    small = write_shapes_corpus(tmp_path, n_train=5, n_val=0, n_test=0, seed=0, progress=False)
    small_entries, big_entries = load_json(small)["images"], load_json(corpus)["images"]
    assert [e["sentences"] for e in small_entries] == [e["sentences"] for e in big_entries[:5]]
    for i in range(5):
        name = f"images/shapes_{i:06d}.png"
        assert (small.parent / name).read_bytes() == (corpus.parent / name).read_bytes()


# --- reading captions back -----------------------------------------------------------------------------------------

def test_every_caption_fits_its_own_scene_graph(tmp_path):
    "The gold image is always consistent with its caption: the caption's attributes are a subset of its scene graph's."
    from grace_nb.data import caption_attributes, scene_graph_attributes
    ds = load_karpathy(write_shapes_corpus(tmp_path, n_train=200, n_val=10, n_test=100, seed=42, progress=False), progress=False)
    kinds = set()
    for record in ds.records:
        truth = scene_graph_attributes(record.scene)
        for caption in record.captions:
            said = caption_attributes(caption)
            assert said <= truth, (caption, said - truth)
            assert any(kind == "shape" for kind, _ in said), caption  # every caption names a shape
            kinds |= {kind for kind, _ in said}
    assert kinds == {"color", "shape", "size", "position", "background", "count"}  # every reader is exercised


def test_caption_attributes_reads_synonyms_plurals_and_relations():
    from grace_nb.data import caption_attributes, scene_graph_attributes
    assert caption_attributes("Two shapes: a big violet disc in the upper left corner and a little red plus sign") == {
        ("count", 2), ("size", "large"), ("color", "purple"), ("shape", "circle"), ("position", (0, 0)),
        ("size", "small"), ("color", "red"), ("shape", "cross")}
    assert caption_attributes("two stars against a pale blue background") == {("shape", "star"), ("background", "light blue")}
    assert caption_attributes("a blue star to the left of a pink heart") == {  # a relation is not a position
        ("color", "blue"), ("shape", "star"), ("color", "pink"), ("shape", "heart")}
    assert caption_attributes("a dog on a sofa") == set()
    scene = {"background": "cream", "objects": [{"shape": "ring", "color": "green", "size": "small", "row": 2, "col": 1}]}
    assert scene_graph_attributes(scene) == {("shape", "ring"), ("color", "green"), ("size", "small"), ("position", (2, 1)),
                                             ("background", "cream"), ("count", 1)}
