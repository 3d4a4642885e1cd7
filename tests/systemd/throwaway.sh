#!/bin/bash
# A throwaway real systemd (PID 1) for skactivate's end-to-end tests, on a
# machine whose own PID 1 need not be systemd.
#
# It boots the host's root filesystem under a tmpfs overlay with systemd-nspawn,
# with its own network namespace, the real dbus-daemon and journald, and a fresh
# bpffs at /sys/fs/bpf. Whatever runs inside may write anywhere; nothing of it
# reaches the host, and `down` leaves no process, mount, namespace, BPF pin or
# cgroup behind.
#
#   throwaway.sh up           boot, wait (bounded) until running; print and write
#                             $SD_STATE/env (SD_PID, NSPAWN_PID, SD_MACHINE)
#   throwaway.sh exec CMD...  run CMD in every namespace of it, with the caller's
#                             capabilities and no seccomp filter (use
#                             `systemd-run --wait --pipe` to run as a real unit).
#                             Files go in through stdin:
#                               throwaway.sh exec install -D -m 0755 /dev/stdin /usr/bin/x < x
#   throwaway.sh down         power off (bounded), kill what is left, remove the
#                             cgroups and the state directory
#
# Env: SD_STATE   state directory, one per instance (default:
#                 ${TMPDIR:-/tmp}/skactivate-systemd); instances with different
#                 state directories run side by side
#      SD_ROOT    boot this root file system (a Debian release made with
#                 packaging/release-root) instead of the host's, under the same
#                 tmpfs overlay: it is never written to, and several instances
#                 may boot it at once. Its /etc/systemd/system is its own (the
#                 overlay makes it writable), so what its packages enabled
#                 there (dbus-broker's dbus.service alias) stays in force.
#      SD_HOSTNET=1  share the host's network namespace instead of a private one
#      SD_BOOT_TIMEOUT  seconds to wait for `running` (default 60)
set -euo pipefail

D=${SD_STATE:-${TMPDIR:-/tmp}/skactivate-systemd}
case "$D" in /?*) ;; *) echo "SD_STATE must be an absolute path" >&2; exit 2 ;; esac
D=${D%/}
# Machine name, cgroup name: unique per state directory.
N=ska$(printf %s "$D" | cksum | cut -d' ' -f1)
MARK=.skactivate-throwaway
BOOT_TIMEOUT=${SD_BOOT_TIMEOUT:-60}

cgroup_dirs() { local h; for h in systemd unified; do echo "/sys/fs/cgroup/$h/$N"; done; }

# Remove this instance's cgroups, deepest first; retries while the kernel
# finishes reaping. Fails if one stays busy.
cg_clean() {
  local dir left=0 _
  for dir in $(cgroup_dirs); do
    [ -d "$dir" ] || continue
    for _ in $(seq 50); do
      find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null || true
      [ -d "$dir" ] || break
      sleep 0.1
    done
    [ -d "$dir" ] && { echo "throwaway: cgroup $dir still busy" >&2; left=1; }
  done
  return $left
}

# Running (not a zombie: nspawn is reparented to the host's init when `up`
# exits, and that init may reap it late).
alive() {
  local st
  [ -n "${1:-}" ] && st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) && [ "${st%% *}" != Z ]
}

# Wait up to $2 tenths of a second for process $1 to exit.
wait_gone() { local _; for _ in $(seq "$2"); do alive "$1" || return 0; sleep 0.1; done; ! alive "$1"; }

install_nspawn() {
  command -v systemd-nspawn >/dev/null && return 0
  # Serialised: tests boot several instances at once.
  local lockdir=/run/lock
  [ -d "$lockdir" ] || lockdir=/tmp
  exec 9>"$lockdir/skactivate-throwaway-apt.lock"
  flock -w 300 9
  if ! command -v systemd-nspawn >/dev/null; then
    echo "throwaway: installing systemd-container" >&2
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq >&2
    # Pinned to the installed systemd, or apt upgrades systemd itself.
    timeout 300 apt-get install -y -qq --no-install-recommends \
      "systemd-container=$(dpkg-query -W -f='${Version}' systemd)" >&2
  fi
  exec 9>&-
}

