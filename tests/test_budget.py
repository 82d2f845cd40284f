"The training budget: the paper's reading, the validation view, the run plan's from-scratch rows, vision distinctness."
import pytest
import torch

from grace_nb.core import GraceError, load_profile
from grace_nb.data import load_karpathy, write_shapes_corpus
from grace_nb.pipeline import PAPER_BUDGET, _run_plan, nearest_cosine, training_budget, validation_view
from grace_nb.training import TrainConfig


def test_paper_budget_reads_steps_as_examples():
    "The reference code's 15,625 steps x 4 GPUs x (16 + 48) examples are the paper's 1,000K / 3,000K."
    assert 15_625 * 4 * 16 == PAPER_BUDGET["memorize_examples"] and 15_625 * 4 * 48 == PAPER_BUDGET["retrieve_examples"]
    budget = training_budget(TrainConfig(train_steps=600, memorize_batch_size=32, retrieve_batch_size=64), 1800, 9000)
    assert budget == dict(memorize_passes=10.67, retrieve_epochs=4.27, paper_memorize_passes=33.33, paper_retrieve_epochs=20.0)
    assert training_budget(TrainConfig(), 0, 10)["memorize_passes"] is None  # w/o learning to memorize


def test_validation_view_never_shows_test_images(tmp_path):
    ds = load_karpathy(write_shapes_corpus(tmp_path, n_train=6, n_val=3, n_test=4, seed=1, progress=False), progress=False)
    view = validation_view(ds)
    assert [r.image_id for r in view.split("test")] == [r.image_id for r in ds.split("val")]
    assert not view.split("val") and {r.image_id for r in view.records} & {r.image_id for r in ds.split("test")} == set()
    assert view.queries("test") == ds.queries("val")
    no_val = load_karpathy(write_shapes_corpus(tmp_path/"b", n_train=6, n_val=0, n_test=4, seed=1, progress=False), progress=False)
    with pytest.raises(GraceError, match="validation images"): validation_view(no_val)


def test_run_plan_adds_from_scratch_rows_only_at_tutorial_scale():
    plan = _run_plan(["atomic", "structured"], load_profile("shapes"), table1=True)
    scratch = [p for p in plan if p["backbone"] == "scratch"]
    assert [p["name"] for p in scratch] == ["atomic-scratch", "structured-scratch"]
    assert all(p["variant"].endswith("from scratch") for p in scratch)
    assert all(p["backbone"] == "scratch" for p in _run_plan(["atomic"], load_profile("shapes"), table1=True)
               if p["name"].endswith("scratch"))
    assert {p["backbone"] for p in _run_plan(["atomic"], load_profile("flickr30k"), table1=True)} == {"pretrained"}


def test_nearest_cosine_sees_duplicates():
    torch.manual_seed(0)
    distinct = torch.randn(50, 64)
    assert nearest_cosine(distinct)["share_above_095"] == 0.0
    twins = torch.cat([distinct, distinct + 1e-4 * torch.randn(50, 64)])
    assert nearest_cosine(twins)["share_above_095"] == 1.0 and nearest_cosine(twins)["n_images"] == 100


def test_steps_for_passes_on_a_toy_profile(tmp_path):
    "Budget arithmetic on a toy profile: passes = steps x ranks x batch / images, and the steps that reach a pass count."
    from grace_nb.memorization import profile_budget, steps_for_passes
    toy = tmp_path/"settings.ini"
    toy.write_text("[toy]\nextends = shapes\nn_train = 10\nn_val = 0\nn_test = 6\nmemorize_batch_size = 4\n"
                   "retrieve_batch_size = 8\ntrain_steps = 12\npseudo_queries = 2\n")
    budget = profile_budget(load_profile("toy", toy))
    assert budget["memorize_passes"] == round(12 * 4 / 16, 2) == 3.0             # 10 train + 6 test images memorized
    assert budget["retrieve_epochs"] == round(12 * 8 / (5 * 10 + 2 * 6), 2)      # 5 captions per train image + pseudo-queries
    assert profile_budget(load_profile("toy", toy), ranks=2)["memorize_passes"] == 6.0
    assert steps_for_passes(3.0, 16, 4) == 12 and steps_for_passes(3.01, 16, 4) == 13  # the fewest steps reaching it
    assert steps_for_passes(33.3, 30_000, 16, ranks=4) == 15_610                # the paper's ~15,625 steps
    with pytest.raises(GraceError, match="positive"): steps_for_passes(0, 16, 4)


def test_shapes_profile_trains_at_the_papers_budget():
    "The tutorial's reference runs train at least the paper's Flickr30K passes per image and retrieve epochs."
    from grace_nb.memorization import profile_budget
    budget = profile_budget(load_profile("shapes"))
    assert budget["memorize_passes"] >= budget["paper_memorize_passes"] == 33.33
    assert budget["retrieve_epochs"] >= budget["paper_retrieve_epochs"] == 20.0
