"""Run ``ncm`` and SIGKILL it at one named write point: a test helper for the crash tests.

    python tests/crashpoint.py WHEN:FILE N ncm-args...

WHEN is ``before`` or ``after``; FILE is a file name written by a rename (``best.safetensors``,
``last.safetensors``, ``result.json``) or ``metrics.jsonl`` (an appended line). The process
kills itself (SIGKILL: no handler, no cleanup) at the N-th such write, before or after it.
"""

import os
import signal
import sys
from pathlib import Path


def main() -> None:
    point, nth, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    when, _, target = point.partition(":")
    assert when in ("before", "after"), point
    seen = [0]

    def hit() -> None:
        seen[0] += 1
        if seen[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)

    def around(write):
        def wrapped(*a, **k):
            if when == "before":
                hit()
            out = write(*a, **k)
            if when == "after":
                hit()
            return out

        return wrapped

    from ncmcli import storage
    from ncmcli.runs import runfiles

    if target == "metrics.jsonl":
        runfiles.append_line = around(runfiles.append_line)
    else:
        real_replace = os.replace

        def replace(src, dst, *a, **k):
            if Path(dst).name != target:
                return real_replace(src, dst, *a, **k)
            return around(real_replace)(src, dst, *a, **k)

        storage.os.replace = replace  # storage's rename is the one every atomic write makes
    from ncmcli.cli import run

    sys.exit(run(args))


if __name__ == "__main__":
    main()
