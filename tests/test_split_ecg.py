"""Split ECG (split_ecg.md): split training equals whole training; the leakage report shows the DP trend."""

import json

import jax
import numpy as np

from jaxlab import methods
from jaxlab.config import load_config
from jaxlab.methods import split_ecg
from jaxlab.train.loop import restore_for_eval, train

FAST = ["data.options.scale=0.05", "train.progress=False", "train.log_every=10", "train.eval_every=30",
        "train.checkpoint_every=30", "train.steps=30", "mesh.data=1"]


def _params(config, workdir):
    _, state = restore_for_eval(config, workdir, methods.build(config))
    return jax.tree_util.tree_leaves(state.params)


def test_split_and_whole_training_give_the_same_parameters(tmp_path):
    for epsilon in (0.0, 5.0):  # with DP the noise keys match too
        whole = load_config("ecg_cnn:tiny,n_convs=3", [*FAST, f"model.dp_epsilon={epsilon}"])
        split = load_config(f"split_ecg:tiny,n_convs=3,epsilon={epsilon}", FAST)
        assert split.method == "split_ecg"
        train(whole, tmp_path / f"whole{epsilon}", methods.build(whole))
        train(split, tmp_path / f"split{epsilon}", methods.build(split))
        for a, b in zip(_params(whole, tmp_path / f"whole{epsilon}"), _params(split, tmp_path / f"split{epsilon}")):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_leakage_report_runs_and_shows_the_dp_trend(tmp_path):
    config = load_config("split_ecg:tiny", [
        "data.options.scale=0.1", "train.progress=False", "train.steps=300", "train.log_every=100",
        "train.eval_every=300", "train.checkpoint_every=300", "report.leakage_beats=200",
        "report.settings=(('2 conv', 2, 0.0), ('DP eps=10', 2, 10.0), ('DP eps=1', 2, 1.0))",
    ])
    result = split_ecg.report(config, tmp_path)
    rows = {r["setting"]: r for r in result["rows"]}
    assert list(rows) == ["2 conv", "DP eps=10", "DP eps=1"]
    assert rows["2 conv"]["accuracy"] > 0.8  # 5 classes: chance is 0.2
    assert rows["2 conv"]["top_dcor"] > rows["DP eps=1"]["top_dcor"]  # DP leaks less than no DP
    assert rows["DP eps=1"]["min_dtw"] > rows["2 conv"]["min_dtw"]
    # the paper's DP trend (check_trends itself is tested on hand-made rows in tests/test_report.py)
    assert result["trends"] == [{"trend": "DP epsilon: DP eps=10 -> DP eps=1", "dcor_falls": True,
                                 "dtw_rises": True, "accuracy_falls": True}]
    assert json.loads((tmp_path / "report.json").read_text()) == result
    assert "| DP epsilon: DP eps=10 -> DP eps=1 | yes | yes | yes |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
