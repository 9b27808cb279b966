"""Event intake: see every job change and turn it into step records, exactly once.

Two sources feed one `Intake` (intake.py):
- `ChangeStreamSource` (change_stream.py) watches `jobs` (replica sets, sharded
  clusters) and persists the resume token only after the event became step records;
- `PollSource` (poll.py) queries jobs by `_updated` behind a persisted high-water
  mark (standalone servers, like Ghost's own docker-compose).
Both run a catch-up scan when they start, and the change-stream source again
whenever its token is no longer usable, so no job is lost to an outage, a
restart or a lost oplog position. Step ids are deterministic and handling a
job is idempotent: reading the same job twice is harmless. Which source runs,
and the loop both share, are in source.py.
"""

from .change_stream import CHECKPOINT_EVERY, STREAM_ENDING, TOKEN_UNUSABLE, ChangeStreamSource
from .intake import COMMANDS, JOB_ENDED, RQ_TIMEOUT, Intake, JobRecords, job_end_reason
from .poll import PollSource, clamp_to_clock
from .source import Source, StartupError, choose_event_mode

__all__ = [
    "CHECKPOINT_EVERY",
    "COMMANDS",
    "JOB_ENDED",
    "RQ_TIMEOUT",
    "STREAM_ENDING",
    "TOKEN_UNUSABLE",
    "ChangeStreamSource",
    "Intake",
    "JobRecords",
    "PollSource",
    "Source",
    "StartupError",
    "choose_event_mode",
    "clamp_to_clock",
    "job_end_reason",
]
