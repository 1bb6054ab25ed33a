"""Typed load errors. Each names the tensor, the file and the layer it is about."""

from __future__ import annotations


class LoadError(Exception):
    """Base of every error loadfsm raises about weights, files or layers.

    Attributes ``tensor``, ``file`` and ``layer`` carry the names the message
    mentions, so callers can react without parsing text.
    """

    def __init__(self, message: str, *, tensor: str | None = None,
                 file: str | None = None, layer: str | None = None):
        where = [f"{key}={value!r}" for key, value in
                 (("tensor", tensor), ("file", file), ("layer", layer)) if value]
        super().__init__(f"{message} [{', '.join(where)}]" if where else message)
        self.tensor, self.file, self.layer = tensor, file, layer


class IllegalTransitionError(LoadError):
    """A trigger was fired in a state that does not allow it."""


class CorruptCheckpointError(LoadError):
    """A checkpoint file cannot be parsed, is truncated, or its index lies."""


class UnexpectedWeightError(LoadError):
    """The checkpoint (or a push) carries tensors no layer expects."""

    def __init__(self, message: str, *, names: list[str] | None = None, **where):
        super().__init__(message, **where)
        self.names = sorted(names or [])

    @classmethod
    def listing(cls, names, file: str | None = None) -> "UnexpectedWeightError":
        """One error listing every unexpected name, sorted."""
        names = sorted(names)
        return cls(f"{len(names)} tensor(s) match no parameter of the model: "
                   f"{', '.join(names)}", names=names, tensor=names[0], file=file)


class DuplicateWeightError(LoadError):
    """The same piece arrived twice, or two files carry the same tensor."""


class ShapeMismatchError(LoadError):
    """A tensor's shape does not fit the region of the parameter it feeds."""


class DtypeMismatchError(LoadError):
    """A tensor's dtype cannot be cast to the parameter's dtype."""


class NonFiniteWeightError(LoadError):
    """A weight holds NaN or Inf."""


class IncompleteLoadError(LoadError):
    """Layers expected pieces that never arrived.

    ``missing`` maps each such layer to its missing checkpoint names.
    """

    def __init__(self, message: str, *, missing: dict[str, list[str]], **where):
        super().__init__(message, **where)
        self.missing = missing

    @classmethod
    def listing(cls, missing: dict[str, list[str]],
                index: dict[str, str] | None = None) -> "IncompleteLoadError":
        """One error listing, per layer, the missing names (and the file an index
        promised for them)."""
        index = index or {}
        lines = []
        for layer, names in missing.items():
            shown = [f"{n} (index: {index[n]})" if n in index else n for n in names]
            lines.append(f"  {layer}: missing {', '.join(shown)}")
        return cls(f"{len(missing)} layer(s) did not receive all their pieces:\n"
                   + "\n".join(lines), missing=missing, layer=next(iter(missing)))


class PushError(LoadError):
    """A weight push failed; ``committed`` lists the layers that took new weights."""

    def __init__(self, message: str, *, committed: list[str], **where):
        super().__init__(message, **where)
        self.committed = committed


class ConcurrentPushError(PushError):
    """Another push into the same model is in progress; nothing was changed."""


class ModelStateError(LoadError):
    """The model cannot take this load as it is (loaded before with another scheme)."""


class UnsafeCheckpointPathError(CorruptCheckpointError):
    """A checkpoint names a file outside its directory, or one that is not a regular file."""


class CheckpointChangedError(CorruptCheckpointError):
    """A checkpoint file was truncated or rewritten by another writer during the load."""


class TraceOverwritesInputError(LoadError):
    """The trace path is a file the load reads; nothing was opened for writing."""


class BadWeightItemError(LoadError):
    """An iterable of weights yielded something other than a ``(str, Tensor)`` pair."""


class UnsupportedDeviceError(LoadError):
    """The target device cannot hold loaded weights (``meta``)."""


class InvalidScaleError(LoadError):
    """A pre-quantized weight's scale is zero or negative: its weight cannot be used."""
