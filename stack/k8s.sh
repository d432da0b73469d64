#!/usr/bin/env bash
# What the checks of k8s/ (tests/k8s/) need besides the venv, each made once:
#
#   bash stack/k8s.sh              # kustomize, installed when missing; prints the binary's path
#   bash stack/k8s.sh crds         # the Go modules that ship the CRDs of the custom resources,
#                                  # downloaded when missing; prints their directories (KEDA's
#                                  # config/crd/bases/, prometheus-operator's
#                                  # example/prometheus-operator-crd/)
#   bash stack/k8s.sh kube-play    # what `podman kube play` needs here besides podman; prints
#                                  # a containers.conf to run it with (CONTAINERS_CONF=...)
#
# kustomize: `go install` from the Go module proxy into .stack/kustomize/ (git-ignored); a second
# run finds the binary of the pinned version and does nothing. The Go module and build caches
# are the machine's own (~/go/pkg/mod, ~/.cache/go-build), as for stack/otelcol/build.sh, so
# another clone on the same machine (CI's) installs it in seconds. Measured on this machine's
# 2 cores: first install 32 s (modules downloaded), another clone 2 s, then 0.01 s.
#
# kube-play: Debian's catatonit (podman's package only recommends it, and without it podman
# cannot make a pod's infra container), installed when missing; and a containers.conf with
# runc (crun refuses this machine's hybrid cgroup layout) and ulimits the sandbox allows: podman's
# default nofile (1048576) is above the hard limit here, and runc cannot set an nproc limit above
# the kernel's pid_max.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="v5.8.2"  # needs Go >= 1.26.0 (v5.8.3 needs 1.27)
# The projects' own Go modules carry their CRD YAML; `go mod download` puts them in the module
# cache (3-4 MB each, seconds), nothing is built.
CRD_MODULES=(
    "github.com/kedacore/keda/v2@v2.21.0"
    "github.com/prometheus-operator/prometheus-operator@v0.85.0"
)
STATE="$ROOT/.stack/kustomize"
BIN="$STATE/bin/kustomize"
STAMP="$STATE/.version"
export GOFLAGS="-modcacherw -buildvcs=false"  # rm -rf of the module cache works
export GOTOOLCHAIN=local  # the machine's Go; never fetch another toolchain

say() { echo "k8s.sh: $*" >&2; }
die() { echo "k8s.sh: $*" >&2; exit 1; }
need_go() { command -v go >/dev/null || die "'go' not found; install Go (>= 1.26)"; }

crds() {
    need_go
    local module dir
    for module in "${CRD_MODULES[@]}"; do
        dir="$(cd / && go mod download -json "$module" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
        [[ -d $dir ]] || die "go mod download $module gave no directory"
        echo "$dir"
    done
}

kube_play() {
    command -v podman >/dev/null || die "podman not found: run 'make image' (it installs podman)"
    if ! command -v catatonit >/dev/null && [[ ! -x /usr/libexec/podman/catatonit ]]; then
        command -v apt-get >/dev/null || die "catatonit missing and no apt-get: install catatonit"
        [[ $EUID -eq 0 ]] || die "catatonit missing: run 'sudo apt-get install catatonit'"
        say "installing catatonit (apt): the pause process of podman's pods"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends catatonit \
            >/dev/null 2>&1 || { apt-get update -qq >/dev/null && \
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            catatonit >/dev/null; } || die "apt-get install catatonit failed"
    fi
    local conf="$ROOT/.stack/kube-play/containers.conf" nproc pid_max
    mkdir -p "$(dirname "$conf")"
    nproc="$(ulimit -Hu)"
    pid_max="$(cat /proc/sys/kernel/pid_max)"
    if [[ $nproc == unlimited ]] || (( nproc > pid_max )); then nproc=$pid_max; fi
    cat >"$conf.tmp" <<EOF
# Written by stack/k8s.sh kube-play for this machine: CONTAINERS_CONF=$conf podman kube play ...
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
EOF
    mv "$conf.tmp" "$conf"
    echo "$conf"
}

case "${1:-}" in
    crds) crds; exit 0 ;;
    kube-play) kube_play; exit 0 ;;
    "") ;;
    *) die "usage: bash stack/k8s.sh [crds|kube-play]" ;;
esac

installed() { [[ -x "$BIN" && -f "$STAMP" && "$(cat "$STAMP")" == "$VERSION" ]]; }
if installed; then
    echo "$BIN"
    exit 0
fi
need_go
mkdir -p "$STATE"
exec 9>"$STATE/.install.lock"
flock 9  # two test runs at once: the second waits, then finds the binary
if installed; then
    echo "$BIN"
    exit 0
fi
export GOBIN="$STATE/bin"
export CGO_ENABLED=0
started=$(date +%s)
say "installing kustomize $VERSION (go install from the Go module proxy)"
go install "sigs.k8s.io/kustomize/kustomize/v5@$VERSION"
echo "$VERSION" >"$STAMP"
crds >/dev/null  # fetched here too, so that the tests need no network
say "installed in $(( $(date +%s) - started )) s"
echo "$BIN"
