"""Progress bars that tell the truth: one per stage, its own clock, counted in the units the work is made of."""

from __future__ import annotations

import sys

from tqdm import tqdm


class _Bar(tqdm):
    """A bar whose fractional steps land exactly on its total: summed floats otherwise end a hair short of it,
    or past it."""

    def update(self, n: float = 1) -> bool | None:
        if self.total is not None and abs(self.total - (self.n + n)) < 1e-6:
            n = self.total - self.n
        return super().update(n)


def progress(total: float, desc: str, unit: str, quiet: bool = False, fractional: bool = False) -> tqdm:
    """A bar on stderr. ``fractional``: the count moves in fractions of a unit (a prompt a denoising step at a
    time) and shows one decimal."""
    count = "{n:.1f}/{total:.0f}" if fractional else "{n_fmt}/{total_fmt}"
    return _Bar(
        total=total, desc=desc, unit=unit, disable=quiet, file=sys.stderr, dynamic_ncols=True,
        bar_format="{l_bar}{bar}| " + count + " {unit} [{elapsed}<{remaining}]",
    )  # fmt: skip
