"""experiments/convergence.py: arms, run order, timing from metrics.jsonl, and the summary on made-up results
(hand-computed values; no training)."""

from __future__ import annotations

import math

import pytest

from mask2former.config import load_config

from conftest import load_experiment


@pytest.fixture(scope="module")
def convergence():
    return load_experiment("convergence", "convergence")


def test_arms_are_the_presets(convergence, tmp_path):
    config = {arm: convergence.arm_config(arm, 1, tmp_path) for arm in convergence.DEFAULT_ARMS}
    default = load_config("fashion_scenes_lite0")
    assert config["m2f_piloting"].mask_piloting == default.mask_piloting and default.mask_piloting.enabled
    assert not config["m2f"].mask_piloting.enabled and config["m2f"].model.query_pos
    # MP-Former as released = the default recipe + no query positional embedding (+ piloting, already on)
    assert config["mp_former"].mask_piloting.enabled and not config["mp_former"].model.query_pos
    assert config["mp_former"].solver == default.solver and config["mp_former"].loss == default.loss
    assert config["maskformer_decoder"].model.transformer_decoder == "standard"
    assert not config["maskformer_decoder"].mask_piloting.enabled
    assert config["maskformer_decoder"].model.pixel_decoder == default.model.pixel_decoder
    for arm, c in config.items():
        assert (c.train.seed, c.train.eval_period, c.train.checkpoint_period) == (1, 100, 100), arm
        assert (c.solver.max_iter, c.solver.batch_size, c.data.num_val_images) == (1100, 4, 200), arm
        assert c.data == default.data, arm
    smoke = convergence.arm_config("m2f", 0, tmp_path, smoke=True)
    assert smoke.solver.max_iter == convergence.SMOKE_ITERS and smoke.data.num_val_images == convergence.SMOKE_VAL


def test_run_order_is_seed_first(convergence):
    assert convergence.run_order(["a", "b"], [0, 1]) == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]


def test_curve_and_timing_from_metrics_rows(convergence):
    # Two sessions: steps 1..40 (eval at 20 inside the window 20->40), resumed at 40, then 40..60 and the final eval.
    rows = [
        {"step": 1, "step_time": 2.0},
        {"step": 20, "step_time": 0.5},  # 19 iterations: 9.5 s
        {"step": 20, "eval": {"PQ": 10.0, "PQ_th": 1.0, "AP": 2.0, "mIoU": 30.0}, "eval_seconds": 4.0},
        {"step": 40, "step_time": 0.7},  # 20 iterations: 14 s, 4 of them the evaluation at 20
        {"step": 41, "step_time": 3.0},  # after the resume
        {"step": 50, "skipped": True},  # a skipped update: no window
        {"step": 60, "step_time": 0.5},  # 19 iterations: 9.5 s
        {"step": 60, "eval": {"PQ": 40.0, "PQ_th": 20.0, "AP": 9.0, "mIoU": 50.0}, "eval_seconds": 6.0},
    ]
    curve, timing = convergence.curve_and_timing(rows)
    assert [p["step"] for p in curve] == [20, 60] and curve[1]["PQ"] == 40.0 and curve[0]["PQ_st"] is None
    windows = 2.0 + 9.5 + 14.0 + 3.0 + 9.5
    assert timing["train_seconds"] == pytest.approx(windows - 4.0)
    assert timing["loop_seconds"] == pytest.approx(windows + 6.0)
    assert timing["seconds_per_iteration"] == pytest.approx((windows - 4.0) / 60)
    assert timing["seconds_per_evaluation"] == pytest.approx(5.0)


def test_clean_step_time_skips_first_and_busy_windows(convergence):
    rows = [{"step": 1, "step_time": 5.0}, {"step": 2, "step_time": 0.7}, {"step": 3, "step_time": 0.8},
            {"step": 3, "eval": {"PQ": 1.0}, "eval_seconds": 2.0}, {"step": 4, "step_time": 0.1},
            {"step": 5, "step_time": 0.9}]
    # step 2 follows the session's first iteration, step 4 holds the evaluation at 3
    assert convergence.clean_step_time(rows) == pytest.approx(0.8)


