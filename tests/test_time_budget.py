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
    """perf_counter() for time_budget: 10 s at the first call, 3 s more at each later one."""

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
    # Training starts at 10 s on the fake clock; 0.15 min = 9 s are spent by the decision -> stop after step 3.
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
    callback.on_step_end(trainer, 1, None)  # 13 s: step 1 is not timed (warm-up); the clock starts here
    assert trainer.config.solver.max_iter == 10
    callback.on_step_end(trainer, 2, None)  # 16 s: 3 s per step
    assert time_budget.EVAL_COST_PER_TRAIN_IMAGE == 0.55 and trainer.config.solver.batch_size == 2
    evaluation = 2 * 0.55 * 3 / 2  # val images * fraction * seconds per step / batch size
    expected = 2 + int((60 - 16 - evaluation) // 3)
    assert trainer.config.solver.max_iter == expected == 16
    # The lr schedule is the poly schedule of the new max_iter: (1 - step/16)^0.9 times the linear warm-up.
    solver = trainer.config.solver
    assert isinstance(solver, SolverConfig) and solver.warmup_iters == 20 and solver.warmup_factor == 0.01
    warmup = 0.01 * (1 - 12 / 20) + 12 / 20
    assert trainer.scheduler.lr_lambdas[0](12) == pytest.approx(warmup * (1 - 12 / 16) ** solver.poly_power)
