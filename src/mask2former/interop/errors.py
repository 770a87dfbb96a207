"""The error every reader of a checkpoint raises for a file it cannot take (one line naming the file and why)."""


class CheckpointError(ValueError):
    """A checkpoint file that is missing, malformed, unsafe, or does not fit the model."""


__all__ = ["CheckpointError"]
