"""Mask2Former, MaskFormer and MP-Former universal image segmentation in plain PyTorch."""

from .config import Config, ModelConfig, load_config
from .data.label_space import LabelSpace
from .inference.predictor import Predictor
from .modeling.model import Mask2Former, Mask2FormerOutput

__version__ = "0.1.0"
__all__ = ["Config", "LabelSpace", "Mask2Former", "Mask2FormerOutput", "ModelConfig", "Predictor", "load_config"]
