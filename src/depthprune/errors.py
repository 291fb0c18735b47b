"""Errors depthprune raises on bad input. Each message says what was wrong and what to do."""


class DepthpruneError(Exception):
    """Base class of depthprune's own errors."""


class UnsupportedArchitectureError(DepthpruneError, ValueError):
    """The model's architecture has no registered adapter."""


class PlanError(DepthpruneError, ValueError):
    """A layer plan is malformed or does not fit the model."""


class OutputExistsError(DepthpruneError, FileExistsError):
    """An output folder exists (or is the source folder) and overwriting was not asked for."""


class ModelLoadError(DepthpruneError, OSError):
    """A model could not be found or loaded."""


class RouterError(DepthpruneError, ValueError):
    """Layer-skipping routers that do not fit the model, or settings out of range (depth target, threshold)."""
