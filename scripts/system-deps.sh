#!/usr/bin/env bash
# Install the Debian packages that the test suite uses, when they are missing.
# Needs root (or sudo); without it, prints what to install and carries on,
# and the tests that need a package skip with a stated reason.
set -euo pipefail

packages=(bash procps)
# systemd: systemd-analyze checks the unit and the exported units and their
# calendars, systemd-sysusers creates the user in the install script's tests.
packages+=(systemd)
# The credential tests run a real Secret Service: gnome-keyring-daemon on a
# private session bus, which dbus-daemon (also dbus-run-session) provides.
packages+=(gnome-keyring dbus dbus-daemon)
# binutils: PyInstaller reads libraries with objdump and strips them.
packages+=(binutils)
missing=()
for package in "${packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "system-deps: missing Debian packages: ${missing[*]} (install them as root)" >&2
fi
