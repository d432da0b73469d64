#!/usr/bin/env bash
# uv, the installer of tm's locked dependencies, at the version and wheel hashes of stack/uv.txt:
#
#   bash stack/uv.sh         # installs it into .stack/uv/ when missing or another version;
#                            # prints the binary's path
#
# pip with --require-hashes installs it into a virtual environment of its own (from the
# machine's python3), so nothing of the machine's Python changes. A second run does nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/.stack/uv"
BIN="$STATE/bin/uv"
want="$(sed -n 's/^uv==\([^ ]*\).*/\1/p' "$ROOT/stack/uv.txt")"

if [[ -x $BIN && "$("$BIN" --version 2>/dev/null)" == "uv $want "* ]]; then
    echo "$BIN"
    exit 0
fi
echo "uv.sh: installing uv $want into .stack/uv (pip, hashes of stack/uv.txt)" >&2
rm -rf "$STATE"
python3 -m venv "$STATE" || { echo "uv.sh: python3 -m venv failed" >&2; exit 1; }
PIP_DISABLE_PIP_VERSION_CHECK=1 "$STATE/bin/pip" install -q --require-hashes -r "$ROOT/stack/uv.txt" >&2
echo "$BIN"
