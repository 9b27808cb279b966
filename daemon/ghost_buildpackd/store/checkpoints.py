"""Event checkpoints (`buildpackd_state`): where event intake stands."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from .connection import Connection, retry_transient


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Where event intake stands: change-stream token and the time up to which jobs were seen."""

    resume_token: Mapping[str, Any] | None
    caught_up_at: datetime | None
    poll_high_water: datetime | None


class Checkpoints(Connection):
    """The intake's change-stream token and poll high water."""

    @retry_transient
    def load_checkpoint(self) -> Checkpoint:
        doc = self.state.find_one({"_id": "events"}) or {}
        stream, poll = doc.get("stream") or {}, doc.get("poll") or {}
        return Checkpoint(
            resume_token=stream.get("resume_token"),
            caught_up_at=stream.get("caught_up_at") or poll.get("caught_up_at"),
            poll_high_water=poll.get("high_water"),
        )

    @retry_transient
    def save_stream_checkpoint(self, resume_token: Mapping[str, Any] | None, caught_up_at: datetime) -> None:
        self.state.update_one(
            {"_id": "events"},
            {"$set": {"stream": {"resume_token": resume_token, "caught_up_at": caught_up_at}}},
            upsert=True,
        )

    @retry_transient
    def save_poll_checkpoint(self, high_water: datetime, caught_up_at: datetime) -> None:
        self.state.update_one(
            {"_id": "events"},
            {"$set": {"poll": {"high_water": high_water, "caught_up_at": caught_up_at}}},
            upsert=True,
        )
