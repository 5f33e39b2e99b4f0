#!/usr/bin/env bash
# Installs a medmine .deb in a clean Debian root made here (debootstrap, minbase: no Rust, no
# compiler, no source tree), then, from the installed files only: `medmine --version`, the
# desktop entry, icon and licence notices, and a headless `medmine train` + `predict` on the
# packaged demo data. Needs root (chroot) and network (debootstrap and apt fetch from Debian).
#
#   sudo scripts/deb-check.sh target/debian/medmine_*.deb [ROOT]
#
# ROOT (default: a new temporary folder) is reused if it already holds a Debian root. It runs in
# CI after `cargo deb` (.ci/run).
set -euo pipefail
deb=$(realpath "$1")
root=${2:-$(mktemp -d /tmp/medmine-deb-root.XXXXXX)}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

# the host's Debian release, else bookworm (glibc 2.36; the package needs >= 2.35)
suite=bookworm
if [ -r /etc/os-release ]; then
  . /etc/os-release
  [ "${ID:-}" = debian ] && [ -n "${VERSION_CODENAME:-}" ] && suite=$VERSION_CODENAME
fi
if [ ! -x "$root/usr/bin/apt-get" ]; then
  command -v debootstrap >/dev/null || { echo "deb-check: needs debootstrap" >&2; exit 1; }
  echo "deb-check: making a clean $suite root in $root"
  debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$root.debootstrap.log" 2>&1 ||
    { tail -20 "$root.debootstrap.log" >&2; exit 1; }
fi

cp /etc/resolv.conf "$root/etc/resolv.conf"
cp "$deb" "$root/tmp/medmine.deb"
mount -t proc proc "$root/proc"
trap 'umount "$root/proc" 2>/dev/null || true' EXIT
in_root() { chroot "$root" env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  HOME=/root DEBIAN_FRONTEND=noninteractive "$@"; }

for tool in cargo rustc cc; do
  if in_root sh -c "command -v $tool" >/dev/null; then
    echo "deb-check: the root is not clean ($tool found)" >&2; exit 1
  fi
done
in_root apt-get update -q >/dev/null
# apt resolves the package's dependencies (Vulkan loader, xkbcommon) from the mirror
in_root apt-get install -y -q --no-install-recommends /tmp/medmine.deb
in_root dpkg -s medmine | grep -E '^(Status|Version|Depends):'

fail() { echo "deb-check: FAILED: $*" >&2; exit 1; }
[ "$(in_root sh -c 'command -v medmine')" = /usr/bin/medmine ] || fail "medmine is not on PATH"
version=$(in_root medmine --version)
echo "deb-check: $version"
case "$version" in medmine\ *) ;; *) fail "--version printed: $version" ;; esac
for f in /usr/share/applications/medmine.desktop /usr/share/icons/hicolor/256x256/apps/medmine.png \
  /usr/share/doc/medmine/copyright /usr/share/doc/medmine/demo-data-ATTRIBUTION.md \
  /usr/lib/medmine/demo/train.txt; do
  [ -s "$root$f" ] || fail "$f is missing"
done
grep -q '^Exec=medmine' "$root/usr/share/applications/medmine.desktop" || fail "desktop entry's Exec"
grep -q "CC-BY-SA-4.0" "$root/usr/share/doc/medmine/copyright" || fail "the demo data's licence notice"

# headless training and prediction on the packaged demo, from the installed files only
in_root rm -rf /tmp/run
d=/usr/lib/medmine/demo
in_root medmine train --data $d --train-list $d/train.txt --val-list $d/val.txt \
  --size 64 --base 8 --epochs 2 --batch 4 --out /tmp/run
[ -s "$root/tmp/run/best.safetensors" ] || fail "train wrote no checkpoint"
first=$(head -1 "$root$d/val.txt"); first=${first%.png}
in_root medmine predict --checkpoint /tmp/run/best.safetensors --images $d \
  --list $d/val.txt --out /tmp/run/pred
[ -s "$root/tmp/run/pred/$first.png" ] || fail "predict wrote no mask for $first"
echo "deb-check: ok ($deb installed in $root: --version, files, train, predict)"
