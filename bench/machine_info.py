"""What the benchmark reports say about where they ran: the CPU model and the git revision.

Light on purpose (standard library only): every benchmark driver imports it.
"""

from __future__ import annotations

import platform
import re
import subprocess
from pathlib import Path

_BENCH_DIR = Path(__file__).resolve().parent


def cpu_model() -> str:
    """The CPU's model name from `lscpu` (else `platform.processor()`, else "unknown CPU")."""
    model = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        found = re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE)
        model = found.group(1).strip() if found else model
    except (OSError, subprocess.CalledProcessError):
        pass
    return model


def revision() -> str:
    """The checked-out commit (`git describe --always --dirty`: dirty means uncommitted
    changes anywhere in the checkout), or "unknown"."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
            cwd=_BENCH_DIR,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()
