"""What goes to the terminal while Airflow runs in this process: file-descriptor redirections.

Airflow and the task logs write to fds 1/2 directly; these helpers point them elsewhere while
keeping a handle on the real terminal for airfed's own lines.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO


@contextmanager
def output_to_log(log_path: Path) -> Iterator[TextIO]:
    """Send everything written to fds 1/2 (Airflow, task logs) to ``log_path``; yield the terminal."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(1), "w", buffering=1)
    with open(log_path, "ab") as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            terminal.close()


@contextmanager
def stdout_to_stderr() -> Iterator[TextIO]:
    """Point fd 1 at stderr (Airflow's logging); yield a file on the real stdout for the command's output."""
    sys.stdout.flush()
    saved = os.dup(1)
    out = os.fdopen(os.dup(saved), "w")
    os.dup2(2, 1)
    try:
        yield out
    finally:
        out.flush()
        out.close()
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
