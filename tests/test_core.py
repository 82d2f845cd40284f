"Profiles, seeding and file helpers of grace_nb.core, including their error messages."
import json, os, subprocess, sys

import numpy as np
import pytest
import torch

from grace_nb.core import (GraceError, atomic_write, list_profiles, load_json, load_profile, packaged_settings,
                           pick_device, pick_dtype, save_json, seed_everything, settings_path)


def test_repository_profiles():
    assert list_profiles()[:3] == ["shapes", "flickr30k", "coco"]
    shapes, coco = load_profile("shapes"), load_profile("coco")
    assert shapes.model_preset == "tiny" and shapes.image_size == 64
    assert (coco.kmeans_k, coco.kmeans_c, coco.num_beams, coco.lr, coco.include_restval) == (30, 30, 10, 1e-4, True)
    assert shapes.path("dataset_json").is_absolute()


def test_unknown_profile_and_key_list_valid_ones():
    with pytest.raises(GraceError, match="valid profiles: shapes, flickr30k, coco"): load_profile("nope")
    with pytest.raises(GraceError, match="kmeans_c"): load_profile("shapes")["kmeans"]
    with pytest.raises(GraceError, match="num_beams"): load_profile("shapes").replace(beams=5)


def test_custom_settings_file_with_interpolation(tmp_path):
    ini = tmp_path/"settings.ini"
    ini.write_text("[DEFAULT]\nseed = 1\nroot = data\n[mine]\ndata_dir = ${root}/mine\nlr = 3e-4\nflag = True\n")
    p = load_profile("mine", ini)
    assert (p.seed, p.lr, p.flag, p.data_dir) == (1, 3e-4, True, "data/mine")
    assert p.path("data_dir") == (tmp_path/"data/mine").resolve()
    with pytest.raises(GraceError, match="settings.ini not found"): settings_path(tmp_path/"missing.ini")
    (tmp_path/"broken.ini").write_text("[a]\nx = ${nope}\n")
    with pytest.raises(GraceError, match="broken.ini"): load_profile("a", tmp_path/"broken.ini")


def test_settings_found_from_env_in_another_folder(tmp_path, repo_root):
    code = "from grace_nb.core import load_profile; print(load_profile('shapes').kmeans_k)"
    env = {**os.environ, "GRACE_SETTINGS": str(repo_root/"settings.ini")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "10"


def test_packaged_profiles_are_the_repository_file(repo_root):
    "One source of truth: the package's settings.ini is a link to the repository's (the wheel stores its content)."
    assert packaged_settings().is_symlink() and packaged_settings().resolve() == repo_root/"settings.ini"


def test_packaged_profiles_alone_resolve_against_the_current_folder(tmp_path):
    code = ("from grace_nb.core import load_profile, packaged_settings, settings_path; p = load_profile('coco'); "
            "print(settings_path(), p.source == packaged_settings(), p.path('data_dir'))")
    env = {k: v for k, v in os.environ.items() if k != "GRACE_SETTINGS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "True", str(tmp_path.resolve()/"data"/"coco")]


def test_your_settings_add_and_override_profiles(tmp_path):
    ini = tmp_path/"settings.ini"
    ini.write_text("[DEFAULT]\ndevice = cpu\n[shapes]\ntrain_steps = 7\n"
                   "[mine]\nextends = shapes\ncorpus = karpathy\ndata_dir = own\non_error = skip\n")
    assert list_profiles(ini) == ["shapes", "flickr30k", "coco", "mine"]
    shapes, mine, coco = (load_profile(name, ini) for name in ("shapes", "mine", "coco"))
    assert (shapes.train_steps, shapes.image_size, shapes.device, coco.device) == (7, 64, "cpu", "cpu")
    assert (mine.train_steps, mine.model_preset, mine.corpus, mine.on_error, shapes.on_error) == (7, "tiny", "karpathy", "skip", "raise")
    assert "extends" not in mine
    assert mine.path("dataset_json") == tmp_path.resolve()/"own"/"dataset_shapes.json"  # shapes' ${data_dir} follows mine's
    assert shapes.source == mine.source == ini.resolve() and coco.source == packaged_settings()


@pytest.mark.parametrize("text, message", [
    ("[a]\nextends = b\n[b]\nextends = a\n", "a -> b -> a"),
    ("[a]\nextends = nope\n", "'nope', which is not a profile"),
    ("[a]\nextends = DEFAULT\n", "'DEFAULT', which is not a profile"),
])
def test_extends_errors(tmp_path, text, message):
    (tmp_path/"settings.ini").write_text(text)
    with pytest.raises(GraceError, match=message): load_profile("a", tmp_path/"settings.ini")


def test_missing_settings_file_named_by_env_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GRACE_SETTINGS", str(tmp_path/"nope.ini"))
    with pytest.raises(GraceError, match="nope.ini.*GRACE_SETTINGS"): load_profile("shapes")


def test_seed_everything_repeats():
    seed_everything(3); a = (np.random.rand(3), torch.randn(3))
    seed_everything(3); b = (np.random.rand(3), torch.randn(3))
    assert np.array_equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(GraceError): seed_everything("3")


def test_device_and_dtype():
    assert pick_device("cpu").type == "cpu"
    assert pick_dtype("cpu") == torch.float32 and pick_dtype("cpu", "bf16") == torch.bfloat16
    with pytest.raises(GraceError, match="precision"): pick_dtype("cpu", "int4")
    with pytest.raises(GraceError, match="unknown device"): pick_device("tpu9")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path/"a.json"
    save_json({"v": 1}, target)
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("partial"); raise RuntimeError("killed")
    assert load_json(target) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_atomic_write_replaces_folder(tmp_path):
    target = tmp_path/"model"
    for version in ["1", "2"]:
        with atomic_write(target) as tmp:
            tmp.mkdir(); (tmp/"weights.txt").write_text(version)
    assert (target/"weights.txt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_json_is_deterministic_and_errors_name_file(tmp_path):
    a, b = save_json({"z": 1, "a": "ü"}, tmp_path/"a.json"), save_json({"a": "ü", "z": 1}, tmp_path/"b.json")
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(GraceError, match="missing.json"): load_json(tmp_path/"missing.json")
    (tmp_path/"bad.json").write_text("[1,")
    with pytest.raises(GraceError, match="bad.json"): load_json(tmp_path/"bad.json")
