"""``mask2former serve``: a local web page and JSON API around a :class:`~mask2former.Predictor`."""

from .app import SegmentationServer, create_app, make_server, serve
from .batching import BatchingPredictor
from .service import ApiError, SegmentationService

__all__ = ["ApiError", "BatchingPredictor", "SegmentationServer", "SegmentationService", "create_app", "make_server",
           "serve"]
