"""solver.time_budget_minutes: max_iter chosen from timed iterations (training/time_budget.py)."""

import pytest
import torch
import yaml

from mask2former.apps.train import run_train
from mask2former.config import load_config
from mask2former.training import time_budget
from mask2former.training.time_budget import planned_iterations

from test_train import TINY


def test_planned_iterations_hand_computed():
    # 600 s budget, 100 s spent, 20 steps done at 2 s each, 2 evaluations of 30 s: (600 - 100 - 60) / 2 = 220 more.
    assert planned_iterations(600, 100, 20, 2.0, 30, 2) == 240
    # Already over budget: stop after the next step rather than never.
    assert planned_iterations(60, 100, 20, 2.0, 30, 1) == 21


class FakeClock:
    """perf_counter() for time_budget: the command starts at 0, training at 10 s, then 3 s per call."""

    def __init__(self) -> None:
        self.calls = 0

    def perf_counter(self) -> float:
        self.calls += 1
        return 10.0 if self.calls == 1 else 10.0 + 3.0 * (self.calls - 1)


def test_budget_sets_max_iter_schedule_and_config(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(time_budget, "time", FakeClock())

    class ProbingTwoSteps(time_budget.TimeBudget):  # the command "started" at 0 on the fake clock
        def __init__(self, minutes, started):
            super().__init__(minutes, 0.0, probe_steps=2)

    monkeypatch.setattr(time_budget, "TimeBudget", ProbingTwoSteps)
    # Training clock at 10 s, decision after 2 steps at 13 s: 1.5 s per step; evaluating 2 val images ~0.9 s;
    # 0.15 min = 9 s are already spent -> stop after the next step (3).
    config = load_config("fashion_scenes_lite0", TINY + [f"train.output_dir={tmp_path}", "solver.max_iter=50",
                                                         "solver.time_budget_minutes=0.15"])
    result = run_train(config, resume=False)
    assert result["step"] == 3
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["solver"]["max_iter"] == 3 and saved["solver"]["time_budget_minutes"] == 0.15
    # --resume reads the chosen max_iter and does not choose again.
    resumed = load_config(str(tmp_path / "config.yaml"), [])
    assert run_train(resumed, resume=True)["step"] == 3


def test_budget_grows_max_iter_and_rebuilds_the_lr_schedule(monkeypatch):
    from mask2former.config import SolverConfig

    class Stub:  # just what the callback reads and writes
        pass

    trainer = Stub()
    trainer.config = load_config("fashion_scenes_lite0", TINY + ["solver.max_iter=10", "train.eval_period=0"])
    trainer.val_dataset = [None] * 2
    trainer.device = torch.device("cpu")
    trainer.is_main = False
    trainer.step = 0
    trainer.log = Stub()
    trainer.log.progress = None
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    from mask2former.training.optim import build_scheduler

    trainer.scheduler = build_scheduler(optimizer, trainer.config.solver)
    clock = FakeClock()
    monkeypatch.setattr(time_budget, "time", clock)
    callback = time_budget.TimeBudget(1.0, started=0.0, probe_steps=2)
    callback.on_train_start(trainer)  # 10 s
    callback.on_step_end(trainer, 1, None)  # still probing: no decision, no clock read
    assert trainer.config.solver.max_iter == 10
    callback.on_step_end(trainer, 2, None)  # 13 s: 1.5 s/step, eval 2 * 0.6 * 1.5 / 2 = 0.9 s
    expected = 2 + int((60 - 13 - 0.9) // 1.5)
    assert trainer.config.solver.max_iter == expected == 32
    # The lr schedule is the poly schedule of the new max_iter: after the 20 warm-up steps, (1 - step/32)^0.9.
    solver = trainer.config.solver
    assert isinstance(solver, SolverConfig) and solver.warmup_iters == 20
    assert trainer.scheduler.lr_lambdas[0](25) == pytest.approx((1 - 25 / 32) ** solver.poly_power)
