# Sourced by scripts/kernel-matrix: fetches and caches the guest kernels,
# qemu and the guest kit through private apt configurations. Never touches
# /etc/apt: each suite gets its own sources list, lists and archive cache
# under $CACHE/apt/<name>, pointing at the mirror the host's apt uses.

# The host's mirrors, from its own apt configuration (one-line or deb822).
host_mirror() { # security|main
  local want=$1 uri rel
  apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Created-By: Packages' 2>/dev/null |
    sort -u | while read -r uri rel; do
      case $want:$rel in
      security:*-security | main:[a-z]*[a-z]) [[ $want = main && $rel = *-* ]] || { echo "${uri%/}"; break; } ;;
      esac
    done
}

# papt NAME ARGS...: apt-get/apt-cache with the private configuration NAME.
apt_opts() {
  local d=$CACHE/apt/$1
  echo -o "Dir::State=$d/state" -o "Dir::Cache=$d/cache" -o "Dir::Etc::SourceList=$d/sources.list" \
    -o "Dir::Etc::SourceParts=$d/sources.list.d" -o "APT::Get::List-Cleanup=0" \
    -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root" -o "Acquire::Languages=none" -o "APT::Architecture=amd64"
}
papt() { local n=$1 tool=$2; shift 2; # shellcheck disable=SC2046
  "$tool" $(apt_opts "$n") "$@"; }

