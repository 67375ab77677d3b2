"""The RESP that celeriac writes by hand for Redis, against the general packer."""

from __future__ import annotations

import pytest

from celeriac.redis_spare import lrem_last, packed


@pytest.mark.parametrize(
    ("key", "value"),
    [("celeriac.inflight.host.1.abc", b'{"body": "e30="}'), ("q\u00e9", b"\x00\r\n$3\r\n"), ("k", b"")],
)
def test_the_ack_command_is_what_the_general_packer_makes(key: str, value: bytes) -> None:
    assert lrem_last(key, value) == packed(("LREM", key, -1, value))


def test_packed_commands_are_bulk_strings_with_byte_lengths() -> None:
    expected = b"*4\r\n$3\r\nSET\r\n$3\r\nk\xc3\xa9\r\n$1\r\n7\r\n$1\r\nv\r\n"
    assert packed(("SET", "k\u00e9", 7, b"v")) == expected
