import pytest

from jaxlab.config import Config, ConfigError, apply_overrides, load_config, parse_arg


def test_variants_and_overrides_apply():
    c = load_config("configs/ecg_cnn.py:paper", ["optimizer.lr=3e-4", "train.steps=7", "model.n_convs=4"])
    assert c.optimizer.lr == 3e-4 and c.train.steps == 7 and c.model.n_convs == 4
    assert c.data.options.balance == "balanced"
    short = load_config("ecg_cnn:imbalanced")
    assert short.data.options.balance == "mitbih"


def test_unknown_key_names_nearest_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config("ecg_cnn:tiny", ["optimizer.lrr=1e-3"])
    assert "optimizer.lrr" in str(err.value) and "'lr'" in str(err.value)
    with pytest.raises(ConfigError, match="Did you mean 'train'"):
        load_config("ecg_cnn:tiny", ["trian.steps=3"])


def test_wrong_type_names_key_and_types():
    with pytest.raises(ConfigError, match=r"'train.steps' expects int .* got str 'many'"):
        load_config("ecg_cnn:tiny", ["train.steps=many"])
    c = load_config("ecg_cnn:tiny", ["optimizer.lr=1"])  # an int fits a float field
    assert isinstance(c.optimizer.lr, float)


def test_unknown_variant_and_file():
    with pytest.raises(ValueError, match="unknown variant"):
        load_config("ecg_cnn:huge")
    with pytest.raises(ConfigError, match="not found.*ecg_cnn"):
        load_config("nope:tiny")
    with pytest.raises(ConfigError, match="config argument 'colour'"):
        parse_arg("colour=red", variant="tiny")


def test_config_attribute_access_and_locking():
    c = Config(a=1, b={"c": 2.0})
    assert c.b.c == 2.0
    with pytest.raises(ConfigError, match="unknown config key 'b.d'"):
        apply_overrides(c, ["b.d=1"])
    with pytest.raises(AttributeError, match="unknown config key 'x'"):
        _ = c.x


def test_every_config_file_loads_and_names_a_known_method():
    from jaxlab import methods
    from jaxlab.config import CONFIGS_DIR, load_config

    names = sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if not p.stem.startswith("_"))
    assert "videomae_pretrain" in names
    for name in names:
        assert load_config(name).method in methods.names(), name


def test_videomae_pretrain_variants_are_pretraining_only():
    from jaxlab.config import load_config

    for variant, dim, classes in (("tiny", 64, 4), ("k400_b", 768, 400), ("ssv2_l", 1024, 174)):
        c = load_config(f"videomae_pretrain:{variant}")
        assert c.method == "mar" and tuple(c.mar.stages) == ("pretrain",), variant
        assert (c.model.dim, c.model.num_classes, c.mar.pretrain_ratio) == (dim, classes, 0.9), variant