def _result(arm, seed, pq, miou_l=0.5, util=0.4, layers=7, smoke=False):
    curve = [{"step": s, "PQ": pq * s / 300, "PQ_th": pq / 2 * s / 300, "PQ_st": 90.0, "AP": 30.0, "mIoU": 60.0}
             for s in (100, 200, 300)]
    return {"arm": arm, "seed": seed, "smoke": smoke, "max_iter": 300, "curve": curve, "final": curve[-1],
            "layer_consistency": {"mIoU_L": [miou_l] * (layers - 1), "Util": [util] * (layers - 1) + [1.0],
                                  "mean_mIoU_L": miou_l, "mean_Util": util},
            "timing": {"wall_seconds": 600.0, "seconds_per_iteration": 0.5, "seconds_per_evaluation": 16.0}}


def test_steps_to_and_difference(convergence):
    curve = _result("m2f", 0, 60.0)["curve"]  # PQ 20, 40, 60
    assert convergence.steps_to(curve, 40.0) == 200 and convergence.steps_to(curve, 61.0) is None
    a = [_result("x", s, v) for s, v in enumerate((60.0, 62.0, 64.0))]
    b = [_result("y", s, v) for s, v in enumerate((59.0, 59.0, 62.0))]
    d = convergence.difference(a, b, lambda r: r["final"]["PQ"])
    assert d["diff"] == pytest.approx(2.0) and d["paired"] == pytest.approx([1.0, 3.0, 2.0])
    assert d["se"] == pytest.approx(math.sqrt(4.0 / 3 + 3.0 / 3))
    assert "not resolved" not in convergence.difference_line("PQ", d)
    assert "not resolved (2 seeds)" in convergence.difference_line("PQ", convergence.difference(a[:2], b, lambda r: r["final"]["PQ"]))


def test_summarise_writes_tables_plots_and_keeps_the_reading(convergence, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    import json

    for seed in (0, 1):
        for arm, pq in (("m2f", 56.0), ("m2f_piloting", 60.0), ("mp_former", 59.0)):
            (results / f"{arm}_s{seed}.json").write_text(json.dumps(_result(arm, seed, pq + seed)))
        (results / f"maskformer_decoder_s{seed}.json").write_text(
            json.dumps(_result("maskformer_decoder", seed, 20.0, layers=6)))
    paths = convergence.Paths(False, runs_dir=str(tmp_path / "runs"), results_dir=str(results),
                              docs_dir=str(tmp_path / "docs"))
    document = convergence.summarise(paths)
    text = document.read_text()
    assert (tmp_path / "docs" / "convergence_curves.png").stat().st_size > 0
    assert (tmp_path / "docs" / "convergence_layers.png").stat().st_size > 0
    assert "not resolved (2 seeds)" in text
    # m2f: seeds end at PQ 56 / 57 (curves 1/3, 2/3, 1 of that): PQ 50 first at step 300 in both; 55 too
    row = next(line for line in text.splitlines() if line.startswith("| `m2f` | 2 |"))
    assert "| 56.5 ± 0.7 |" in row and "| 300 ± 0 | 300 ± 0 |" in row
    assert "never (0/2)" in next(line for line in text.splitlines() if line.startswith("| `maskformer_decoder` | 2 |"))
    assert "final PQ: +4.0 ± 0.7" in text and "final PQ: +3.0 ± 0.7" in text  # m2f_piloting, mp_former - m2f
    # a person's reading survives the next summarise
    document.write_text(text.replace("_To be written by a person after the runs._", "Claim 1 holds (example)."))
    assert "Claim 1 holds (example)." in convergence.summarise(paths).read_text()
    status = "\n".join(convergence.status_lines(paths))
    assert "done" in status and "missing" in status  # seed 2 of every arm
