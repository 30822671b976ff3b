"""Progress bars that suit both a terminal and a batch job's log file."""

from __future__ import annotations

import sys

# A bar over videos that moves in fractions of a video as its frames are decoded (extract_features' `progress`), so
# it shows a rate and an ETA from the first chunk on: the count with one decimal.
VIDEO_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total_fmt} videos [{elapsed}<{remaining}{postfix}]"


def progress_bar(**kwargs):
    """A tqdm bar on stderr. On a terminal it redraws at most ten times a second; when stderr is a file or
    a pipe (a cluster job's log) it writes a line at most once a minute, so logs stay small.
    Postfixes should be set with `refresh=False`, which leaves the redraw to this rate."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(mininterval=0.1 if tty else 60.0, dynamic_ncols=tty, **kwargs)
