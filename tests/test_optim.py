import math

import pytest
import torch
from conftest import tiny_swin_config
from torch import nn

from mask2former.config import BackboneConfig, ModelConfig, SolverConfig
from mask2former.modeling.model import Mask2Former
from mask2former.training.optim import (
    build_optimizer,
    build_param_groups,
    build_scheduler,
    clip_grad_norm,
    milestone_iterations,
    parameter_settings,
)

BASE = 1e-4


@pytest.fixture(scope="module")
def swin_model():
    torch.manual_seed(0)
    return Mask2Former(tiny_swin_config(dec_layers=2, enc_layers=1))


def test_parameter_settings_hand_checked(swin_model):
    settings = parameter_settings(swin_model, SolverConfig())
    backbone, head = BASE * 0.1, BASE
    expected = {
        # Swin: norms and the relative position bias table are not decayed; linear weights and biases are.
        "backbone.body.patch_embed.norm.weight": (backbone, 0.0),
        "backbone.body.layers.0.blocks.0.norm1.bias": (backbone, 0.0),
        "backbone.body.layers.0.blocks.0.attn.relative_position_bias_table": (backbone, 0.0),
        "backbone.body.layers.0.blocks.0.attn.qkv.weight": (backbone, 0.05),
        "backbone.body.layers.0.blocks.0.attn.qkv.bias": (backbone, 0.05),
        "backbone.body.patch_embed.proj.weight": (backbone, 0.05),
        "backbone.body.norms.3.weight": (backbone, 0.0),
        # Pixel decoder: level_embed is a plain nn.Parameter, decayed as in the reference; GroupNorm/LayerNorm exempt.
        "pixel_decoder.level_embed": (head, 0.05),
        "pixel_decoder.input_proj.0.1.weight": (head, 0.0),  # GroupNorm
        "pixel_decoder.input_proj.0.0.weight": (head, 0.05),  # the 1x1 conv
        "pixel_decoder.encoder.0.norm1.weight": (head, 0.0),
        "pixel_decoder.encoder.0.self_attn.sampling_offsets.weight": (head, 0.05),
        # Transformer decoder: the three nn.Embedding tables exempt; class_embed is a Linear despite its name.
        "transformer_decoder.query_feat.weight": (head, 0.0),
        "transformer_decoder.query_embed.weight": (head, 0.0),
        "transformer_decoder.level_embed.weight": (head, 0.0),
        "transformer_decoder.heads.class_embed.weight": (head, 0.05),
        "transformer_decoder.heads.decoder_norm.weight": (head, 0.0),
        "transformer_decoder.layers.0.cross_attn.in_proj_weight": (head, 0.05),
    }
    for name, value in expected.items():
        assert settings[name] == pytest.approx(value), name
    # Every trainable parameter exactly once.
    assert sorted(settings) == sorted(name for name, p in swin_model.named_parameters() if p.requires_grad)


def test_param_groups_by_lr_and_decay(swin_model):
    groups = build_param_groups(swin_model, SolverConfig())
    keys = sorted((g["lr"], g["weight_decay"]) for g in groups)
    assert keys == sorted([(BASE * 0.1, 0.0), (BASE * 0.1, 0.05), (BASE, 0.0), (BASE, 0.05)])
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in swin_model.parameters() if p.requires_grad)
    optimizer = build_optimizer(swin_model, SolverConfig(betas=(0.8, 0.95)))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(group["betas"] == (0.8, 0.95) for group in optimizer.param_groups)


