"""Participants (`run_participant`) in threads of the test process, for gRPC tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from fedloom.certs import PkiFiles
from fedloom.core.trainer import Trainer
from fedloom.runtime.participant import run_participant


@contextmanager
def participants(
    address: str, trainers: Mapping[str, Trainer], pki: PkiFiles, *, mutual: bool = True
) -> Iterator[None]:
    """Run one participant per trainer against `address` (each with its own certificate from
    `pki` when `mutual`, else trusting the CA only); stopped and joined on exit."""
    stop = threading.Event()
    threads = []
    for cid, trainer in trainers.items():
        kwargs: dict[str, object] = {"root_cert": pki.ca.read_bytes(), "stop": stop}
        if mutual:
            cert, key = pki.client_files(cid)
            kwargs.update(cert_chain=cert.read_bytes(), private_key=key.read_bytes())
        thread = threading.Thread(
            target=run_participant,
            args=(address, cid, trainer),
            kwargs={**kwargs, "log": lambda _: None},
        )
        thread.start()
        threads.append(thread)
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
