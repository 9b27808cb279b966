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

# --- The storage pool a new LXD gets -------------------------------------------------------------
# On btrfs a container is a snapshot of its image or template; on `dir` it is a full copy of its
# files (seconds for a Debian image; docs/figures.md). So a new LXD gets btrfs on a loop file when
# the kernel has it, `dir` otherwise or when the operator asks (GBP_STORAGE_DRIVER=dir). A pool
# that exists is never changed.
#
# The loop file's size is a fifth of the free disk where LXD keeps its data, between 5 and 50 GiB
# (LXD's own default is a fifth, 5 to 30 GiB). The file is sparse: the size is a ceiling, not what
# it takes now. A fifth leaves the rest of the disk to what lives outside the pool (LXD's image
# tarballs, Ghost's working copies and logs), so a full pool does not fill the host's disk; 5 GiB
# holds a few Debian images and their templates; 50 GiB, many images and templates, each
# container adding only what it writes. Another size: create the pool first (`lxc storage create
# default btrfs size=100GiB`; LXD 5.0.2 stores a later `size=` but does not grow the file). Under
# 10 GiB free even the smallest pool would claim half of what is left: `dir` then, which shares
# the host's filesystem instead of reserving part of it.
STORAGE_MIN_GIB=5
STORAGE_MAX_GIB=50
STORAGE_MIN_FREE_GIB=10
GIB=$((1 << 30))

# Free bytes (what an unprivileged writer may use, as df's "Avail") of the filesystem holding $1,
# or its nearest existing parent (LXD's directory may not exist before LXD's first start).
free_bytes() {
  local path=$1
  while [ ! -e "$path" ]; do path=$(dirname "$path"); done
  df -B1 --output=avail "$path" | tail -n 1 | tr -d ' '
}

kernel_has_btrfs() {
  grep -qw btrfs /proc/filesystems || { command -v modprobe >/dev/null && modprobe -n btrfs 2>/dev/null; }
}

# Decides the new pool's driver and size: sets pool_driver (btrfs|dir), pool_size ("20GiB", btrfs
# only) and pool_why (the reason, for the log). Installs btrfs-progs unless $1 is "plan".
choose_storage_pool() {
  local mode=${1:-create} wanted=${GBP_STORAGE_DRIVER:-} lxd_dir=${GBP_LXD_DIR:-/var/lib/lxd} free free_gib size_gib
  pool_driver=dir pool_size="" pool_why=""
  free=$(free_bytes "$lxd_dir") || { log "cannot read the free disk under $lxd_dir (df)"; return 1; }
  free_gib=$((free / GIB))
  case $wanted in
    dir) pool_why="dir: GBP_STORAGE_DRIVER=dir"; return ;;
    "" | btrfs) ;;
    *) log "GBP_STORAGE_DRIVER=$wanted: unknown storage driver (dir or btrfs; unset: btrfs when the kernel has it)"
       return 2 ;;
  esac
  if ! kernel_has_btrfs; then
    pool_why="dir: the kernel has no btrfs (not in /proc/filesystems, no module)"
  elif [ "$free_gib" -lt "$STORAGE_MIN_FREE_GIB" ]; then
    pool_why="dir: free disk ${free_gib}GiB, under the ${STORAGE_MIN_FREE_GIB}GiB a btrfs loop file needs"
  else
    size_gib=$((free / 5 / GIB))
    [ "$size_gib" -ge "$STORAGE_MIN_GIB" ] || size_gib=$STORAGE_MIN_GIB
    [ "$size_gib" -le "$STORAGE_MAX_GIB" ] || size_gib=$STORAGE_MAX_GIB
    pool_driver=btrfs pool_size=${size_gib}GiB
    pool_why="btrfs on a ${pool_size} loop file; free disk ${free_gib}GiB"
    if ! command -v mkfs.btrfs >/dev/null; then
      if [ "$mode" = plan ]; then
        pool_why+="; btrfs-progs to be installed"
      elif ! apt_install btrfs-progs || ! command -v mkfs.btrfs >/dev/null; then
        pool_driver=dir pool_size=""
        pool_why="dir: btrfs-progs (mkfs.btrfs) could not be installed"
      fi
    fi
  fi
  if [ "$wanted" = btrfs ] && [ "$pool_driver" != btrfs ]; then
    log "GBP_STORAGE_DRIVER=btrfs, but ${pool_why#dir: }"
    return 2
  fi
}

# Creates storage pool $GBP_STORAGE_POOL (default: default) when LXD has none of that name, on the
# driver choose_storage_pool picks, and gives profile `default` a root disk on it when that profile
# has none. `ensure_storage_pool --plan` prints the decision and changes nothing.
ensure_storage_pool() {
  local pool=${GBP_STORAGE_POOL:-default} mode=create existing
  [ "${1:-}" != --plan ] || mode=plan
  if existing=$(lxc storage show "$pool" 2>/dev/null); then
    [ "$mode" = create ] || log "storage pool '$pool' exists ($(sed -n 's/^driver: //p' <<<"$existing")): kept"
    return 0
  fi
  choose_storage_pool "$mode" || return
  if [ "$mode" = plan ]; then
    log "would create storage pool '$pool' ($pool_why)"
    default_profile_has_root_disk || log "would give profile 'default' a root disk on pool '$pool'"
    return 0
  fi
  log "creating storage pool '$pool' ($pool_why)"
  lxc storage create "$pool" "$pool_driver" ${pool_size:+size="$pool_size"} >/dev/null
  # An operator's root disk stays where it is.
  if ! default_profile_has_root_disk; then
    log "profile 'default': root disk on pool '$pool'"
    lxc profile device add default root disk path=/ pool="$pool" >/dev/null
  fi
}

default_profile_has_root_disk() {
  local devices
  devices=$(lxc profile device show default 2>/dev/null) || return 1  # read whole: a grep -q in a pipe races SIGPIPE
  grep -q "^root:" <<<"$devices"
}
