"""The request id (app/telemetry/context.py): the client's when well formed, a new one otherwise."""

from __future__ import annotations

import re

import pytest

from app.telemetry.context import new_request_id, request_id_of


def test_new_ids_are_24_hex_characters_and_distinct() -> None:
    ids = {new_request_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(re.fullmatch(r"[0-9a-f]{24}", i) for i in ids)


@pytest.mark.parametrize(
    "sent", [b"4bf92f35-77b3-4da6-a3ce-929d0e0e4736", b"01J9ZQ3X", b"a", b"x" * 128, b"Root.1:ab/c+d=e_f-g"]
)
def test_a_well_formed_id_is_kept(sent: bytes) -> None:
    assert request_id_of([(b"host", b"h"), (b"x-request-id", sent)]) == sent.decode()


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(b"x-request-id", b"")],
        [(b"x-request-id", b"x" * 129)],
        [(b"x-request-id", b"two words")],
        [(b"x-request-id", b"line\r\nInjected: 1")],
        [(b"x-request-id", b'"quoted"')],
        [(b"x-request-id", "café".encode())],
        [(b"x-request-id", b"same"), (b"x-request-id", b"same")],
    ],
)
def test_anything_else_gets_a_new_id(headers: list[tuple[bytes, bytes]]) -> None:
    assert re.fullmatch(r"[0-9a-f]{24}", request_id_of(headers))
