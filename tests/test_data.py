import numpy as np
import pytest

from jaxlab.config import apply_overrides, base_config
from jaxlab.data.pipeline import batch_indices, eval_batches
from jaxlab.data.sources import DatasetNotFoundError, DataSourceError, get_source
from jaxlab.train.mesh import batch_sharding, make_mesh


def test_synthetic_ecg_is_seeded_split_and_shaped():
    train = get_source("synthetic:ecg_beats", "train", seed=3, scale=0.05)
    again = get_source("synthetic:ecg_beats", "train", seed=3, scale=0.05)
    test = get_source("synthetic:ecg_beats", "test", seed=3, scale=0.05)
    a, b = train.get(np.arange(len(train))), again.get(np.arange(len(again)))
    np.testing.assert_array_equal(a["signal"], b["signal"])
    assert a["signal"].shape[1:] == (128, 1) and a["signal"].dtype == np.float32
    assert a["signal"].min() >= 0 and a["signal"].max() <= 1
    assert set(np.unique(a["label"])) == {0, 1, 2, 3, 4}
    assert abs(len(train) - len(test)) <= 1
    other = get_source("synthetic:ecg_beats", "train", seed=4, scale=0.05).get(np.arange(5))
    assert not np.allclose(other["signal"], a["signal"][:5])


def test_ecg_imbalanced_uses_mitbih_ratio():
    s = get_source("synthetic:ecg_beats", "all", balance="mitbih", scale=0.01)
    counts = np.bincount(s.get(np.arange(len(s)))["label"], minlength=5)
    np.testing.assert_array_equal(counts, [717, 80, 72, 25, 66])


def test_npz_file_source_and_split(tmp_path):
    path = tmp_path / "beats.npz"
    np.savez(path, x=np.arange(40 * 128, dtype=np.float32).reshape(40, 128), y=np.arange(40) % 5)
    train = get_source(f"file:{path}", "train", keys={"signal": "x", "label": "y"})
    test = get_source(f"file:{path}", "test", keys={"signal": "x", "label": "y"})
    assert len(train) == len(test) == 20
    rows = np.concatenate([train.get(np.arange(20))["signal"][:, 0], test.get(np.arange(20))["signal"][:, 0]])
    assert sorted(rows.tolist()) == [128.0 * i for i in range(40)]  # every example once
    asked = r"has no arrays 'beats' \(asked for by data.options.keys=signal:beats\); it has: x, y"
    with pytest.raises(DataSourceError, match=asked):
        get_source(f"file:{path}", "train", keys={"signal": "beats"})


def test_npz_with_other_key_names_names_expected_and_found(tmp_path):
    path = tmp_path / "beats.npz"
    np.savez(path, x=np.zeros((10, 128), np.float32), y=np.arange(10) % 5)
    with pytest.raises(DataSourceError) as info:
        get_source(f"file:{path}", "train", features=("signal", "label"))
    message = str(info.value)
    assert "no feature 'signal', 'label'" in message and "it has: x, y" in message
    assert "--config.data.options.keys=signal:x,label:y" in message
    # the rename, as the command line sets it
    config = apply_overrides(base_config(), ["data.options.keys=signal:x,label:y"])
    assert config.data.options["keys"] == "signal:x,label:y"
    s = get_source(f"file:{path}", "all", features=("signal", "label"), **config.data.options)
    assert sorted(s.get(np.arange(3))) == ["label", "signal"] and len(s) == 10
    with pytest.raises(DataSourceError, match="must look like served:stored"):
        get_source(f"file:{path}", "all", keys="signal=x")


def test_keys_rename_any_source_kind():
    plain = get_source("synthetic:ecg_beats", "train", scale=0.01)
    renamed = get_source("synthetic:ecg_beats", "train", scale=0.01, keys="beat:signal,y:label",
                         features=("beat", "y"))
    idx = np.arange(4)
    np.testing.assert_array_equal(renamed.get(idx)["beat"], plain.get(idx)["signal"])
    np.testing.assert_array_equal(renamed.get(idx)["y"], plain.get(idx)["label"])
    with pytest.raises(DataSourceError, match="has no 'sig'"):
        get_source("synthetic:ecg_beats", "train", scale=0.01, keys={"signal": "sig"})


def test_per_split_files_and_hdf5(tmp_path):
    import h5py

    for split, n in (("train", 6), ("test", 4)):
        with h5py.File(tmp_path / f"mitbih_{split}.h5", "w") as f:
            f["signal"] = np.zeros((n, 128), np.float32)
            f["label"] = np.ones(n, np.int64)
    assert len(get_source(f"file:{tmp_path / 'mitbih.h5'}", "train")) == 6
    assert len(get_source(f"file:{tmp_path / 'mitbih.h5'}", "test")) == 4


