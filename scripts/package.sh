#!/usr/bin/env bash
# Builds loyaltyd's Debian package: target/debian/loyaltyd_<version>_<arch>.deb.
#
# A staged tree packed by dpkg-deb (no cargo-deb to install and build: the
# package is a handful of files and four maintainer scripts, and CI stays
# fast). It holds the binary, the systemd unit, /etc/loyaltyd/config.toml and
# /etc/loyaltyd/loyaltyd.env (conffiles: upgrades keep local edits; the
# environment file, for secrets, is mode 0600), the Grafana dashboard and the
# alert rules under /usr/share/loyaltyd/, and the guides of docs/ under
# /usr/share/doc/loyaltyd/. The unit runs as a dynamic user (no user is made).
#
# Usage: scripts/package.sh [--fast] [BINARY]
#   BINARY  the loyaltyd binary to package (default: a release build, made now)
#   --fast  gzip -1 instead of xz (the test suite's package)
set -euo pipefail
cd "$(dirname "$0")/.."
compress=(-Zxz)
if [ "${1:-}" = "--fast" ]; then
    compress=(-Zgzip -z1)
    shift
fi
bin=${1:-}
if [ -z "$bin" ]; then
    cargo build --release --quiet
    bin=target/release/loyaltyd
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root="$stage/loyaltyd_${version}_${arch}"

install -D -m 0755 "$bin" "$root/usr/bin/loyaltyd"
strip --strip-debug "$root/usr/bin/loyaltyd" 2>/dev/null || true
install -D -m 0644 systemd/loyaltyd.service "$root/lib/systemd/system/loyaltyd.service"
install -D -m 0644 config.toml "$root/etc/loyaltyd/config.toml"
install -D -m 0600 packaging/loyaltyd.env "$root/etc/loyaltyd/loyaltyd.env"
install -D -m 0644 dashboards/loyaltyd.json "$root/usr/share/loyaltyd/loyaltyd.json"
install -D -m 0644 dashboards/alerts.yml "$root/usr/share/loyaltyd/alerts.yml"
install -D -m 0644 README.md "$root/usr/share/doc/loyaltyd/README.md"
for guide in docs/*.md; do
    install -D -m 0644 "$guide" "$root/usr/share/doc/loyaltyd/$(basename "$guide")"
done

install -d "$root/DEBIAN"
size=$(du -sk "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: loyaltyd
Version: $version
Architecture: $arch
Maintainer: loyaltyd developers <loyaltyd@localhost>
Installed-Size: $size
Depends: adduser
Recommends: postgresql (>= 15), redis-server (>= 7)
Section: database
Priority: optional
Homepage: https://github.com/loyaltyd/loyaltyd
Description: loyalty scores, leaderboard and moderation queues for forums
 A daemon beside PostgreSQL and Redis that keeps a moderated forum's loyalty
 scores, its leaderboard and its moderation queues fast and exact, for any
 writer of the database, with Prometheus metrics, a Grafana dashboard and
 alert rules (in /usr/share/loyaltyd).
CONTROL
printf '/etc/loyaltyd/config.toml\n/etc/loyaltyd/loyaltyd.env\n' > "$root/DEBIAN/conffiles"
for script in postinst prerm postrm; do
    install -m 0755 "packaging/$script" "$root/DEBIAN/$script"
done

mkdir -p target/debian
out="target/debian/loyaltyd_${version}_${arch}.deb"
dpkg-deb --root-owner-group "${compress[@]}" --build "$root" "$out" >/dev/null
echo "$out"
