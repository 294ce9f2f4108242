"""Mask expansion throughput (one core): raw cipher, expand_mask, apply_masks.

Run: python bench/privacy/mask_expansion.py
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedloom.privacy.masking import apply_masks, expand_mask
from machine_info import cpu_model, revision

N_BYTES = 64 << 20
D = 1_660_000
K = 14


def best(fn: Callable[[], object], reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    seed = bytes(range(32))
    buf = np.zeros(N_BYTES, np.uint8)
    rows = []
    for name, mk in (
        ("chacha20", lambda: Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None)),
        ("aes-ctr", lambda: Cipher(algorithms.AES(seed), modes.CTR(bytes(16)))),
    ):
        t = best(lambda mk=mk: mk().encryptor().update_into(buf.data, buf.data))
        rows.append((f"raw {name} (64 MiB)", N_BYTES / t / 1e9))
    for cipher in ("chacha20", "aes-ctr"):
        t = best(lambda c=cipher: expand_mask(seed, N_BYTES // 4, cipher=c))
        rows.append((f"expand_mask {cipher} (64 MiB)", N_BYTES / t / 1e9))
    seeds = [bytes([i]) * 32 for i in range(K)]
    vec = np.zeros(D, np.uint32)
    for cipher in ("chacha20", "aes-ctr"):
        t = best(lambda c=cipher: apply_masks(vec, seeds[:7], seeds[7:], cipher=c), reps=3)
        rows.append((f"apply_masks {cipher} ({K} masks x {D})", K * D * 4 / t / 1e9))
    print(f"date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}")
    print(f"machine: {cpu_model()}, 1 core")
    print(f"revision: {revision()}")
    print("command: python bench/privacy/mask_expansion.py\n")
    print("| measurement | GB/s |\n|---|---|")
    for label, gbs in rows:
        print(f"| {label} | {gbs:.2f} |")


if __name__ == "__main__":
    main()
