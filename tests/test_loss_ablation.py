"""benchmarks/loss_ablation.py: each variant trains with its own loss settings, is tested on the test
split, lands in the table with the figures eval.py wrote, and is not retrained once done.

train.py and eval.py run in-process here (their own behaviour is tested in test_train.py and
test_tools.py); the ablation's subprocess call is swapped for their ``main(argv)``.
"""
import json

import pytest
import yaml

from recipes import load_tool, tiny_recipe

ABLATION = load_tool("loss_ablation", "benchmarks")
IN_PROCESS = {name: load_tool(name) for name in ("train", "eval")}


def call_in_process(script, *arguments):
    IN_PROCESS[script.stem].main(list(arguments))


@pytest.fixture(scope="module")
def ablated(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    config = tiny_recipe(root, train__epochs=1, train__log_images=0)
    out = root / "runs"
    patch = pytest.MonkeyPatch()
    patch.setattr(ABLATION, "_call", call_in_process)
    try:
        ABLATION.main(["--config", str(config), "--out", str(out), "--rare", "line", "square",
                       "--set", "train.val_every=1"])
    finally:
        patch.undo()
    return config, out


def test_each_variant_trains_with_its_own_loss(ablated):
    _, out = ablated
    expected = {
        "cross_entropy": ("cross_entropy", None, 0.0),
        "weighted_cross_entropy": ("cross_entropy", "enet", 0.0),
        "focal": ("focal", None, 0.0),
        "cb_focal": ("focal", "enet", 0.0),
        "cb_focal_poly1": ("focal", "enet", 1.0),
    }
    for name, (loss, weight, poly) in expected.items():
        resolved = yaml.safe_load((out / name / "config.yaml").read_text())["loss"]
        assert (resolved["name"], resolved["weight"], resolved["poly_epsilon"]) == (loss, weight, poly), name
        assert (out / name / "eval_test" / "metrics.json").is_file()


def test_the_losses_the_variants_logged_relate_as_their_formulas_do(ablated):
    """Same seed, data and initial weights, and four steps from there: each variant's logged training loss
    stands to the others as the formulas do on one model. Focal multiplies each pixel's cross-entropy by
    (1 - p_t)^2 < 1; ENet weights (1 / ln(1.1 + f) >= 1 / ln 2.1 = 1.35 per pixel, normalised by the pixel
    count) multiply it by more than 1.35; Poly-1 adds a positive term; weighted cross-entropy (a weighted
    mean) differs from the plain one. A variant that lost its overrides would log another's loss."""
    _, out = ablated
    loss = {name: json.loads((out / name / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]
            for name in ABLATION.VARIANTS}
    assert loss["focal"] < 0.9 * loss["cross_entropy"]
    assert loss["cb_focal"] > 1.3 * loss["focal"]
    assert loss["cb_focal_poly1"] > loss["cb_focal"]
    assert abs(loss["weighted_cross_entropy"] - loss["cross_entropy"]) > 0.01 * loss["cross_entropy"]


def test_the_table_reports_what_eval_wrote_on_the_test_split(ablated):
    _, out = ablated
    main_table, per_class = (out / "ablation.md").read_text().split("IoU of every class:")
    rows = [line for line in main_table.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == list(ABLATION.VARIANTS)
    per_class_rows = [line for line in per_class.splitlines() if line.startswith("| ")][1:]
    assert len(per_class_rows) == len(ABLATION.VARIANTS)
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        report = json.loads((out / cells[0] / "eval_test" / "metrics.json").read_text())
        assert report["split"] == "test"
        metrics, names = report["metrics"], report["class_names"]
        figures = [metrics["miou"], metrics["mean_accuracy"], metrics["pixel_accuracy"],
                   metrics["iou"][names.index("line")], metrics["iou"][names.index("square")]]
        assert cells[1:6] == ["-" if value is None else f"{100 * value:.1f}" for value in figures]
        assert cells[6].endswith(" min")
        cells = [cell.strip() for cell in per_class_rows[rows.index(row)].strip("|").split("|")]
        assert cells[1:] == ["-" if value is None else f"{100 * value:.1f}" for value in metrics["iou"]]


def test_a_finished_variant_is_read_back_not_retrained(ablated, monkeypatch, capsys):
    config, out = ablated
    before = (out / "ablation.md").read_text()

    def refuse(script, *arguments):
        raise AssertionError(f"{script.name} ran again")

    monkeypatch.setattr(ABLATION, "_call", refuse)
    ABLATION.main(["--config", str(config), "--out", str(out), "--rare", "line", "square"])
    assert (out / "ablation.md").read_text() == before
    assert before.strip() in capsys.readouterr().out


def test_an_unknown_rare_class_is_named(ablated, monkeypatch):
    config, out = ablated
    with pytest.raises(SystemExit, match="'Pole'"):
        ABLATION.main(["--config", str(config), "--out", str(out), "--only", "focal", "--rare", "Pole"])


def test_calibrated_rows_report_the_test_split_with_the_calibration_fitted_on_val(ablated, monkeypatch):
    config, out = ablated
    monkeypatch.setattr(ABLATION, "_call", call_in_process)
    monkeypatch.setitem(IN_PROCESS, "calibrate", load_tool("calibrate"))
    ABLATION.main(["--config", str(config), "--out", str(out), "--only", "cb_focal", "--rare", "line", "--calibrate"])
    rows = [line for line in (out / "ablation.md").read_text().split("IoU of every class:")[0].splitlines()
            if line.startswith("| ")][1:]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == ["cb_focal", "cb_focal + calibration"]
    report = json.loads((out / "cb_focal" / "eval_test" / "metrics.json").read_text())
    calibration = report["calibrated"]["calibration"]
    assert calibration["split"] == "val" and report["split"] == "test"  # fitted on val, scored on test
    cells = [cell.strip() for cell in rows[1].strip("|").split("|")]
    assert cells[1] == f"{100 * report['calibrated']['metrics']['miou']:.1f}"
    assert cells[-1] == f"{100 * calibration['cross_fitted']:.1f}"  # the fit's metric is mIoU