up() {
  if [ -e "$D/nspawn.pid" ] && alive "$(cat "$D/nspawn.pid")"; then
    echo "throwaway: $D is already up" >&2; exit 1
  fi
  install_nspawn
  mkdir -p "$D/root" "$D/units"
  touch "$D/$MARK"
  # sysinit, sockets, journald and dbus: what a service host needs, no more.
  cat > "$D/boot.target" <<'EOF'
[Unit]
Description=skactivate test boot target (sysinit + sockets + journald + dbus)
Requires=sysinit.target sockets.target
After=sysinit.target sockets.target
Wants=systemd-journald.service dbus.service
AllowIsolate=yes
EOF
  cg_clean || true
  local dir
  for dir in $(cgroup_dirs); do mkdir -p "$dir"; done
  local net=(--private-network)
  [ "${SD_HOSTNET:-}" = 1 ] && net=()
  # The host's root, with an empty admin unit directory bound over its own;
  # or SD_ROOT as it is, the boot target among the admin's units (a path
  # every release has, split /usr or not).
  local root=/ target=/usr/lib/systemd/system/skactivate-test-boot.target
  local units=(--bind="$D/units:/etc/systemd/system")
  if [ -n "${SD_ROOT:-}" ]; then
    [ -x "$SD_ROOT/bin/sh" ] || { echo "throwaway: SD_ROOT=$SD_ROOT is not a root file system" >&2; exit 1; }
    root=$(realpath "$SD_ROOT")
    target=/etc/systemd/system/skactivate-test-boot.target
    units=()
  fi
  # In the subshell: move into our own cgroups (nspawn --keep-unit uses the
  # current one; cgroup.kill on it ends everything), then a private mount
  # namespace with its own /run and a fresh bpffs, so pins never reach the
  # host's bpffs and vanish with the container.
  #   --system-call-filter=bpf  nspawn's seccomp allow-list leaves bpf() out
  #   --system-call-filter=pidfd_getfd  and pidfd_getfd() (register-pid)
  #   --capability=CAP_BPF      units restricted to CAP_BPF need it in the
  #                             container's bounding set (the kernel accepts
  #                             CAP_SYS_ADMIN for BPF, which nspawn keeps)
  #   --capability=CAP_PERFMON  likewise, for the proxy's program that reads
  #                             a segment's sequence number
  #   --private-network         own netns with lo; CAP_NET_ADMIN inside
  #   --bind=$D/units:/etc/systemd/system  an empty admin unit directory
  (
    for dir in $(cgroup_dirs); do echo $BASHPID > "$dir/cgroup.procs"; done
    export SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1
    exec unshare --mount --propagation private sh -c \
      'mount -t tmpfs tmpfs /run && mkdir /run/bpffs && mount -t bpf bpf /run/bpffs &&
       mount --bind "$1" "$0" && shift && exec "$@"' \
      "$D/root" "$root" systemd-nspawn --register=no --keep-unit --quiet -M "$N" -D "$D/root" \
      --volatile=overlay --system-call-filter=bpf --system-call-filter=pidfd_getfd \
      --capability=CAP_BPF --capability=CAP_PERFMON --bind=/run/bpffs:/sys/fs/bpf "${units[@]}" \
      --bind-ro="$D/boot.target:$target" \
      "${net[@]}" -b -- systemd.unit=skactivate-test-boot.target
  ) > "$D/console.log" 2>&1 < /dev/null &
  local np=$!
  echo "$np" > "$D/nspawn.pid"
  local pid="" _
  for _ in $(seq 300); do
    pid=$(pgrep -P "$np" -x systemd || true)
    [ -n "$pid" ] && [ -S "/proc/$pid/root/run/systemd/private" ] && break
    alive "$np" || break
    sleep 0.05
  done
  if [ -z "$pid" ] || [ ! -S "/proc/$pid/root/run/systemd/private" ]; then
    echo "throwaway: systemd did not come up; console:" >&2
    tail -n 40 "$D/console.log" >&2
    down >&2 || true
    exit 1
  fi
  printf 'SD_PID=%s\nNSPAWN_PID=%s\nSD_MACHINE=%s\n' "$pid" "$np" "$N" > "$D/env"
  local state
  state=$(timeout "$BOOT_TIMEOUT" nsenter -t "$pid" -a systemctl is-system-running --wait 2>&1 || true)
  if [ "$state" != running ]; then
    echo "throwaway: system is '$state', not running:" >&2
    timeout 10 nsenter -t "$pid" -a systemctl --no-pager --failed >&2 || true
    tail -n 40 "$D/console.log" >&2
    down >&2 || true
    exit 1
  fi
  cat "$D/env"
}

down() {
  [ -e "$D/$MARK" ] || { [ ! -e "$D" ] && return 0; echo "throwaway: $D is not a state directory" >&2; return 1; }
  local np="" SD_PID=""
  [ -e "$D/nspawn.pid" ] && np=$(cat "$D/nspawn.pid")
  # shellcheck disable=SC1091
  [ -e "$D/env" ] && . "$D/env"
  if alive "$np"; then
    # A clean poweroff first; then nspawn's own SIGTERM handling (it asks the
    # container to power off); then kill the whole cgroup.
    if [ -n "$SD_PID" ] && alive "$SD_PID"; then
      timeout 5 nsenter -t "$SD_PID" -a systemctl poweroff --no-block >/dev/null 2>&1 || kill -TERM "$np" 2>/dev/null || true
    else
      kill -TERM "$np" 2>/dev/null || true
    fi
    if ! wait_gone "$np" 150; then
      echo "throwaway: $N did not power off in 15 s; killing it" >&2
      echo 1 > "/sys/fs/cgroup/unified/$N/cgroup.kill" 2>/dev/null || kill -KILL ${SD_PID:+"$SD_PID"} "$np" 2>/dev/null || true
      wait_gone "$np" 50 || { echo "throwaway: nspawn $np survives SIGKILL" >&2; return 1; }
    fi
  fi
  cg_clean
  # The overlay, the bpffs and /run lived in the private mount namespace, gone
  # with its last process: nothing is mounted on $D.
  rm -rf --one-file-system "$D"
}

case "${1:-}" in
up) up ;;
exec) shift; [ -e "$D/env" ] || { echo "throwaway: $D is not up" >&2; exit 1; }
  # shellcheck disable=SC1091
  . "$D/env"; exec nsenter -t "$SD_PID" -a "$@" ;;
down) down ;;
*) sed -n '2,33p' "$0"; exit 2 ;;
esac
