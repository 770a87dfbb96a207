"""Typed configuration: dataclasses with the official Mask2Former YAML values as defaults, loaded from readable
YAML presets (``configs/*.yaml``, with ``_base_`` inheritance) plus ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent / "configs"
BACKBONE_NORMS = ("FrozenBN", "BN", "SyncBN")


@dataclass(frozen=True)
class SwinSpec:
    """The shape of a Swin variant (plain data, here so that the model and the weight converters share it)."""

    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int


SWIN_SPECS = {
    "swin_tiny": SwinSpec(96, (2, 2, 6, 2), (3, 6, 12, 24), 7),
    "swin_small": SwinSpec(96, (2, 2, 18, 2), (3, 6, 12, 24), 7),
    "swin_base": SwinSpec(128, (2, 2, 18, 2), (4, 8, 16, 32), 12),
    "swin_large": SwinSpec(192, (2, 2, 18, 2), (6, 12, 24, 48), 12),
}


@dataclass
class BackboneConfig:
    """``name``: a Swin variant (``swin_tiny``/``swin_small``/``swin_base``/``swin_large``) or a timm model with
    ``features_only`` support (``resnet50``, ``tf_efficientnet_lite0``, ...)."""

    name: str = "resnet50"
    # Start from ImageNet weights: those in ``weights`` when set, else the ones that ship offline (only
    # ``tf_efficientnet_lite0``; see interop/efficientnet_lite.py). False: random initialisation.
    pretrained: bool = False
    # ImageNet weights file used when ``pretrained``: torchvision/timm ResNet .pth/.safetensors, detectron2's
    # torchvision R-50.pkl, the official Swin .pth or Mask2Former's converted Swin .pkl (interop/backbone_weights.py).
    # A relative path is looked up in the working directory, then in $MASK2FORMER_WEIGHTS_DIR. Training refuses to
    # start without the file; building a model for inference does not need it.
    weights: str = ""
    # Batch norm of CNN backbones (detectron2's RESNETS.NORM): "FrozenBN" (running statistics, no parameters
    # trained: the reference's R50 COCO/ADE20K configs), "BN" (trainable, statistics of each process's batch) or
    # "SyncBN" (trainable, statistics of the global batch under DDP: the reference's Cityscapes configs).
    # "" = from the legacy ``freeze_bn``.
    norm: str = ""
    # Legacy switch, kept so older YAML and checkpoints load: true = FrozenBN, false = BN. After loading it mirrors
    # ``norm`` (``norm == "FrozenBN"``); giving both with different meanings is an error.
    freeze_bn: bool | None = None
    # detectron2's FREEZE_AT: 0 trains everything (the Mask2Former reference), 1 freezes the stem, k >= 2 the stem and
    # res2..res_k. Frozen stages need no backward, which is most of a CNN's training cost on CPU.
    freeze_at: int = 0
    drop_path_rate: float = 0.3
    # Extra constructor arguments, e.g. a tiny Swin: {"embed_dim": 32, "depths": [1, 1, 1, 1], ...}.
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        legacy = self.freeze_bn
        if not self.norm:
            self.norm = "BN" if legacy is False else "FrozenBN"
        if self.norm not in BACKBONE_NORMS:
            raise ConfigError(f"model.backbone.norm must be one of {', '.join(BACKBONE_NORMS)}, got {self.norm!r}")
        if legacy is not None and legacy != (self.norm == "FrozenBN"):
            raise ConfigError(f"model.backbone.freeze_bn={str(legacy).lower()} contradicts model.backbone.norm="
                              f"{self.norm}; set only norm")
        self.freeze_bn = self.norm == "FrozenBN"


@dataclass
class ModelConfig:
    num_classes: int = 133
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pixel_decoder: str = "msdeformattn"  # "msdeformattn" (Mask2Former) or "fpn" (MaskFormer)
    transformer_decoder: str = "masked"  # "masked" (Mask2Former) or "standard" (MaskFormer)
    hidden_dim: int = 256
    num_queries: int = 100
    num_heads: int = 8
    dim_feedforward: int = 2048
    # Decoder layers. The reference YAML says DEC_LAYERS: 10 = 9 layers + the prediction from the initial queries.
    dec_layers: int = 9
    mask_dim: int = 256
    conv_dim: int = 256
    enc_layers: int = 6
    enc_ffn_dim: int = 1024  # hard-coded in the reference pixel decoder
    enc_points: int = 4
    enc_dropout: float = 0.0
    # The reference runs the MSDeformAttn pixel decoder in fp32 with autocast off; false lets autocast (bf16/fp16)
    # lower its convs and linears (the sampling locations stay fp32 either way).
    pixel_decoder_fp32: bool = True
    dropout: float = 0.1  # only the standard (MaskFormer) decoder uses dropout
    enforce_input_proj: bool = False
    query_pos: bool = True  # MP-Former's released decoder drops the query positional embedding
    # MP-Former: build the piloting queries' label embedding (a training-only parameter). build_model sets it from
    # mask_piloting.enabled; it is part of the model config so that checkpoints load back with that parameter.
    mask_piloting: bool = False
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    size_divisibility: int = 32
    # The reference's sem_seg_postprocess_before_inference, as the model was trained: build_model sets it from
    # test (TestConfig.semantic_before_inference()), so that checkpoints carry it to Predictor(path).
    semantic_postprocess_before_inference: bool = False
    # Start training from a whole trained model (fine-tuning): our checkpoint folder, a transformers folder, a
    # detectron2 .pkl, a Hugging Face Hub id (org/name[@revision]) or a model-zoo name (interop/hub.py). The
    # architecture is then the checkpoint's (modeling/finetune.py says which fields the config keeps), the class head
    # follows the class names (interop/class_head.py). "" = the usual start (ImageNet backbone, the rest random).
    weights: str = ""


@dataclass
class LossConfig:
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    deep_supervision: bool = True
    mask_loss: str = "points"  # "points" (Mask2Former) or "full" (MaskFormer: focal 20 + dice 1 at full resolution)


@dataclass
class MaskPilotingConfig:
    """MP-Former (training only). Defaults follow the released recipe (run_50ep_no_noise_all_ly.sh)."""

    enabled: bool = False
    num_groups: int = 1
    label_noise: float = 0.2
    point_noise: float = 0.0
    all_layers: bool = True  # False: pilot only the initial prediction and the first three layers
    class_loss: bool = True  # False = mask-only piloting (DN_NO_LB)


@dataclass
class DataConfig:
    dataset: str = "fashion_scenes"  # data/build.py DATASETS: fashion_scenes, coco, ..., labelme, yolo, voc
    root: str = ""
    train_split: str = "train"
    val_split: str = "val"
    num_train_images: int = 2000
    num_val_images: int = 200
    image_size: int = 256
    seed: int = 0
    augmentation: str = "lsj"  # lsj | semantic | crop | none
    min_scale: float = 0.1
    max_scale: float = 2.0
    crop_size: tuple[int, int] = (256, 256)
    num_workers: int = 2
    val_fraction: float = 0.0  # > 0: hold this fraction of train_split out as validation (data/holdout.py)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SolverConfig:
    optimizer: str = "adamw"
    base_lr: float = 1e-4
    weight_decay: float = 0.05
    weight_decay_norm: float = 0.0
    weight_decay_embed: float = 0.0
    backbone_multiplier: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: str = "poly"  # poly | step
    poly_power: float = 0.9
    steps: tuple[float, ...] = (0.889, 0.963)  # step schedule milestones as fractions of max_iter
    gamma: float = 0.1
    warmup_iters: int = 0
    warmup_factor: float = 1.0
    clip_grad_norm: float = 0.01  # full-model L2 clip; load-bearing in the reference
    max_iter: int = 160000
    batch_size: int = 16
    accumulation_steps: int = 1
    precision: str = "fp32"  # fp32 | bf16 | fp16 | auto (bf16 where the device runs it natively, else fp32)
    # > 0: max_iter is chosen after 20 timed iterations so that the whole run fits this many minutes
    # (training/time_budget.py); the choice is printed and saved. 0: max_iter as given (reproducible).
    time_budget_minutes: float = 0.0


TASKS = ("panoptic", "instance", "semantic")
FREEZABLE_PARTS = ("backbone", "pixel_decoder")  # train.freeze  # what a model predicts and the evaluation scores


@dataclass
class TestConfig:
    task: str = "panoptic"  # one of TASKS
    object_mask_threshold: float = 0.8
    overlap_threshold: float = 0.8
    top_k: int = 100
    min_size: int = 800
    max_size: int = 1333
    # Semantic inference on mask logits already cropped and resized to the output size (True), or at the padded
    # input size with the K-channel result resized after (False). None: the reference's rule
    # (SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE or PANOPTIC_ON or INSTANCE_ON), i.e. True unless task is semantic.
    semantic_postprocess_before_inference: bool | None = None

    def semantic_before_inference(self) -> bool:
        """``semantic_postprocess_before_inference`` with None resolved from ``task``."""
        if self.semantic_postprocess_before_inference is not None:
            return self.semantic_postprocess_before_inference
        return self.task in ("panoptic", "instance")

    def predictor_options(self) -> dict[str, Any]:
        """The keyword arguments of ``Predictor`` / ``evaluate_model`` these settings fix (0 = no resize)."""
        return {
            "min_size": self.min_size or None,
            "max_size": self.max_size or None,
            "object_mask_threshold": self.object_mask_threshold,
            "overlap_threshold": self.overlap_threshold,
            "top_k": self.top_k,
            "semantic_postprocess_before_inference": self.semantic_before_inference(),
        }


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 42
    eval_period: int = 0  # 0: evaluate only at the end
    checkpoint_period: int = 500
    log_period: int = 20
    max_nonfinite_steps: int = 5
    # Parts of the model that do not train (training/freeze.py): any of FREEZABLE_PARTS. Frozen parameters get no
    # gradient and are not in the optimiser; their modules run in eval mode (batch norm statistics and dropout fixed).
    freeze: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [part for part in self.freeze if part not in FREEZABLE_PARTS]
        if unknown:
            raise ConfigError(f"train.freeze: unknown part {unknown[0]!r} (choose from {', '.join(FREEZABLE_PARTS)})")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mask_piloting: MaskPilotingConfig = field(default_factory=MaskPilotingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    test: TestConfig = field(default_factory=TestConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Label space (names, thing flags, dataset ids, colours) as LabelSpace.to_dict(); None = from the data set.
    labels: dict[str, Any] | None = None


class ConfigError(ValueError):
    pass


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {where + '.' if where else ''}{unknown[0]} (valid: {', '.join(sorted(names))})")
    kwargs = {key: _convert(hints[key], value, f"{where}.{key}" if where else key) for key, value in data.items()}
    return cls(**kwargs)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        return _convert(hint, value, where)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if hint is Any:
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        if len(args) > 1 and args[1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(item, v, where) for v in value)
    if origin in (list, dict):
        expected = list if origin is list else dict
        if not isinstance(value, expected):
            raise ConfigError(f"{where}: expected a {expected.__name__}, got {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads "2e-4" (no dot) as a string.
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) that ``from_dict`` reads back."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        # kwargs / labels are replaced whole; every other mapping (data.extra included) merges key by key, so
        # several data.extra.KEY=... overrides add up.
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in ("kwargs", "labels"):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve_preset(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    available = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("_")))
    raise ConfigError(f"config {str(name_or_path)!r} is neither a YAML file nor a preset (presets: {available})")


def _load_yaml_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if path in seen:
        raise ConfigError(f"{path}: circular _base_")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML ({str(error).splitlines()[0]})") from None
    base = data.pop("_base_", None)
    if base is None:
        return data
    base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
    return _merge(_load_yaml_tree(base_path, seen + (path,)), data)


def parse_override(text: str) -> dict:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    nested: dict = value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def load_config(name_or_path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a preset name (e.g. ``"fashion_scenes_lite0"``) or YAML path, then apply ``key=value`` overrides."""
    data: dict = _load_yaml_tree(resolve_preset(name_or_path)) if name_or_path else {}
    for override in overrides:
        data = _merge(data, parse_override(override))
    return from_dict(Config, data)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
