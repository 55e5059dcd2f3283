"""Constructor checks shared by the layers: messages show the offending value."""

from __future__ import annotations


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def head_dim(name: str, explicit: int | None, dim: int, heads: int) -> int:
    """``explicit`` if given, else ``dim // heads`` (which must divide evenly)."""
    if explicit is not None:
        return positive_int(name, explicit)
    if dim % heads:
        raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}) when {name} is not given")
    return dim // heads


def check_input(name: str, x: object, dim: int) -> None:
    """x must be a float tensor (b n dim)."""
    import torch

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor (b n d), got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must be (b n d) with d = {dim}, got shape {tuple(x.shape)}")
    if x.shape[-1] != dim:
        raise ValueError(f"{name} must have last dimension d = {dim}, got {x.shape[-1]} (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")


def check_token_mask(mask: object, batch: int, length: int, device) -> None:
    """mask: (b n) bool, True = a real token."""
    import torch

    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool Tensor (b n), got {type(mask).__name__}")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"mask must be (b n) = {(batch, length)}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool (True = real token), got {mask.dtype}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but the input is on {device}")