# apt_setup NAME "URI SUITE" ...: writes the private sources list and
# updates its lists when they are missing, changed or a day old; sets
# APT_UPDATED=1 when it did (so cached packages are checked for new
# versions at most once a day). A failed update with usable lists is a
# warning: the cache still serves.
apt_setup() {
  local n=$1 d=$CACHE/apt/$1 line; shift
  APT_UPDATED=0
  mkdir -p "$d/state/lists/partial" "$d/cache/archives/partial" "$d/sources.list.d"
  : > "$d/sources.list.new"
  for line in "$@"; do
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${line%% *} ${line#* } main" >> "$d/sources.list.new"
  done
  if cmp -s "$d/sources.list.new" "$d/sources.list" && [ -e "$d/updated" ] &&
    [ -n "$(find "$d/updated" -mmin -1440)" ]; then
    rm -f "$d/sources.list.new"
    return 0
  fi
  mv "$d/sources.list.new" "$d/sources.list"
  if papt "$n" apt-get update -qq >&2; then
    touch "$d/updated"
    APT_UPDATED=1
  elif [ -e "$d/updated" ]; then
    log "warning: apt-get update failed for $d/sources.list; using the cached lists"
  else
    die "apt-get update failed for the private configuration $d/sources.list"
  fi
}

# download NAME DEST PKG...: apt-get download into DEST (cwd).
download() { local n=$1 dest=$2; shift 2; mkdir -p "$dest"
  (cd "$dest" && papt "$n" apt-get download -qq "$@" >&2) || die "apt-get download $* failed ($n)"; }

# The kernel packages of the suite's linux-image-amd64: its dependency
# chain of linux-image-*, linux-binary-*, linux-modules-* packages.
kernel_packages() { # NAME
  local n=$1 todo=linux-image-amd64 seen="" p dep
  while [ -n "$todo" ]; do
    p=${todo%% *}; [ "$todo" = "$p" ] && todo="" || todo=${todo#* }
    case " $seen " in *" $p "*) continue ;; esac
    seen="$seen $p"; [ "$p" = linux-image-amd64 ] || echo "$p"
    for dep in $(papt "$n" apt-cache show --no-all-versions "$p" 2>/dev/null | sed -n 's/^\(Pre-\)\?Depends: //p' |
      tr ',|' '\n\n' | sed 's/(.*//; s/ //g; s/:any$//'); do
      case $dep in linux-image-[0-9]* | linux-binary-* | linux-modules-[0-9]*) todo="$todo $dep" ;; esac
    done
    todo=${todo# }
  done
}

# fetch_kernel SPEC: caches kernels/SPEC (dpkg -x of the packages) and
# prints nothing; kernels/SPEC/.version holds the packages' versions.
fetch_kernel() {
  local spec=$1 suite mirror k=$CACHE/kernels/$1 pkgs stamp v
  suite=$(kernel_suite "$spec") || die "unknown kernel '$spec' (known: $KERNELS_ALL)"
  case $suite in *-security) mirror=$MIRROR_SECURITY ;; *) mirror=$MIRROR ;; esac
  apt_setup "$suite" "$mirror $suite"
  [ "$APT_UPDATED" = 0 ] && [ -f "$k/.version" ] && return 0
  pkgs=$(kernel_packages "$suite")
  [ -n "$pkgs" ] || die "no linux-image-amd64 in $suite at $mirror"
  stamp=$(for p in $pkgs; do echo "$p $(papt "$suite" apt-cache show --no-all-versions "$p" | sed -n 's/^Version: //p')"; done)
  if [ -f "$k/.version" ] && [ "$(cat "$k/.version")" = "$stamp" ]; then return 0; fi
  log "fetching kernel $spec from $suite: $(echo $pkgs)"
  # A new kernel replaces the cached one only once it is ready.
  rm -rf "$k.new" "$CACHE/debs/$spec"
  # shellcheck disable=SC2086
  download "$suite" "$CACHE/debs/$spec" $pkgs
  mkdir -p "$k.new"
  for v in "$CACHE/debs/$spec"/*.deb; do dpkg -x "$v" "$k.new"; done
  rm -rf "$CACHE/debs/$spec"
  prepare_kernel "$k.new"
  echo "$stamp" > "$k.new/.version"
  rm -rf "$k"
  mv "$k.new" "$k"
}

# prepare_kernel KROOT: lib symlink for merged-/usr packages, the ELF
# vmlinux for PVH boot, modules.dep.
prepare_kernel() {
  local k=$1 v img
  [ -e "$k/lib" ] || ln -s usr/lib "$k/lib"
  v=$(ls "$k/lib/modules" | head -1)
  img=$(ls "$k"/boot/vmlinuz-* "$k/lib/modules/$v/vmlinuz" 2>/dev/null | head -1 || :)
  [ -n "$img" ] || die "no vmlinuz in $k"
  mkdir -p "$k/boot"
  "$KIT/extract-vmlinux.sh" "$img" "$k/boot/vmlinux" || die "cannot extract vmlinux from $img"
  "$KIT/tools/bin/depmod" -b "$k" "$v" 2>"$k/.depmod.err" || die "depmod failed for $k: $(cat "$k/.depmod.err")"
  echo "$v" > "$k/.release"
}

# fetch_qemu: qemu-system-x86 from the host release's backports, and every
# package a simulated install on this host would add or upgrade, unpacked
# under $QEMU (run with LD_LIBRARY_PATH and -L from qemu_env).
fetch_qemu() {
  local rel=$HOST_CODENAME q=$CACHE/qemu pkgs
  apt_setup qemu "$MIRROR $rel" "$MIRROR $rel-updates" "$MIRROR_SECURITY $rel-security" "$MIRROR $rel-backports"
  [ "$APT_UPDATED" = 0 ] && [ -f "$q/.packages" ] && qemu_works && return 0
  pkgs=$(papt qemu apt-get install -s -qq --no-install-recommends -t "$rel-backports" qemu-system-x86 seabios qemu-system-data 2>/dev/null |
    sed -n 's/^Inst \([^ ]*\) .*/\1/p' | sort)
  [ -n "$pkgs" ] || pkgs="qemu-system-x86 qemu-system-common qemu-system-data seabios"
  case " $(echo $pkgs) " in *" qemu-system-x86 "*) ;; *) pkgs="$pkgs qemu-system-x86 qemu-system-common qemu-system-data seabios" ;; esac
  pkgs=$(echo $pkgs | tr ' ' '\n' | sort -u)
  if [ -x "$q/usr/bin/qemu-system-x86_64" ] && [ "$(cat "$q/.packages" 2>/dev/null)" = "$pkgs" ] && qemu_works; then return 0; fi
  log "fetching qemu from $rel-backports: $(echo $pkgs)"
  rm -rf "$q" "$CACHE/debs/qemu"
  # shellcheck disable=SC2086
  download qemu "$CACHE/debs/qemu" $(for p in $pkgs; do case $p in qemu-system-*) echo "$p/$rel-backports" ;; *) echo "$p" ;; esac; done)
  mkdir -p "$q"; for p in "$CACHE/debs/qemu"/*.deb; do dpkg -x "$p" "$q"; done
  rm -rf "$CACHE/debs/qemu"
  echo "$pkgs" > "$q/.packages"
  qemu_works || die "the private qemu does not run: $(qemu_cmd --version 2>&1 | tail -1)"
}
# qemu_wrapper: $CACHE/bin/qemu-system-x86_64 runs the private qemu.
qemu_wrapper() {
  mkdir -p "$CACHE/bin"
  cat > "$CACHE/bin/qemu-system-x86_64.new" <<W
#!/bin/sh
# The private qemu of scripts/kernel-matrix, with its libraries and firmware.
LD_LIBRARY_PATH=$(qemu_libpath) exec $CACHE/qemu/usr/bin/qemu-system-x86_64 -L $CACHE/qemu/usr/share/qemu -L $CACHE/qemu/usr/share/seabios "\$@"
W
  chmod +x "$CACHE/bin/qemu-system-x86_64.new"; mv "$CACHE/bin/qemu-system-x86_64.new" "$CACHE/bin/qemu-system-x86_64"
}
qemu_libpath() { echo "$CACHE/qemu/usr/lib/x86_64-linux-gnu:$CACHE/qemu/lib/x86_64-linux-gnu"; }
qemu_cmd() { LD_LIBRARY_PATH=$(qemu_libpath) "$CACHE/qemu/usr/bin/qemu-system-x86_64" -L "$CACHE/qemu/usr/share/qemu" -L "$CACHE/qemu/usr/share/seabios" "$@"; }
qemu_works() { qemu_cmd --version >/dev/null 2>&1; }

# fetch_kit: busybox-static and kmod from the host's release, plus
# extract-vmlinux.sh, under $KIT.
fetch_kit() {
  local rel=$HOST_CODENAME pkgs="busybox-static kmod libkmod2"
  if [ -x "$KIT/bb/bin/busybox" ] && [ -x "$KIT/tools/bin/depmod" ] && cmp -s "$HERE/extract-vmlinux" "$KIT/extract-vmlinux.sh"; then return 0; fi
  apt_setup qemu "$MIRROR $rel" "$MIRROR $rel-updates" "$MIRROR_SECURITY $rel-security" "$MIRROR $rel-backports"
  log "fetching the guest kit: $pkgs"
  rm -rf "$KIT" "$CACHE/debs/kit"; download qemu "$CACHE/debs/kit" $pkgs
  mkdir -p "$KIT/x" "$KIT/bb/bin" "$KIT/tools/bin"
  for p in "$CACHE/debs/kit"/*.deb; do dpkg -x "$p" "$KIT/x"; done
  rm -rf "$CACHE/debs/kit"
  cp "$KIT/x/bin/busybox" "$KIT/bb/bin/busybox"
  local kmod; kmod=$(ls "$KIT"/x/bin/kmod "$KIT"/x/usr/bin/kmod 2>/dev/null | head -1 || :)
  # kmod dispatches on argv[0]; a wrapper carries the private libkmod.
  # kmod acts on the name it is called by; each tool is a wrapper that
  # calls it by that name with the private libkmod.
  for t in depmod modprobe insmod lsmod modinfo; do
    printf '#!/bin/bash\nLD_LIBRARY_PATH=%s:%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} exec -a %s %s "$@"\n' \
      "$KIT/x/lib/x86_64-linux-gnu" "$KIT/x/usr/lib/x86_64-linux-gnu" "$t" "$kmod" > "$KIT/tools/bin/$t"
    chmod +x "$KIT/tools/bin/$t"
  done
  install -m 755 "$HERE/extract-vmlinux" "$KIT/extract-vmlinux.sh"
}

# install_runner: $CACHE/bin/run-under-kernel, for use outside this script.
install_runner() {
  mkdir -p "$CACHE/bin"
  install -m 755 "$HERE/run-under-kernel" "$CACHE/bin/run-under-kernel.new"
  mv "$CACHE/bin/run-under-kernel.new" "$CACHE/bin/run-under-kernel" # never rewrite a script someone runs
}

# write_ready: $CACHE/READY, where everything is, for people and scripts.
write_ready() {
  local k
  {
    echo "# Written by scripts/kernel-matrix on $(date -u +%FT%TZ)."
    for k in $KERNELS_ALL; do
      [ -f "$CACHE/kernels/$k/.version" ] || continue
      echo "kernel $k: $CACHE/kernels/$k (release $(cat "$CACHE/kernels/$k/.release"), boot/vmlinux is the ELF image)"
    done
    echo "qemu: $CACHE/qemu/usr/bin/qemu-system-x86_64 ($(qemu_cmd --version | head -1))"
    echo "  run it with LD_LIBRARY_PATH=$(qemu_libpath)"
    echo "  and -L $CACHE/qemu/usr/share/qemu -L $CACHE/qemu/usr/share/seabios"
    echo "  or simply: $CACHE/bin/qemu-system-x86_64 (a wrapper that does both)"
    echo "kit: $KIT (busybox: bb/bin/busybox; kmod tools: tools/bin; extract-vmlinux.sh)"
    echo "runner: $CACHE/bin/run-under-kernel KROOT COMMAND [ARG...] (exits with COMMAND's status;"
    echo "  host / read-only over 9p + tmpfs overlay, runs in the current directory; env KIT, QEMU, MEM, SMP, TIMEOUT)"
    echo "example (the dispatcher tests under 5.10, from the repository's top directory, after cargo test --no-run):"
    echo "  KIT=$KIT QEMU=$CACHE/bin/qemu-system-x86_64 $CACHE/bin/run-under-kernel $CACHE/kernels/5.10 \\"
    echo "    \$(ls -t target/debug/deps/dispatcher-* | grep -v '\\.d\$' | head -1) --test-threads=1"
    echo "or everything, with a summary: scripts/kernel-matrix [5.10 6.1 6.12 newest]"
  } > "$CACHE/READY.new"
  mv "$CACHE/READY.new" "$CACHE/READY"
}
