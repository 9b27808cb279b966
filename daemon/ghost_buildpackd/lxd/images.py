"""Image operations: listings, lookups by alias or fingerprint, pulls from another LXD, aliases, publish.

They carry out calls and never decide which image a step uses (`images.py`
does, outside the adapter).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import requests
from pylxd.exceptions import LXDAPIException, NotFound

from ..logs import get_logger
from .connection import Connection
from .errors import ImagePullFailed, LxdError, retry_lxd
from .records import ImageInfo

log = get_logger(__name__)


class ImageOperations(Connection):
    """The images of the LXD server."""

    @staticmethod
    def _image_info(item: Mapping[str, Any]) -> ImageInfo:
        """An image as LXD's API describes it."""
        return ImageInfo(
            fingerprint=item["fingerprint"],
            aliases=tuple(alias["name"] for alias in item.get("aliases") or []),
            properties=dict(item.get("properties") or {}),
            size=int(item.get("size") or 0),
            created_at=str(item.get("created_at") or item.get("uploaded_at") or ""),
        )

    def _image(self, fingerprint: str) -> ImageInfo:
        """One image by its full fingerprint; NotFound when there is none."""
        return self._image_info(self.client.api.images[fingerprint].get().json()["metadata"])

    @retry_lxd
    def list_images(self) -> list[ImageInfo]:
        """Every image in one API call (recursion=1).

        Fetching each image in turn would break half-way on an image deleted
        meanwhile (by another step, another daemon); one call cannot.
        """
        found = self.client.api.images.get(params={"recursion": "1"}).json()["metadata"] or []
        return [self._image_info(item) for item in found]

    @retry_lxd
    def image_by_alias(self, alias: str) -> ImageInfo | None:
        try:
            return self._image(self.client.api.images.aliases[alias].get().json()["metadata"]["target"])
        except NotFound:
            return None

    @retry_lxd
    def image_by_fingerprint(self, fingerprint: str) -> ImageInfo | None:
        try:
            return self._image(fingerprint)
        except NotFound:
            return None

    def pull_image(self, server: str, key: str, ref: str) -> ImageInfo:
        """Copy the image whose `key` (`fingerprint` or `alias`) is `ref` from the LXD at `server`, over LXD's protocol.

        LXD keeps the copy under the same fingerprint. ImagePullFailed says why when it fails.
        """
        source = {"type": "image", "mode": "pull", "protocol": "lxd", "server": server, key: ref}
        log.info("image_pull_started", server=server, **{key: ref})
        try:
            response = self.client.api.images.post(json={"public": False, "auto_update": False, "source": source})
            operation = self._wait_operation(response, f"pulling {key} {ref} from {server}")
            return self._image(operation["metadata"]["fingerprint"])
        except (LXDAPIException, LxdError, requests.RequestException) as error:
            log.warning("image_pull_failed", server=server, image=ref, error=str(error))
            raise ImagePullFailed(str(error)) from error

    @retry_lxd
    def delete_alias(self, alias: str) -> None:
        with contextlib.suppress(NotFound):
            self.client.api.images.aliases[alias].delete()

    @retry_lxd
    def delete_alias_if(self, alias: str, fingerprint: str) -> bool:
        """Delete `alias` only while it points at `fingerprint`; whether it was deleted.

        LXD has no conditional delete of an alias: between this read and the
        delete lies one round trip, not the caller's whole pause.
        """
        try:
            target = self.client.api.images.aliases[alias].get().json()["metadata"]["target"]
            if target != fingerprint:
                return False
            self.client.api.images.aliases[alias].delete()
        except NotFound:
            return False
        return True

    @retry_lxd
    def move_alias_if(self, alias: str, fingerprint: str, expected: str) -> bool:
        """Point `alias` at `fingerprint` only while it points at `expected` (LXD checks the alias's ETag)."""
        try:
            current = self.client.api.images.aliases[alias].get()
        except NotFound:
            return False
        alias_info = current.json()["metadata"]
        if alias_info["target"] != expected:
            return False
        body = {"target": fingerprint, "description": alias_info.get("description") or ""}
        try:
            self.client.api.images.aliases[alias].put(json=body, headers={"If-Match": current.headers["ETag"]})
        except LXDAPIException as error:
            if error.response.status_code in (404, 412):  # gone, or changed since the read
                return False
            raise
        return True

    @retry_lxd
    def delete_image(self, fingerprint: str) -> None:
        with contextlib.suppress(NotFound):
            self._wait_operation(self.client.api.images[fingerprint].delete(), f"deleting image {fingerprint[:12]}")

    @retry_lxd
    def point_alias(self, alias: str, fingerprint: str, description: str = "") -> None:
        """Create `alias` or move it to `fingerprint`."""
        try:
            self.client.api.images.aliases[alias].put(json={"target": fingerprint, "description": description})
        except NotFound:
            self.client.api.images.aliases.post(json={"name": alias, "target": fingerprint, "description": description})

    def publish(self, name: str, properties: Mapping[str, str], compression: str) -> ImageInfo:
        """Publish a stopped container as a private image (no alias yet)."""
        response = self.client.api.images.post(
            json={
                "public": False,
                "source": {"type": "instance", "name": name},
                "properties": {key: str(value) for key, value in properties.items()},
                "compression_algorithm": compression,
            }
        )
        operation = self._wait_operation(response, f"publishing {name}")
        return self._image(operation["metadata"]["fingerprint"])
