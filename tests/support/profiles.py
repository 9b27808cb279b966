"""LXD profiles the tests make and remove; the daemon itself never changes a profile."""

from __future__ import annotations

from pylxd.exceptions import NotFound

from ghost_buildpackd.lxd import Lxd, retry_lxd


@retry_lxd
def profile_names(lxd: Lxd) -> list[str]:
    return [profile.name for profile in lxd.client.profiles.all()]


@retry_lxd
def delete_profile(lxd: Lxd, name: str) -> bool:
    """Delete profile `name`; False when there was nothing to delete."""
    try:
        lxd.client.profiles.get(name).delete()
    except NotFound:
        return False
    return True
