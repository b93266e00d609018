"""Exceptions raised by mmprune (all ``ValueError`` subclasses, so callers can catch one type)."""


class UnsupportedModelError(ValueError):
    """The model is not one of the families mmprune has an adapter for.

    Example:
        >>> import mmprune, torch
        >>> try:
        ...     mmprune.wrap(torch.nn.Linear(2, 2), "fastv")
        ... except mmprune.UnsupportedModelError as e:
        ...     print(str(e).split(";")[0])
        unsupported model Linear (model_type=None)
    """
