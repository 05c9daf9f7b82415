"""Recipes: every shipped recipe is valid, and flags override the file."""

from pathlib import Path

import pytest

from cvtlab import CvtLabError
from cvtlab.models.registry import get_config
from cvtlab.train.config import RECIPES, make_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "name", ["demo", "cpu_30min", "tiny_imagenet_scratch", "tiny_imagenet_finetune"]
)
def test_shipped_recipes_are_valid_and_visible_in_configs(name):
    cfg = make_config(name)
    get_config(cfg.model, **cfg.model_overrides)  # the model and its overrides exist
    assert (REPO / "configs" / f"{name}.yaml").resolve() == (RECIPES / f"{name}.yaml").resolve()


def test_flags_override_the_recipe_and_bad_values_are_errors(tmp_path):
    cfg = make_config("cpu_30min", epochs=2, lr=0.5)
    assert cfg.epochs == 2 and cfg.lr == 0.5 and cfg.model == "cvt_xs_64"
    assert cfg.peak_lr == pytest.approx(0.5 * 128 / 512)
    with pytest.raises(CvtLabError, match="no such recipe file"):
        make_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("augment:\n  sharpen: 3\n")
    with pytest.raises(CvtLabError, match="unknown augment key"):
        make_config(bad)
    bad.write_text("epoch: 3\nlr: 0.1\n")
    with pytest.raises(CvtLabError, match=r"unknown key\(s\) epoch \(did you mean epochs\?\)"):
        make_config(bad)
    with pytest.raises(CvtLabError, match="--precision must be 32, bf16-mixed, 16-mixed or auto"):
        make_config(precision="64")
    assert make_config(precision="auto").precision == "auto"
    with pytest.raises(CvtLabError, match="--matmul-precision must be highest, high or medium"):
        make_config(matmul_precision="tf32")
    with pytest.raises(CvtLabError, match="--lr-decay must be cosine or linear, not 'step'"):
        make_config(lr_decay="step")
    with pytest.raises(
        CvtLabError, match="muon_polynomials must be quintic or polar_express, not 'newton'"
    ):
        make_config(muon_polynomials="newton")
    for key, value, message in [
        ("weight_decay", -0.1, "--weight-decay must be 0 or more, got -0.1"),
        ("ema_decay", 1.0, r"--ema-decay must be in \[0, 1\) \(0: no EMA\), got 1.0"),
        ("ema_decay", -0.5, "--ema-decay must be in"),
        ("ema_warmup_power", 0.0, "--ema-warmup-power must be more than 0, got 0.0"),
        ("ema_warmup_gamma", -1.0, "--ema-warmup-gamma must be more than 0, got -1.0"),
        ("label_smoothing", 1.0, r"--label-smoothing must be in \[0, 1\), got 1.0"),
        ("warmup_epochs", -1, "--warmup-epochs must be 0 or more, got -1"),
        ("min_lr_ratio", 2, r"min_lr_ratio must be in \[0, 1\], got 2"),
        ("grad_clip", 0, "grad_clip must be positive"),
        ("num_workers", -1, "num_workers must be 0 or more, got -1"),
        ("ckpt_every_n_steps", -5, r"ckpt_every_n_steps must be 0 \(off\) or more, got -5"),
        ("val_per_class", -1, "val_per_class must be at least 1, got -1"),
        ("betas", [0.9], r"betas must be two numbers in \[0, 1\), like \[0.9, 0.999\], not"),
        ("betas", [0.9, 1.5], "betas must be two numbers"),
        ("augment", 3, r"augment must be a mapping of augmentation settings .*, not 3"),
        ("model_overrides", [1], "model_overrides must be a mapping of model options"),
        ("augment", {"rrc_scale": 3}, r"augment.rrc_scale must be \[smallest, largest\]"),
        ("augment", {"rrc_scale": [0.8, 0.2]}, "augment.rrc_scale must be"),
        ("augment", {"mixup": -1}, "augment.mixup must be at least 0, not -1"),
        ("augment", {"group_size": 0}, "augment.group_size must be at least 1, not 0"),
        ("augment", {"random_erase": 2}, r"augment.random_erase must be in \[0, 1\], not 2"),
        ("augment", {"rand_magnitude": 31}, r"augment.rand_magnitude must be in \[0, 30\]"),
    ]:
        with pytest.raises(CvtLabError, match=message):
            make_config(**{key: value})
    assert make_config(ema_decay=0.999, weight_decay=0.0, grad_clip=None).ema_decay == 0.999
    for sizes in ([[1, 32]], [[0, 64], [0, 32]], [[0, 4]], "32", [[0]], [[0, 32, "zoom"]]):
        with pytest.raises(CvtLabError, match="train_sizes must be"):
            make_config(train_sizes=sizes)
    for batches in ([[1, 256]], [[0, 256], [0, 128]], [[0, 0]], "256", [[0]], [[0, 256, 3]]):
        with pytest.raises(CvtLabError, match="train_batch_sizes must be"):
            make_config(train_batch_sizes=batches)


def test_train_size_schedule():
    from cvtlab.train.config import train_size_at

    schedule = make_config(train_sizes=[[0, 32], [3, 48, "crop"], [5, 64]]).train_sizes
    sizes = [train_size_at(schedule, e) for e in (0, 1, 2, 2.99, 3, 4, 5, 6)]
    assert sizes == [(32, "resize")] * 4 + [(48, "crop")] * 2 + [(64, "resize")] * 2
    assert train_size_at(None, 4) is None