def test_weight_decay_classes_follow_the_reference(swin_model):
    """The reference's build_optimizer with distinct values per class: Swin position tables get 0.0 outright, norms
    weight_decay_norm, nn.Embedding modules weight_decay_embed, every other parameter (the pixel decoder's
    level_embed included) weight_decay."""
    solver = SolverConfig(weight_decay=0.05, weight_decay_norm=0.01, weight_decay_embed=0.02)
    settings = {name: wd for name, (_, wd) in parameter_settings(swin_model, solver).items()}
    expected = {
        "backbone.body.layers.0.blocks.0.attn.relative_position_bias_table": 0.0,
        "backbone.body.layers.0.blocks.0.norm1.weight": 0.01,
        "backbone.body.layers.0.blocks.0.mlp.fc1.weight": 0.05,
        "pixel_decoder.level_embed": 0.05,
        "pixel_decoder.input_proj.0.1.bias": 0.01,
        "pixel_decoder.encoder.0.linear1.weight": 0.05,
        "pixel_decoder.encoder.0.norm2.bias": 0.01,
        "pixel_decoder.mask_features.bias": 0.05,
        "transformer_decoder.query_feat.weight": 0.02,
        "transformer_decoder.query_embed.weight": 0.02,
        "transformer_decoder.level_embed.weight": 0.02,
        "transformer_decoder.heads.decoder_norm.bias": 0.01,
        "transformer_decoder.layers.0.cross_attn.in_proj_bias": 0.05,
    }
    for name, value in expected.items():
        assert settings[name] == pytest.approx(value), name
    # Only those three classes leave the default, by module type or (position tables) by name.
    modules = dict(swin_model.named_modules())
    for name, value in settings.items():
        owner = modules[name.rpartition(".")[0]]
        if isinstance(owner, (nn.LayerNorm, nn.GroupNorm)):
            assert value == pytest.approx(0.01), name
        elif isinstance(owner, nn.Embedding):
            assert value == pytest.approx(0.02), name
        elif "relative_position_bias_table" not in name:
            assert value == pytest.approx(0.05), name

    class WithAbsolutePosition(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, 4, 2))
            self.label_embed = nn.Embedding(3, 2)

    assert parameter_settings(WithAbsolutePosition(), solver) == {
        "absolute_pos_embed": (BASE, 0.0), "label_embed.weight": (BASE, 0.02)}


def test_batchnorm_exempt_and_frozen_bn_has_no_parameters():
    solver = SolverConfig()
    trainable = Mask2Former(ModelConfig(num_classes=3, backbone=BackboneConfig(name="resnet18", freeze_bn=False),
                                        hidden_dim=32, conv_dim=32, mask_dim=32, num_heads=2, num_queries=4,
                                        dim_feedforward=32, enc_layers=1, enc_ffn_dim=32, dec_layers=1))
    settings = parameter_settings(trainable, solver)
    assert settings["backbone.body.bn1.weight"] == pytest.approx((BASE * 0.1, 0.0))
    assert settings["backbone.body.conv1.weight"] == pytest.approx((BASE * 0.1, 0.05))
    frozen = Mask2Former(ModelConfig(num_classes=3, backbone=BackboneConfig(name="resnet18", freeze_bn=True),
                                     hidden_dim=32, conv_dim=32, mask_dim=32, num_heads=2, num_queries=4,
                                     dim_feedforward=32, enc_layers=1, enc_ffn_dim=32, dec_layers=1))
    assert not any(".bn1." in name for name in parameter_settings(frozen, solver))


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))
        self.query_feat = nn.Embedding(5, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)


def test_grouped_adamw_equals_one_group_per_parameter():
    """The reference's one-group-per-parameter AdamW and our grouped one make the same updates."""
    solver = SolverConfig(base_lr=1e-2)
    torch.manual_seed(0)
    model_a, model_b = _Small(), _Small()
    model_b.load_state_dict(model_a.state_dict())
    grouped = build_optimizer(model_a, solver)
    params_b = dict(model_b.named_parameters())
    per_parameter = torch.optim.AdamW(
        [{"params": [params_b[name]], "lr": lr, "weight_decay": wd}
         for name, (lr, wd) in parameter_settings(model_b, solver).items()], lr=solver.base_lr)
    assert len(per_parameter.param_groups) == 9 and len(grouped.param_groups) == 4
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for pa, pb in zip(model_a.parameters(), model_b.parameters()):
            grad = torch.randn(pa.shape, generator=generator)
            pa.grad, pb.grad = grad.clone(), grad.clone()
        grouped.step()
        per_parameter.step()
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-7, msg=name)
    # The settings really differ between parameters (else the test would be vacuous).
    assert {g["weight_decay"] for g in grouped.param_groups} == {0.0, 0.05}


