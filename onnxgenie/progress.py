"""Progress bars on a terminal only: where stderr is a log (CI, a pipe, a file) the bars stay off and
the one summary line per stage that the pipeline prints is what the log gets."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: int, enabled: bool = True, **kw):
    """A tqdm bar on stderr, disabled when ``enabled`` is false or stderr is not a terminal."""
    return tqdm(total=total, disable=not (enabled and stderr_is_terminal()), file=sys.stderr,
                dynamic_ncols=True, **kw)


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False
