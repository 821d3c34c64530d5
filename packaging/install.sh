#!/usr/bin/env bash
# Install runvisor as a system service:
#   PREFIX/bin/runvisor                     the single executable
#   /etc/systemd/system/runvisor.service    the unit, running PREFIX/bin/runvisor
#   /etc/runvisor/runvisor.toml             a starter config, if none exists
#   /etc/runvisor/credentials.key           the credential store key, if none
#   the system user and group runvisor, if missing (systemd-sysusers)
#
# Running it again changes only what differs, and never replaces a config
# or a key. It enables nothing: start the service with
# `systemctl enable --now runvisor`.
#
# Usage: packaging/install.sh [--binary PATH] [--prefix DIR] [--root DIR]
#   --binary  the executable to install (default: dist/runvisor)
#   --prefix  where it goes on the target system (default: /usr/local)
#   --root    install into this folder as the target's / (default: /), such
#             as a system image; paths written into files stay without it
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
binary="$here/../dist/runvisor"
prefix=/usr/local
root=/

usage() {
  sed -n '2,18s/^# \{0,1\}//p' "$0"
}

while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="${2:?--binary needs a path}"; shift 2 ;;
    --prefix) prefix="${2:?--prefix needs a folder}"; shift 2 ;;
    --root) root="${2:?--root needs a folder}"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1. See --help." >&2; exit 2 ;;
  esac
done

case "$prefix" in
  /*) ;;
  *) echo "install.sh: --prefix must be an absolute path, not $prefix." >&2; exit 2 ;;
esac
if [ ! -x "$binary" ]; then
  echo "install.sh: $binary is missing or not executable. Build it with 'make binary'." >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run it as root, since it creates a user and writes system folders." >&2
  exit 1
fi
root="${root%/}"

say() { echo "install.sh: $*"; }

# Copy $1 to $2 with mode $3 unless $2 already has the same content, and
# set $change to installed, updated or unchanged.
change=unchanged
put_file() {
  local source="$1" target="$2" mode="$3"
  if [ -f "$target" ] && cmp -s "$source" "$target"; then
    chmod "$mode" "$target"
    change=unchanged
    say "unchanged $target"
    return
  fi
  local verb=installed
  [ -e "$target" ] && verb=updated
  change=$verb
  mkdir -p "$(dirname "$target")"
  install -m "$mode" "$source" "$target.new"
  mv -f "$target.new" "$target"
  say "$verb $target"
}

# 1. The user and group runvisor. systemd-sysusers creates them only when
# missing, also inside --root. useradd is the fallback on a live system.
mkdir -p "$root/etc"
if grep -q '^runvisor:' "$root/etc/passwd" 2>/dev/null; then
  say "user runvisor exists"
elif command -v systemd-sysusers >/dev/null 2>&1; then
  systemd-sysusers --root="${root:-/}" --inline \
    'u runvisor - "runvisor process manager" /var/lib/runvisor'
  say "created the system user runvisor"
elif [ -z "$root" ] && command -v useradd >/dev/null 2>&1; then
  useradd --system --user-group --home-dir /var/lib/runvisor --no-create-home \
    --shell /usr/sbin/nologin --comment "runvisor process manager" runvisor
  say "created the system user runvisor"
else
  echo "install.sh: cannot create the user runvisor: systemd-sysusers is missing. Install systemd, or create the user by hand." >&2
  exit 1
fi
# Numeric, because the group exists in $root/etc/group, maybe not on this host.
gid="$(awk -F: '$1 == "runvisor" { print $3 }' "$root/etc/group")"

# 2. The executable.
put_file "$binary" "$root$prefix/bin/runvisor" 0755
binary_change=$change

# 3. The unit, pointing at the executable under the prefix.
unit="$(mktemp)"
trap 'rm -f "$unit"' EXIT
sed -e "s|^ExecStart=/usr/local/bin/runvisor |ExecStart=$prefix/bin/runvisor |" \
  -e "s|^ExecReload=/usr/local/bin/runvisor |ExecReload=$prefix/bin/runvisor |" \
  "$here/runvisor.service" >"$unit"
put_file "$unit" "$root/etc/systemd/system/runvisor.service" 0644

# 4. The config folder, readable by the group runvisor only: the config may
# hold secret literals. The key stays root's: systemd hands it over.
config_dir="$root/etc/runvisor"
install -d -m 0750 -o 0 -g "$gid" "$config_dir"
if [ -e "$config_dir/runvisor.toml" ]; then
  say "kept the existing $config_dir/runvisor.toml"
else
  install -m 0640 -o 0 -g "$gid" "$here/runvisor.toml" "$config_dir/runvisor.toml"
  say "installed $config_dir/runvisor.toml"
fi
if [ -e "$config_dir/credentials.key" ]; then
  say "kept the existing $config_dir/credentials.key"
else
  (umask 077 && head -c 32 /dev/urandom | base64 >"$config_dir/credentials.key.new")
  mv "$config_dir/credentials.key.new" "$config_dir/credentials.key"
  say "generated $config_dir/credentials.key (keep a copy: the credential store cannot be read without it)"
fi

# 5. Tell a running systemd about the unit, on a live system only.
if [ -z "$root" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  say "reloaded systemd; start the service with: systemctl enable --now runvisor"
  if [ "$binary_change" = updated ] && systemctl --quiet is-active runvisor; then
    say "the service still runs the previous executable: systemctl restart runvisor"
  fi
else
  say "done; on the target system run: systemctl enable --now runvisor"
fi
