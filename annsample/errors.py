"""Exceptions raised for bad user input, so the CLI can print one clean line for each."""


class AnnsampleError(Exception):
    """Base class for errors caused by user input (files, configs, flags, run folders).

    The CLI prints the message on one line and exits with status 2; library users can catch it.
    """


class DataError(AnnsampleError, ValueError):
    """A dataset file or interactions table is malformed."""


class ConfigError(AnnsampleError, ValueError):
    """A YAML config or a ``--set`` override is malformed."""


class SamplerError(AnnsampleError, ValueError):
    """A sampler cannot draw what was asked (e.g. a user has seen every item)."""


class ItemIndexError(AnnsampleError, ValueError):
    """An item index was asked for something it cannot do (nlist > N, non-finite embeddings)."""


class RunError(AnnsampleError):
    """A run folder is missing, incomplete, or would be overwritten."""


class CheckpointError(RunError):
    """A checkpoint cannot be resumed: none is readable, or it belongs to another config or catalog."""


class NumericalError(AnnsampleError, ArithmeticError):
    """Training produced NaN or inf (loss, gradients or embeddings); the last good checkpoint is kept."""
