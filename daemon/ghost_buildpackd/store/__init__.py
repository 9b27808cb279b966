"""MongoDB adapter: the only module that talks to MongoDB.

Ghost's collections (`jobs`, `apps`) are read; the one Ghost field written is
`apps.build_infos.container_image`. The daemon's own state lives beside them:
`container_steps` (one record per step, with its lease), `container_images`
(what each published image is), `buildpackd_state` (event checkpoints),
`buildpackd_instances` (heartbeats) and `buildpackd_base_images` (the base
images Ghost's UI offers, read by Ghost's patched `libs/lxd.py`). What a step is (kinds, states, the
`Step` record) and who may move it where is `model.py`'s; the queries here
that move steps take their from-states from its transition table.

Datetimes the daemon writes are set on insert, inside a sub-document, or with
`$currentDate` (server time), never as a bare `$set` of a top-level datetime:
all three are plain MongoDB and keep the BSON date type on every server.

Leases are reckoned on the server's clock (`server_now`: the server's time read
from its `hello` reply, carried forward by this host's monotonic clock), so a
host whose clock is skewed, or steps, neither steals a healthy lease nor keeps
an expired one. Writes that decide who holds a step and what its outcome is
use majority write concern, so a replica-set failover cannot roll back an
acknowledged claim or outcome.

The store is one `Store` composed of a part per collection and concern, each in
its own module; they share the database handle and the collections
(`connection.Connection`), so a test that swaps `store.steps` swaps it for all.

| module | what |
|---|---|
| connection.py | the client, collections, error codes, `retry_transient`, redaction |
| clock.py | the server's clock (`server_now`) |
| jobs.py | Ghost's jobs and apps, the jobs change stream, catch-up batches (`JobBatch`) |
| steps.py | step records: create, read, watch, `move` and the holder's fenced writes |
| leases.py | claims, leases, renewals, the `max_prepared` count |
| requests.py | requests, the cancel protocol, the sweep's expiry, replay |
| images.py | image records, the base-image list |
| instances.py | heartbeats, instance records |
| checkpoints.py | event checkpoints |
"""

from __future__ import annotations

from .checkpoints import Checkpoint, Checkpoints
from .clock import ServerClock
from .connection import (
    BASE_IMAGES,
    BASE_IMAGES_ID,
    MAJORITY,
    TRANSIENT_ERRORS,
    ServerInTransition,
    connect,
    described,
    in_transition,
    redacted_uri,
    retry_transient,
    short_error,
    utcnow,
)
from .images import BaseImage, ImageRecord, Images
from .instances import Instances
from .jobs import CATCH_UP_BATCH, JOB_EVENT_FIELDS, JobBatch, Jobs, next_change
from .leases import Leases
from .requests import StepRequests
from .steps import EPOCH, FREE_LEASE, new_step_doc, step_from_doc

__all__ = [
    "BASE_IMAGES",
    "BASE_IMAGES_ID",
    "CATCH_UP_BATCH",
    "EPOCH",
    "FREE_LEASE",
    "JOB_EVENT_FIELDS",
    "MAJORITY",
    "TRANSIENT_ERRORS",
    "BaseImage",
    "Checkpoint",
    "ImageRecord",
    "JobBatch",
    "ServerClock",
    "ServerInTransition",
    "Store",
    "connect",
    "described",
    "in_transition",
    "new_step_doc",
    "next_change",
    "redacted_uri",
    "retry_transient",
    "short_error",
    "step_from_doc",
    "utcnow",
]


class Store(Jobs, Leases, StepRequests, Images, Instances, Checkpoints):
    """Every MongoDB read and write the daemon, its CLI and the Ghost-side client make."""