def _lrs(solver: SolverConfig, steps: list[int]) -> dict[int, float]:
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=solver.base_lr)
    scheduler = build_scheduler(optimizer, solver)
    seen = {}
    for step in range(max(steps) + 1):
        if step in steps:
            seen[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    return seen


def test_poly_schedule_with_warmup_hand_computed():
    solver = SolverConfig(base_lr=1.0, scheduler="poly", poly_power=0.9, max_iter=100, warmup_iters=10,
                          warmup_factor=0.1)
    lrs = _lrs(solver, [0, 5, 10, 50, 99, 100])
    assert lrs[0] == pytest.approx(0.1)  # warm-up factor x (1 - 0)^0.9
    assert lrs[5] == pytest.approx((0.1 * 0.5 + 0.5) * 0.95 ** 0.9)
    assert lrs[10] == pytest.approx(0.9 ** 0.9)
    assert lrs[50] == pytest.approx(0.5 ** 0.9)
    assert lrs[99] == pytest.approx(0.01 ** 0.9)
    assert lrs[100] == 0.0


def test_step_schedule_fractions_and_absolute_milestones():
    solver = SolverConfig(base_lr=2.0, scheduler="step", steps=(0.5, 0.75), gamma=0.1, max_iter=100,
                          warmup_iters=4, warmup_factor=0.5)
    lrs = _lrs(solver, [0, 2, 4, 49, 50, 74, 75, 99])
    assert lrs[0] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(2.0 * (0.5 * 0.5 + 0.5))
    assert lrs[4] == pytest.approx(2.0)
    assert lrs[49] == pytest.approx(2.0)
    assert lrs[50] == pytest.approx(0.2)
    assert lrs[74] == pytest.approx(0.2)
    assert lrs[75] == pytest.approx(0.02)
    assert lrs[99] == pytest.approx(0.02)
    # The reference's COCO milestones as absolute iterations.
    assert milestone_iterations((327778, 355092), 368750) == (327778, 355092)
    assert milestone_iterations((0.5, 0.75), 100) == (50, 75)
    with pytest.raises(ValueError, match="increasing"):
        milestone_iterations((0.8, 0.5), 100)


def test_scheduler_state_dict_resumes_exactly():
    solver = SolverConfig(base_lr=1e-3, scheduler="poly", max_iter=50, warmup_iters=5, warmup_factor=0.01)
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=solver.base_lr)
    scheduler = build_scheduler(optimizer, solver)
    for _ in range(17):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    optimizer_state = optimizer.state_dict()
    continued = []
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        continued.append(optimizer.param_groups[0]["lr"])
    param2 = nn.Parameter(torch.zeros(1))
    optimizer2 = torch.optim.SGD([param2], lr=solver.base_lr)
    scheduler2 = build_scheduler(optimizer2, solver)
    optimizer2.load_state_dict(optimizer_state)
    scheduler2.load_state_dict(state)
    resumed = []
    for _ in range(10):
        optimizer2.step()
        scheduler2.step()
        resumed.append(optimizer2.param_groups[0]["lr"])
    assert resumed == continued


def test_unknown_scheduler_and_optimizer_rejected(swin_model):
    with pytest.raises(ValueError, match="solver.scheduler"):
        build_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), SolverConfig(scheduler="cosine"))
    with pytest.raises(ValueError, match="solver.optimizer"):
        build_optimizer(swin_model, SolverConfig(optimizer="lamb"))


def test_clip_is_full_model_over_all_groups():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    # Two groups: clipping each group separately would give a different result.
    optimizer = torch.optim.AdamW([{"params": model[0].parameters()},
                                   {"params": list(model[1].parameters()) + list(model[2].parameters())}])
    grads = [torch.randn(p.shape) * (10.0 if i == 0 else 0.1) for i, p in enumerate(model.parameters())]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    norm = clip_grad_norm(optimizer, 0.01)
    reference = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(reference, grads):
        p.grad = g.clone()
    expected_norm = torch.nn.utils.clip_grad_norm_(reference, 0.01)
    assert float(norm) == pytest.approx(float(expected_norm), rel=1e-6)
    for p, r in zip(model.parameters(), reference):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=1e-12)
    total = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    assert total == pytest.approx(0.01, rel=1e-4)
    # Group-wise clipping would leave the small second group almost untouched instead.
    second_group_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads[2:]))
    assert second_group_norm > 0.01


def test_clip_disabled_only_measures():
    p = nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    assert float(clip_grad_norm([p], 0.0)) == pytest.approx(5.0)
    assert p.grad.tolist() == [3.0, 4.0, 0.0]