def test_image_folder_source(tmp_path):
    from skimage import io

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            io.imsave(tmp_path / cls / f"{i}.png", np.full((6, 6), 40 * i, np.uint8), check_contrast=False)
    s = get_source(f"folder:{tmp_path}", "all")
    data = s.get(np.arange(len(s)))
    assert data["image"].shape == (10, 6, 6) and sorted(np.bincount(data["label"])) == [5, 5]


def test_missing_data_errors_say_what_to_do(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="not found"):
        get_source(f"file:{tmp_path / 'absent.npz'}", "train")
    with pytest.raises(DatasetNotFoundError, match="tfds build mnist"):
        get_source("tfds:mnist", "train", data_dir=str(tmp_path / "tfds"))
    with pytest.raises(DatasetNotFoundError) as info:  # a misspelt name: the hint first, not TFDS's ~450 names
        get_source("tfds:mnsit", "train", data_dir=str(tmp_path / "tfds"))
    assert str(info.value).startswith("no TFDS dataset 'mnsit'. Did you mean 'mnist'")
    assert len(str(info.value)) < 800 and "abstract_reasoning" not in str(info.value)
    assert not (tmp_path / "tfds").exists()
    with pytest.raises(DatasetNotFoundError, match="Did you mean 'ecg_beats'"):
        get_source("synthetic:ecg_beat", "train")
    with pytest.raises(ValueError, match="unknown data source kind 'tfsd'"):
        get_source("tfsd:mnist", "train")


def test_tfds_source_under_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        s = get_source("tfds:mnist", "train", data_dir="/nonexistent")
        batch = s.get(np.array([0, 3, 5]))
    assert len(s) == 12
    assert batch["image"].shape == (3, 28, 28, 1) and batch["label"].shape == (3,)


@pytest.mark.parametrize(
    "name,key,shape",
    [
        ("digits", "image", (8, 8, 1)),
        ("iris", "features", (4,)),
        ("shepp_logan", "image", (400, 400, 1)),
        ("pywt_ecg", "signal", (1024, 1)),
        ("pydicom_ecg", "signal", (10000, 12)),
        ("pydicom_ct", "image", (128, 128, 1)),
        ("stereo_motorcycle", "disparity", (500, 741)),
        ("skimage_images", "image", (128, 128, 1)),
    ],
)
def test_shipped_sources_load_offline(name, key, shape):
    s = get_source(f"shipped:{name}", "train")
    x = s.get(np.arange(min(len(s), 2)))[key]
    assert x.shape[1:] == shape and np.isfinite(x.astype(np.float64)).all() and x.std() > 0


def test_batch_order_is_pure_function_of_seed_and_step():
    first = [batch_indices(10, 4, seed=1, step=s) for s in range(5)]
    again = [batch_indices(10, 4, seed=1, step=s) for s in range(5)]
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
    epoch0 = np.concatenate(first)[:10]
    assert sorted(epoch0.tolist()) == list(range(10))  # an epoch visits every example once
    assert not np.array_equal(np.concatenate(first)[10:20], epoch0)  # a fresh permutation next epoch


def test_eval_batches_pad_and_mask_cover_everything():
    s = get_source("synthetic:ecg_beats", "test", scale=0.01)
    sharding = batch_sharding(make_mesh(2))
    total, seen = 0.0, []
    for b in eval_batches(s, 16, sharding):
        total += float(b["mask"].sum())
        seen.append(np.asarray(b["label"])[np.asarray(b["mask"]) > 0])
    assert total == len(s) and np.concatenate(seen).size == len(s)


def test_r_peak_detection_and_beat_extraction_on_a_known_record():
    from jaxlab.data.ecg_beats import detect_r_peaks, extract_beats

    rate, t = 360, np.arange(360 * 8)
    true_peaks = np.array([200, 560, 850, 1230, 1600, 1920, 2300, 2650, 2820])
    record = 0.05 * np.sin(2 * np.pi * 0.3 * t / rate)  # baseline wander
    for p in true_peaks:  # narrow R, a broad T wave 250 ms later
        record += np.exp(-0.5 * ((t - p) / 3.0) ** 2) + 0.35 * np.exp(-0.5 * ((t - p - 90) / 15.0) ** 2)
    found = detect_r_peaks(record, rate)
    assert len(found) == len(true_peaks) and np.abs(found - true_peaks).max() <= 1
    beats = extract_beats(record, rate)
    assert beats.shape == (len(true_peaks) - 1, 128)  # the last peak's window runs past the record end
    assert (np.abs(beats.argmax(1) - 64) <= 1).all() and beats.min() == 0 and beats.max() == 1


@pytest.mark.parametrize("name", ["pywt_ecg_beats", "pydicom_ecg_beats"])
def test_real_beats_from_shipped_recordings(name):
    s = get_source(f"shipped:{name}", "train")
    x = s.get(np.arange(len(s)))["signal"][..., 0]
    assert x.shape[0] >= 3 and x.shape[1] == 128
    assert (np.abs(x.argmax(1) - 64) <= 2).mean() >= 0.8  # R peaks centred, as in MIT-BIH beats
