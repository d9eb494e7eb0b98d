"""Progress displays for long work a person waits for (size sweeps, checkpoint loading), on tqdm.

Shown only on a terminal (stderr is a TTY) and only for work that lasts: the
bar appears after ``delay`` seconds, so short runs and logs, pipes and CI
output stay clean.
"""
from __future__ import annotations

import sys
from typing import Any, Optional


def bar(total: Optional[int] = None, desc: str = "", unit: str = "it", enabled: bool = True,
        delay: float = 2.0) -> Any:
    """A tqdm bar on stderr; disabled off a terminal or when ``enabled`` is false."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, delay=delay, mininterval=0.5,
                disable=not (enabled and sys.stderr.isatty()), dynamic_ncols=True)
