#!/usr/bin/env bash
# Builds the OpenTelemetry Collector that tm's trace tests export to, once:
#
#   bash stack/otelcol/build.sh      # prints the binary's path
#
# The Collector Builder and the binary land in .stack/otelcol/ (git-ignored). A second run finds
# the binary and does nothing. The only network it needs is the Go module proxy. The first build
# on a machine takes about 3 minutes on 2 cores and downloads about 150 MB of modules into the
# Go caches (about 1.3 GB); the binary is 38 MB. A change to manifest.yaml rebuilds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SRC="$ROOT/stack/otelcol"
STATE="$ROOT/.stack/otelcol"
# The Collector release is fixed in one place, manifest.yaml (dist.version and every component);
# the Builder is the same release.
BUILDER_VERSION="v$(sed -n 's/^  version: *//p' "$SRC/manifest.yaml")"
BIN="$STATE/dist/otelcol-tm"
STAMP="$STATE/dist/.manifest.sha256"  # the manifest the binary was built from

want="$(sha256sum "$SRC/manifest.yaml" | cut -d' ' -f1)"
if [[ -x "$BIN" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    echo "$BIN"
    exit 0
fi
command -v go >/dev/null || { echo "build.sh: 'go' not found; install Go (>= 1.24)" >&2; exit 1; }

mkdir -p "$STATE"
exec 9>"$STATE/.build.lock"
flock 9  # two test runs at once: the second waits, then finds the binary
if [[ -x "$BIN" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    echo "$BIN"
    exit 0
fi
# The Go module and build caches are the machine's own (~/go/pkg/mod, ~/.cache/go-build), so
# that another clone on the same machine (CI's) rebuilds in seconds instead of minutes.
export GOBIN="$STATE/bin"
export GOFLAGS="-modcacherw -buildvcs=false"  # rm -rf works; no git stamping inside the tree
export CGO_ENABLED=0
export GOTOOLCHAIN=local  # the machine's Go; never fetch another toolchain

started=$(date +%s)
if [[ ! -x "$GOBIN/builder" ]]; then
    echo "build.sh: installing the Collector Builder $BUILDER_VERSION" >&2
    go install "go.opentelemetry.io/collector/cmd/builder@$BUILDER_VERSION"
fi

# The manifest's output_path is absolute here, so the build does not depend on the cwd.
sed "s|output_path: .*|output_path: $STATE/dist|" "$SRC/manifest.yaml" >"$STATE/manifest.yaml"
echo "build.sh: building the collector (first time: a few minutes)" >&2
"$GOBIN/builder" --config "$STATE/manifest.yaml" >&2
echo "$want" >"$STAMP"
echo "build.sh: built in $(( $(date +%s) - started )) s" >&2
echo "$BIN"
