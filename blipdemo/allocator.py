"""The C heap of a long-running server: few malloc arenas, and free pages given back to the system.

glibc's malloc gives a thread that finds the heap busy an arena of its own, up to 8 per core. The app's work runs on
many threads (Gradio's and anyio's worker threads, the batch scheduler, the generation threads), and requests leave
the arenas with free but scattered pages: decoded uploads, painted overlays, the tensors of a forward. glibc keeps
those pages in the process, so its resident memory climbs although nothing is kept (``benchmarks/soak.py``: 16
arenas of 20–30 MB each on a 2-core machine). Two standard remedies for glibc servers: cap the arenas
(``MALLOC_ARENA_MAX``, set here with ``mallopt`` before the server's threads start) and call ``malloc_trim`` now and
then, which hands the free pages of every arena back to the system.

Only the app (``app.py``) uses this: the library leaves the heap of a process it is imported into alone. Where the C
library is not glibc (musl, macOS, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import threading
import time

M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not all(hasattr(libc, name) for name in ("mallopt", "malloc_trim", "gnu_get_libc_version")):
        return None
    return libc


_LIBC = _glibc()


def limit_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas at ``arenas`` (threads started later share them); False where not glibc. Call it
    before the server's threads start: arenas made already stay."""
    return _LIBC is not None and bool(_LIBC.mallopt(M_ARENA_MAX, int(arenas)))


def trim() -> bool:
    """Give the free pages of every malloc arena back to the system now (``malloc_trim(0)``: walks each arena under
    its lock, a few milliseconds); False where not glibc or nothing was given back."""
    return _LIBC is not None and bool(_LIBC.malloc_trim(0))


def keep_trimmed(every: float = 10.0) -> threading.Thread | None:
    """A daemon thread that trims every ``every`` seconds for the life of the process (None where not glibc)."""
    if _LIBC is None:
        return None

    def loop() -> None:
        while True:
            time.sleep(every)
            trim()

    thread = threading.Thread(target=loop, name="blipdemo-malloc-trim", daemon=True)
    thread.start()
    return thread
