"""ghost-buildpackd: runs Ghost's container steps (image builds, buildpacks) in LXD containers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ghost-buildpackd")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
