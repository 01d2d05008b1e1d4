"""``runtime.convert.timestamp``: the same Timestamp as protobuf's own ``FromDatetime``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf import timestamp_pb2

from hivewire.services.runtime.convert import timestamp


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 12, 2, 8, 20, 1, 123456, tzinfo=UTC),
        datetime(2026, 12, 2, 8, 20, 1, 123456),  # naive: local time
        datetime(2026, 12, 2, 13, 20, 1, 999999, tzinfo=timezone(timedelta(hours=5))),
        datetime(1960, 5, 5, 1, 2, 3, 456789, tzinfo=UTC),  # before the epoch
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ],
)
def test_timestamp_is_what_from_datetime_gives(moment: datetime) -> None:
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(moment.astimezone(UTC))
    assert timestamp(moment) == expected
