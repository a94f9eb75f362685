"""Progress bars of the experiments: ``tqdm.auto.tqdm`` where ``tqdm`` is installed
(the ``experiments`` extra), else a silent bar with the part of tqdm's interface the
experiments use (``update``, ``set_postfix_str``, ``write``, ``close``, ``set_lock``, a
context manager): it runs the same code without drawing anything, still prints what
``write`` is given, and says once, on standard error, how to get the bars.

Examples
--------
>>> from manifold_nets.experiments.progress import tqdm
>>> with tqdm(total=2, disable=True) as bar:
...     bar.update(2)
"""

from __future__ import annotations

import sys

__all__ = ["tqdm"]


class _Silent:
    """The part of tqdm's interface the experiments use, drawing nothing.

    ``write`` still prints (lines that a bar would have printed above itself), and the
    first bar that would have been shown prints one line naming the ``experiments`` extra.

    Parameters
    ----------
    *args, **kwargs
        As ``tqdm.tqdm``; only ``disable`` and ``file`` are read.

    """

    told = False

    def __init__(self, *args, disable: bool | None = False, file=None, **kwargs):
        self.disable = bool(disable)
        if not self.disable and not _Silent.told:
            _Silent.told = True
            print("(no progress bars: install tqdm, or manifold-nets[experiments])",
                  file=file or sys.stderr)

    def update(self, n: int = 1) -> None:
        """Nothing to draw."""

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """Nothing to draw."""

    def close(self) -> None:
        """Nothing to close."""

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def write(s: str, file=None, end: str = "\n") -> None:
        """Print ``s`` (what tqdm prints above its bars)."""
        print(s, file=file or sys.stdout, end=end)

    @staticmethod
    def set_lock(lock) -> None:
        """No bars, so no lock to share."""


try:
    from tqdm.auto import tqdm
except ImportError:  # the experiments extra is not installed
    tqdm = _Silent
