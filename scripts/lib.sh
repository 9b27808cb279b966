# Sourced by the set-up scripts: one way to log and one way to install Debian packages.

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }

# Installs Debian packages; the package lists are refreshed at most once an hour,
# not once per script (scripts/test runs several that may install something).
APT_UPDATED_MARKER=/run/ghost-buildpackd-apt-updated
apt_install() {
  if [ -z "$(find "$APT_UPDATED_MARKER" -mmin -60 2>/dev/null)" ]; then
    apt-get update -qq
    touch "$APT_UPDATED_MARKER"
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
