"""Making file permissions bite when the tests run as root.

Root reads and lists everything through the CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
capabilities; a command run under :data:`SETPRIV` has neither (nor can any program it starts
regain them), so a mode-000 folder or file is as unreadable to it as to any user.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

__all__ = ["SETPRIV", "no_access"]

SETPRIV = ["/usr/bin/setpriv", "--inh-caps", "-dac_override,-dac_read_search",
           "--bounding-set", "-dac_override,-dac_read_search"]


@contextlib.contextmanager
def no_access(*paths: Path):
    """``paths`` with mode 000 inside the block, their modes restored after it."""
    modes = [p.stat().st_mode for p in paths]
    for p in paths:
        p.chmod(0)
    try:
        yield
    finally:
        for p, mode in zip(paths, modes):
            p.chmod(mode)