def test_phases_may_start_within_an_epoch_under_a_budget_and_sizes_are_never_truncated():
    from cvtlab.train.config import batch_size_at, train_size_at

    # A budget schedule's epoch is fractional, so a phase can start at 2.4 of 12 epochs (a fifth
    # of the budget); int() used to turn that into 2 without a word.
    cfg = make_config(
        train_sizes=[[0, 32], [2.4, 64]],
        train_batch_sizes=[[0.0, 512], [2.4, 96.0]],
        max_minutes=30,
        budget_schedule=True,
    )
    assert cfg.train_sizes == [[0, 32], [2.4, 64]]
    assert cfg.train_batch_sizes == [[0, 512], [2.4, 96]]
    assert [train_size_at(cfg.train_sizes, e)[0] for e in (2.39, 2.4)] == [32, 64]
    assert [batch_size_at(cfg.train_batch_sizes, e, 128) for e in (2.39, 2.4)] == [512, 96]
    with pytest.raises(CvtLabError, match="phase from epoch 2.4 needs budget_schedule"):
        make_config(train_sizes=[[0, 32], [2.4, 64]])
    with pytest.raises(CvtLabError, match="train_batch_sizes: a phase from epoch 0.5"):
        make_config(train_batch_sizes=[[0, 512], [0.5, 96]])
    with pytest.raises(CvtLabError, match="whole-number sizes"):
        make_config(train_sizes=[[0, 32.5]])
    with pytest.raises(CvtLabError, match="whole-number batch sizes"):
        make_config(train_batch_sizes=[[0, 96.5]])


def test_recipe_numbers_take_their_fields_types_or_fail_in_one_line(tmp_path):
    def recipe_with(text: str) -> Path:
        path = tmp_path / "recipe.yaml"
        path.write_text(f"model: cvt_seed\n{text}\n")
        return path

    # YAML 1.1 reads 3e-3 (no dot) as a string; it used to end in a TypeError.
    cfg = make_config(recipe_with("lr: 3e-3\nweight_decay: 0\nepochs: 12.0"))
    assert (cfg.lr, cfg.weight_decay, cfg.epochs) == (0.003, 0.0, 12)
    assert isinstance(cfg.epochs, int) and isinstance(cfg.weight_decay, float)
    assert make_config(recipe_with("whiten_stem: yes\nmuon_exact: false")).whiten_stem is True
    polar = make_config(recipe_with("optimizer: muon\nmuon_polynomials: polar_express"))
    assert polar.muon_polynomials == "polar_express"
    assert make_config(recipe_with("optimizer: muon")).muon_polynomials == "quintic"
    for text, message in [
        ("batch_size: 96.5", "batch_size must be a whole number, not 96.5"),
        ("epochs: ten", "epochs must be a whole number, not 'ten'"),
        ("lr: .nan", "lr must be a number, not nan"),
        ("max_minutes: yes", "max_minutes must be a number, not True"),
        ("augment:\n  crop_padding: 4.5", "augment: crop_padding must be a whole number"),
        ('muon_exact: "false"', "muon_exact must be true or false, not 'false'"),
        ("augment:\n  flip: 1", "augment: flip must be true or false, not 1"),
    ]:
        with pytest.raises(CvtLabError, match=message) as error:
            make_config(recipe_with(text))
        assert str(error.value).startswith(str(tmp_path / "recipe.yaml"))


def test_train_batch_schedule():
    from cvtlab.train.config import batch_size_at

    schedule = make_config(train_batch_sizes=[[0, 256], [4, 128]]).train_batch_sizes
    batches = [batch_size_at(schedule, e, 64) for e in (0, 3.99, 4, 9)]
    assert batches == [256, 256, 128, 128]
    assert batch_size_at(None, 4, 64) == 64


def test_lr_decays_fall_from_the_peak_to_the_floor_after_warmup():
    from cvtlab.train.module import warmup_decay

    def rate(step, decay):
        return warmup_decay(step, warmup=10, total=110, min_ratio=0.01, decay=decay)

    for decay in ("cosine", "linear"):
        assert [rate(s, decay) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
        assert rate(10, decay) == pytest.approx(1.0)
        assert rate(110, decay) == rate(500, decay) == pytest.approx(0.01)
    # Halfway both are at the middle; the line stays higher late in the run, where the
    # cosine has flattened out near the floor.
    assert rate(60, "linear") == pytest.approx(rate(60, "cosine")) == pytest.approx(0.505)
    assert rate(90, "linear") == pytest.approx(0.01 + 0.99 * 0.2)
    assert rate(100, "linear") > 3 * rate(100, "cosine")


def test_the_gpu_muon_candidate_is_the_gpu_recipe_with_only_its_optimiser_changed():
    """benchmarks/configs/tiny_imagenet_scratch_muon.yaml is measured against the shipped GPU
    recipe: it must stay that recipe but for the optimiser and the two settings tied to it."""
    shipped = make_config("tiny_imagenet_scratch").to_dict()
    muon = make_config(REPO / "benchmarks" / "configs" / "tiny_imagenet_scratch_muon.yaml")
    get_config(muon.model, **muon.model_overrides)
    changed = {k for k, v in muon.to_dict().items() if shipped[k] != v}
    assert changed == {"optimizer", "lr", "weight_decay"}
    assert (muon.optimizer, shipped["optimizer"]) == ("muon", "adamw")
