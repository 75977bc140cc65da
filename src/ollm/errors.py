"""Errors with one-line messages; the CLI prints ``str(err)`` and exits non-zero."""

from __future__ import annotations


class OllmError(Exception):
    """Base class of every error ollm raises on purpose (bad input, budget, corrupt files)."""


class ModelNotFoundError(OllmError):
    """A model path does not exist or holds no model."""


class UnsupportedModelError(OllmError):
    """The model's architecture (HF ``model_type``) has no ollm implementation."""


class CorruptStoreError(OllmError):
    """A layer store or source file is truncated, corrupt or inconsistent."""


class BudgetError(OllmError):
    """A memory budget is too small for the model and request."""


class DeviceError(OllmError):
    """The requested device does not exist on this machine."""


class SizeParseError(OllmError, ValueError):
    """A size string such as ``8GiB`` could not be parsed."""


class WeightReadError(OllmError):
    """Reading a layer's weights failed (I/O error, short read, checksum mismatch)."""


class RequestError(OllmError, ValueError):
    """A request cannot run as given (an empty prompt, too few tokens to score, ...)."""


class ContextLengthError(RequestError):
    """A prompt is longer than the model's ``max_position_embeddings`` (with ``strict_context``)."""
