"""jaxlab.report on hand-made inputs, and the reports' checks (split_ecg trends, FL vs SplitNN findings) on
hand-made rows whose answers are known."""

import json
import struct

import numpy as np
import pytest

from jaxlab import report as R
from jaxlab.methods.split_ecg import check_trends

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- tables and numbers -----------------------------------------------------------------------------------


def test_markdown_table_2x2_exact():
    table = R.markdown_table(["a", "b"], [[1, 0.123456], ["x", None]])
    assert table == "| a | b |\n|---|---|\n| 1 | 0.1235 |\n| x |  |"


def test_markdown_table_rejects_a_row_of_the_wrong_length():
    with pytest.raises(ValueError, match="row 1 has 3 cells, the header has 2"):
        R.markdown_table(["a", "b"], [[1, 2], [1, 2, 3]])


def test_mean_std_of_known_numbers():
    # mean 0.2; population std sqrt((0.01 + 0 + 0.01) / 3) = 0.0816497
    assert R.mean_std([0.1, 0.2, 0.3], percent=True) == "20.00 ± 8.16"
    # mean 2.5; std sqrt((2.25 + 0.25 + 0.25 + 2.25) / 4) = sqrt(1.25) = 1.1180
    assert R.mean_std([1.0, 2.0, 3.0, 4.0], digits=3) == "2.500 ± 1.118"
    assert R.mean_std([0.4217], percent=True) == "42.17"  # one seed: no spread shown
    assert R.mean_std(np.array([5.0, 5.0]), digits=1) == "5.0 ± 0.0"
    with pytest.raises(ValueError, match="non-empty 1D"):
        R.mean_std([])


def test_findings_table_yes_and_no():
    findings = [R.Finding("A beats B", "A 90% vs B 80%", True),
                {"finding": "C beats D", "detail": "C 1% vs D 2%", "holds": False}]
    assert R.findings_table(findings) == (
        "| paper finding | here | holds |\n|---|---|---|\n"
        "| A beats B | A 90% vs B 80% | yes |\n"
        "| C beats D | C 1% vs D 2% | NO |")
    assert R.Finding("c", "d", np.bool_(False)).as_dict() == {"finding": "c", "detail": "d", "holds": False}
    assert R.yes_no(True) == "yes" and R.yes_no(False) == "NO"


# --- files and plots --------------------------------------------------------------------------------------


def _png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_write_report_writes_json_markdown_and_a_valid_png(tmp_path, capsys):
    result = {"rows": [{"acc": np.float32(0.5), "curve": np.array([1, 2])}],
              "findings": [R.Finding("c", "d", True)]}

    def plot(path):
        fig, axes = R.subplots(2, panel_size=(3.0, 2.0))
        R.plot_curves(axes[0], {"FL": [0.1, 0.2]})
        R.plot_bars(axes[1], ["a", "b"], [1.0, 2.0])
        R.save_figure(fig, path, dpi=50)

    workdir = tmp_path / "new" / "dir"
    paths = R.write_report(workdir, result, "# title\n", plot)
    assert paths == {"json": workdir / "report.json", "md": workdir / "report.md", "png": workdir / "report.png"}
    assert json.loads(paths["json"].read_text()) == {
        "rows": [{"acc": 0.5, "curve": [1, 2]}], "findings": [{"finding": "c", "detail": "d", "holds": True}]}
    assert paths["md"].read_text() == "# title\n"
    assert _png_size(paths["png"]) == (300, 100)  # 2 panels of 3 x 2 inches at 50 dpi
    assert capsys.readouterr().out == "# title\n\n"

    R.write_report(tmp_path / "quiet", {}, "x", echo=False)
    assert not (tmp_path / "quiet" / "report.png").exists() and capsys.readouterr().out == ""


def test_write_report_names_what_json_cannot_store(tmp_path):
    with pytest.raises(TypeError, match="value of type object, which JSON cannot store"):
        R.write_report(tmp_path, {"x": object()}, "", echo=False)


def test_plot_curves_and_bars_draw_the_given_values():
    fig, (ax_curves, ax_bars) = R.subplots(2)
    R.plot_curves(ax_curves, {"FL": [0.5, 0.75], "SplitNN": [0.25, 1.0]}, styles={"SplitNN": "C3--"},
                  scale=100, title="t", xlabel="round", ylabel="acc %")
    fl, split = ax_curves.get_lines()
    np.testing.assert_array_equal(fl.get_xdata(), [1, 2])
    np.testing.assert_array_equal(fl.get_ydata(), [50.0, 75.0])
    np.testing.assert_array_equal(split.get_ydata(), [25.0, 100.0])
    assert split.get_linestyle() == "--" and [t.get_text() for t in ax_curves.get_legend().get_texts()] == [
        "FL", "SplitNN"]
    assert (ax_curves.get_title(), ax_curves.get_xlabel(), ax_curves.get_ylabel()) == ("t", "round", "acc %")

    R.plot_bars(ax_bars, ["a", "b", "c"], [3.0, 1.0, 2.0], colors=["C0", "C3", "C0"])
    assert [p.get_height() for p in ax_bars.patches] == [3.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="3 names but 2 values"):
        R.plot_bars(ax_bars, ["a", "b", "c"], [1.0, 2.0])
    R.save_figure(fig, "/dev/null")


