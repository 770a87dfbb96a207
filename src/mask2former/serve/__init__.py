"""``mask2former serve``: a local web page and JSON API around a :class:`~mask2former.Predictor`."""

from .app import ApiError, SegmentationService, make_server, serve

__all__ = ["ApiError", "SegmentationService", "make_server", "serve"]
