"""Synchronised batch norm (``model.backbone.norm: SyncBN``) that also runs on the CPU.

torch's ``nn.SyncBatchNorm`` only synchronises CUDA/XPU tensors: in training under an initialised process group it
raises for CPU inputs, and DDP refuses to wrap it on the CPU. :class:`SyncBatchNorm` (a batch norm that is not an
``nn.SyncBatchNorm`` instance, so DDP accepts it) runs torch's implementation on other devices and its own CPU
(gloo) path: the
per-channel sum and count, then the sum of squared deviations from the global mean, are all-reduced with the
differentiable collectives of ``torch.distributed.nn``, so autograd's backward is the exact gradient of the
global-batch normalisation (the all-reduce's backward all-reduces the incoming gradients). Two passes (mean, then
centred squares) avoid the cancellation of ``E[x^2] - E[x]^2``.

:func:`convert_sync_batch_norm` swaps every batch norm of a model for it (sharing parameters and buffers, so an
optimiser built before keeps working), including timm's ``BatchNormAct2d`` (its ``drop``/``act`` kept).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import Tensor, nn

__all__ = ["SyncBatchNorm", "convert_sync_batch_norm"]


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch of all processes in training (see the module docstring); any input rank
    >= 2, like ``nn.SyncBatchNorm``. Without a process group it is plain batch norm."""

    # torch's synchronised forward (for non-CPU tensors) and its checks.
    _check_input_dim = nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels
    _torch_forward = nn.SyncBatchNorm.forward

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def forward(self, input: Tensor) -> Tensor:
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        if not (self.training and group is not None and dist.get_world_size(group) > 1):
            output = super().forward(input)  # plain batch norm (eval, or nothing to synchronise with)
        elif input.device.type == "cpu":
            output = self._cpu_sync_forward(input, group)
        else:
            output = self._torch_forward(input)
        return self._after_norm(output)

    def _after_norm(self, output: Tensor) -> Tensor:
        """Dropout and activation of a converted ``BatchNormAct2d`` (absent on a plain batch norm)."""
        if "drop" in self._modules:
            output = self.drop(output)
        if "act" in self._modules:
            output = self.act(output)
        return output

    def _cpu_sync_forward(self, input: Tensor, group) -> Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        dims = [0] + list(range(2, input.dim()))
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float()  # statistics in fp32 (as torch's CUDA SyncBN), output in the input's dtype
        count = x.new_tensor([x.numel() // x.shape[1]])
        sums = dist_nn.all_reduce(torch.cat([x.sum(dims), count]), group=group)
        total = sums[-1]
        if float(total) <= 1:
            raise ValueError(f"SyncBatchNorm: expected more than 1 value per channel over all processes when "
                             f"training, got input of size {list(input.shape)} on this process")
        mean = sums[:-1] / total
        centred = x - mean.view(shape)
        var = dist_nn.all_reduce((centred * centred).sum(dims), group=group) / total
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                unbiased = var.detach() * (total / (total - 1))
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        output = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        return output.to(input.dtype)


def _is_convertible(module: nn.Module) -> bool:
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return True
    try:
        from timm.layers.norm_act import BatchNormAct2d
    except ImportError:  # timm is a dependency; be lenient for a trimmed install
        return False
    return type(module) is BatchNormAct2d


def convert_sync_batch_norm(model: nn.Module, process_group=None) -> nn.Module:
    """Replace each ``BatchNorm{1,2,3}d`` / timm ``BatchNormAct2d`` in ``model`` by :class:`SyncBatchNorm` in
    place (same parameter and buffer tensors, same state-dict names); returns ``model`` (or the replacement when
    ``model`` itself is a batch norm). Other batch-norm subclasses raise: their forward is unknown here."""
    if isinstance(model, nn.modules.batchnorm._BatchNorm) and not isinstance(model, SyncBatchNorm):
        return _convert_one(model, "", process_group)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or isinstance(module, SyncBatchNorm):
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child,
                _convert_one(module, name, process_group))
    return model


def _convert_one(module: nn.modules.batchnorm._BatchNorm, name: str, process_group) -> SyncBatchNorm:
    if not _is_convertible(module):
        raise TypeError(f"model.backbone.norm=SyncBN: cannot convert {name or 'the model'} "
                        f"({type(module).__name__}) to SyncBatchNorm")
    converted = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, process_group)
    if module.affine:
        converted.weight, converted.bias = module.weight, module.bias
    converted.running_mean, converted.running_var = module.running_mean, module.running_var
    converted.num_batches_tracked = module.num_batches_tracked
    for extra in ("drop", "act"):  # timm's BatchNormAct2d
        if extra in module._modules:
            converted.add_module(extra, module._modules[extra])
    converted.train(module.training)
    return converted