# --- split_ecg's trend check ------------------------------------------------------------------------------


def _row(setting, family, accuracy, top_dcor, min_dtw):
    return {"setting": setting, "family": family, "accuracy": accuracy, "top_dcor": top_dcor,
            "min_dtw": min_dtw}


def test_check_trends_on_rows_that_follow_the_paper():
    rows = [_row("1 conv", "conv", 0.95, 0.9, 1.0), _row("2 conv", "conv", 0.93, 0.7, 1.5),
            _row("3 conv", "conv", 0.90, 0.5, 2.0),
            _row("DP eps=10", "dp", 0.92, 0.6, 1.2), _row("DP eps=1", "dp", 0.70, 0.3, 3.0)]
    assert check_trends(rows) == [
        {"trend": "client layers: 1 conv -> 3 conv", "dcor_falls": True, "dtw_rises": True,
         "accuracy_falls": True},
        {"trend": "DP epsilon: DP eps=10 -> DP eps=1", "dcor_falls": True, "dtw_rises": True,
         "accuracy_falls": True},
    ]


def test_check_trends_on_rows_against_the_paper():
    """Leakage rising with more layers, and accuracy rising under stronger DP: every check says NO."""
    rows = [_row("1 conv", "conv", 0.90, 0.5, 2.0), _row("3 conv", "conv", 0.95, 0.9, 1.0),
            _row("DP eps=10", "dp", 0.80, 0.6, 1.2), _row("DP eps=1", "dp", 0.90, 0.6, 1.2)]
    assert [(t["dcor_falls"], t["dtw_rises"], t["accuracy_falls"]) for t in check_trends(rows)] == [
        (False, False, False),
        (False, False, False),  # equal dCor does not fall, equal DTW does not rise
    ]


def test_check_trends_accuracy_slack_and_families():
    """Accuracy "falls" unless it rises by more than half a percentage point."""
    base = _row("DP eps=10", "dp", 0.900, 0.6, 1.0)
    within = _row("DP eps=1", "dp", 0.904, 0.5, 2.0)
    beyond = _row("DP eps=1", "dp", 0.906, 0.5, 2.0)
    assert check_trends([base, within])[0]["accuracy_falls"] is True
    assert check_trends([base, beyond])[0]["accuracy_falls"] is False
    assert check_trends([base]) == []  # one setting of a family: nothing to compare
    # first and last of the family in the order given; rows of the other family in between are ignored
    middle = _row("2 conv", "conv", 0.5, 0.99, 0.01)
    assert check_trends([base, middle, within])[0]["trend"] == "DP epsilon: DP eps=10 -> DP eps=1"


# --- FL vs SplitNN findings -------------------------------------------------------------------------------


def _paradigm(final: list[float], over_rounds: list[float], bytes_measured: int) -> dict:
    keys = {"accuracy": final, "accuracy_over_rounds": over_rounds}
    return {"by_seed": [{"accuracy": a, "accuracy_over_rounds": o} for a, o in zip(final, over_rounds)],
            "mean": {k: float(np.mean(v)) for k, v in keys.items()}, "bytes_measured": bytes_measured}


def test_fl_vs_splitnn_findings_on_hand_made_rows():
    from jaxlab.methods.fl_vs_splitnn import check_findings

    imbalanced = {"name": "imbalanced",  # SplitNN ahead on the final accuracy (2 of 3 seeds), behind over rounds
                  "SplitNN": _paradigm([0.9, 0.8, 0.4], [0.5, 0.5, 0.5], 12_000),
                  "FL": _paradigm([0.5, 0.7, 0.6], [0.6, 0.6, 0.6], 1_000)}
    non_iid = {"name": "non-iid",  # FL behind on both; SplitNN sends only 5x more
               "FL": _paradigm([0.3, 0.3, 0.3], [0.2, 0.2, 0.2], 2_000),
               "SplitNN": _paradigm([0.4, 0.4, 0.4], [0.3, 0.3, 0.3], 10_000)}
    assert check_findings([imbalanced, non_iid], 10.0) == [
        {"finding": "imbalanced: SplitNN final accuracy > FL", "holds": True,
         "detail": "SplitNN 70.00% vs FL 60.00% (mean of 3 seeds; SplitNN ahead in 2 of 3)"},
        {"finding": "imbalanced: SplitNN accuracy averaged over rounds > FL", "holds": False,
         "detail": "SplitNN 50.00% vs FL 60.00% (mean of 3 seeds; SplitNN ahead in 0 of 3)"},
        {"finding": "non-iid: FL final accuracy > SplitNN", "holds": False,
         "detail": "FL 30.00% vs SplitNN 40.00% (mean of 3 seeds; FL ahead in 0 of 3)"},
        {"finding": "non-iid: FL accuracy averaged over rounds > SplitNN", "holds": False,
         "detail": "FL 20.00% vs SplitNN 30.00% (mean of 3 seeds; FL ahead in 0 of 3)"},
        {"finding": "imbalanced: FL sends >= 10x fewer bytes than SplitNN", "holds": True,
         "detail": "SplitNN/FL = 12.0x"},
        {"finding": "non-iid: FL sends >= 10x fewer bytes than SplitNN", "holds": False,
         "detail": "SplitNN/FL = 5.0x"},
    ]
