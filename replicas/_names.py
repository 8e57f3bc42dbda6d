"""``did you mean`` hints for a name that is not there."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["nearest"]


def nearest(name: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``known``, else ``""``."""
    # 0.75: a slip of a letter or two (Modle, torch_mpl), not any name
    # sharing a few letters (no_such_module is not torch_models).
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""
