#!/usr/bin/env bash
# Install Neovim from Debian's .debs (testing: 0.12; DGLS_NVIM_SUITE=trixie: 0.10) into a private cache, without
# touching the system:
# a private apt sources list, state and cache directory, `apt-get download`, `dpkg -x`, and a wrapper that
# runs nvim through the unpacked ld-linux-x86-64.so.2 with --library-path and VIMRUNTIME set.
#
# Usage: [DGLS_NVIM_SUITE=testing|trixie] editors/scripts/install-nvim.sh [CACHE_DIR]
#        (default cache: <repo>/.work/editors/nvim for testing, <repo>/.work/editors/nvim-<suite> otherwise)
# Prints the wrapper's path as its last line. Idempotent: downloads only when the cache is missing.
set -euo pipefail

repo="$(cd "$(dirname "$0")/../.." && pwd)"
suite="${DGLS_NVIM_SUITE:-testing}"
if [[ "$suite" == testing ]]; then default_cache="$repo/.work/editors/nvim"; else default_cache="$repo/.work/editors/nvim-$suite"; fi
cache="${1:-$default_cache}"
wrapper="$cache/bin/nvim"
packages=(neovim neovim-runtime)

if [[ -x "$wrapper" ]] && "$wrapper" --version >/dev/null 2>&1; then
  echo "$wrapper"
  exit 0
fi

apt_dir="$cache/apt"
mkdir -p "$apt_dir/etc" "$apt_dir/state/lists/partial" "$apt_dir/cache/archives/partial" "$cache/debs"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main" \
  > "$apt_dir/etc/sources.list"
: > "$apt_dir/state/status"
apt_opts=(
  -o "Dir::Etc::SourceList=$apt_dir/etc/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
  -o "Dir::State=$apt_dir/state" -o "Dir::State::status=$apt_dir/state/status" -o "Dir::Cache=$apt_dir/cache"
  -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root"
)
apt-get "${apt_opts[@]}" -qq update >&2
# Every package nvim needs at run time, resolved against an empty status: libc6 included, so the unpacked
# loader and libc match what testing's nvim was built against.
mapfile -t deps < <(apt-cache "${apt_opts[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts \
  --no-breaks --no-replaces --no-enhances "${packages[@]}" | grep -v '^ ' | grep -v '^<' | sort -u)
(cd "$cache/debs" && apt-get "${apt_opts[@]}" -qq download "${deps[@]}" >&2)

root="$cache/root"
rm -rf "$root"
mkdir -p "$root"
for deb in "$cache"/debs/*.deb; do
  dpkg -x "$deb" "$root"
done

mkdir -p "$cache/bin"
cat > "$wrapper" <<WRAP
#!/bin/sh
# Neovim from Debian $suite, unpacked by editors/scripts/install-nvim.sh; runs on the unpacked libc.
root="$root"
export VIMRUNTIME="\$root/usr/share/nvim/runtime"
exec "\$root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "\$root/usr/lib/x86_64-linux-gnu" \\
  "\$root/usr/bin/nvim" "\$@"
WRAP
chmod +x "$wrapper"
"$wrapper" --version | head -1 >&2
echo "$wrapper"
