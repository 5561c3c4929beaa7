"""Reading another project's state dict into a sagan model (import-studiogan, import-biggan): every tensor taken
by name with its shape checked, and whatever is missing, misshapen or left over refused in one line."""

from __future__ import annotations

import torch

from sagan_cli.errors import UserError


def tensor_shape(state: dict, key: str, ndim: int, option: str, expected: str) -> tuple[int, ...]:
    """The shape of a tensor the layout needs, or a one-line refusal naming it."""
    if key not in state or state[key].ndim != ndim:
        found = f"shape {list(state[key].shape)}" if key in state else "nothing"
        raise UserError(f"{option} is not {expected}: {key!r} should be a {ndim}-d tensor, found {found}")
    return tuple(int(size) for size in state[key].shape)


class StateReader:
    """Takes tensors from one state dict by name, checking shapes; names what is missing or left over.
    `as_float`: every tensor comes back as float32 (else only floating ones do); `ignored`: suffixes of keys
    that may stay unread (BigGAN's `sv0`); `hint`: appended to the left-over refusal."""

    def __init__(self, state: dict[str, torch.Tensor], option: str, expected: str, *, as_float: bool = False,
                 ignored: tuple[str, ...] = (), hint: str = ""):
        self.state, self.option, self.expected, self.used = state, option, expected, set()
        self.as_float, self.ignored, self.hint = as_float, ignored, hint

    def has(self, key: str) -> bool:
        return key in self.state

    def get(self, key: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if key not in self.state:
            raise UserError(f"{self.option} is not {self.expected}: it has no {key!r}")
        value = self.state[key]
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise UserError(f"{self.option}: {key} has shape {list(value.shape)}, expected {list(shape)}: "
                            f"not {self.expected}")
        self.used.add(key)
        return value.float() if self.as_float or value.is_floating_point() else value

    def scalar(self, key: str) -> torch.Tensor:
        value = self.get(key)
        if value.numel() != 1:
            raise UserError(f"{self.option}: {key} has shape {list(value.shape)}, expected one number: "
                            f"not {self.expected}")
        return value.reshape(())

    def finish(self) -> None:
        left = sorted(key for key in set(self.state) - self.used if not key.endswith(self.ignored))
        if left:
            raise UserError(f"{self.option} has {len(left)} tensors sagan's model has no place for (first: "
                            f"{left[0]!r}); it is not {self.expected}{self.hint}")
