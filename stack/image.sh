#!/usr/bin/env bash
# Builds the container image localhost/tm:latest on this machine, where no image registry is
# reachable:
#
#   bash stack/image.sh           # or `make image`; prints the image name
#
# 1. Debian's podman, runc and debootstrap (and python3-venv), installed when missing (apt).
# 2. The base image localhost/tm-base:bookworm, made once: `debootstrap --variant=minbase` of
#    the Debian release this machine runs, from the mirror its apt sources name, with python3,
#    python3-venv and ca-certificates, then `podman import`. Skipped when the image exists
#    (podman's storage is the machine's, so another clone reuses it).
# 3. The wheels of tm's dependencies at the versions and hashes of uv.lock, fetched on the host
#    into .stack/wheels by Debian's python3 (the image's own interpreter), and tm's own wheel
#    (`uv build`). The dependencies are fetched again only when the lock changes, tm's wheel
#    when its sources change.
# 4. `podman build` of the Containerfile from those wheels, offline (`pip install --no-index
#    --require-hashes`);
#    skipped when the image was built from the same inputs (label tm.image.inputs).
#
# podman runs with `--runtime runc` (crun refuses this machine's hybrid cgroup layout). The
# first run on a machine takes a few minutes (the debootstrap); see docs/development.md
# "Container image".
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/.stack/image"
WHEELS="$ROOT/.stack/wheels"       # in the build context (.containerignore lets it through)
IMAGE="${TM_IMAGE:-localhost/tm:latest}"
# The base is the machine's own Debian release (its codename in the tag), so that the image's
# packages are the versions this machine's apt gets: the release fixes them.
# shellcheck disable=SC1091
suite="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
[[ -n $suite ]] || { echo "image: no VERSION_CODENAME in /etc/os-release: cannot tell the Debian release" >&2; exit 1; }
BASE_IMAGE="${TM_BASE_IMAGE:-localhost/tm-base:$suite}"
# What the base holds besides minbase: the interpreter, venv (ensurepip, for the builder stage)
# and the CA bundle (TLS to Kafka, PostgreSQL, the OTLP endpoint). The wheels are manylinux and
# bring their own libraries (librdkafka, libuv, OpenSSL); minbase has libc, libgcc and libstdc++.
BASE_PACKAGES="python3,python3-venv,ca-certificates"
PODMAN=(podman --runtime runc)

say() { echo "image: $*" >&2; }
die() { echo "image: $*" >&2; exit 1; }
elapsed() { echo "$(( $(date +%s) - $1 )) s"; }

started=$(date +%s)
mkdir -p "$STATE"
exec 9>"$STATE/.build.lock"
flock 9  # two builds at once (two test runs): the second waits, then finds the base

# ---- 1. the tools ------------------------------------------------------------------------
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
command -v debootstrap >/dev/null || missing+=(debootstrap)
# Debian's python3 runs pip for the wheels (step 3); its venv module is a package of its own.
/usr/bin/python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
if (( ${#missing[@]} )); then
    command -v apt-get >/dev/null || die "${missing[*]} missing and no apt-get: install them"
    [[ $EUID -eq 0 ]] || die "${missing[*]} missing: run 'sudo apt-get install ${missing[*]}'"
    say "installing ${missing[*]} (apt)"
    apt-get update -qq >/dev/null || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
    say "$(podman --version), $(runc --version | head -n 1)"
fi

# Where podman cannot run at all (no user namespaces, no storage driver, ...), say so now and
# not after the debootstrap.
info_err="$("${PODMAN[@]}" info 2>&1 >/dev/null)" || die "podman cannot run here: $info_err"

# ---- 2. the base -------------------------------------------------------------------------
# The mirror of the machine's own release, as its apt sources name it (deb822 .sources files
# first, then the one-line sources.list); never a host written here.
apt_mirror() {
    local suite="$1" file
    for file in /etc/apt/sources.list.d/*.sources; do
        [[ -r $file ]] || continue
        # One stanza per paragraph: the first URI of a "deb" stanza listing the suite itself.
        awk -v suite="$suite" 'BEGIN { RS = ""; FS = "\n" }
            {
                types = ""; uris = ""; suites = ""
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^[ \t]*#/) continue
                    if ($i ~ /^Types:/) types = substr($i, 7)
                    if ($i ~ /^URIs:/) uris = substr($i, 6)
                    if ($i ~ /^Suites:/) suites = substr($i, 8)
                }
                n = split(suites, s, /[ \t]+/)
                for (j = 1; j <= n; j++)
                    if (s[j] == suite && types ~ /(^|[ \t])deb([ \t]|$)/) {
                        split(uris, u, /[ \t]+/); for (k in u) if (u[k] != "") { print u[k]; exit }
                    }
            }' "$file" | head -n 1
    done | head -n 1 | grep . && return 0
    [[ -r /etc/apt/sources.list ]] || return 1
    # deb [options] URI suite components...
    sed -E 's/\[[^]]*\]//' /etc/apt/sources.list \
        | awk -v suite="$suite" '$1 == "deb" && $3 == suite { print $2; exit }' | grep .
}

if "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
    say "base $BASE_IMAGE exists (podman rmi it to make it again)"
else
    mirror="$(apt_mirror "$suite")" || die "no 'deb' source for $suite in /etc/apt/sources.list(.d)"
    rootfs="$STATE/rootfs"
    rm -rf "$rootfs"
    say "making the base: debootstrap --variant=minbase $suite from $mirror (a few minutes)"
    t0=$(date +%s)
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$suite" "$rootfs" "$mirror" \
        >"$STATE/debootstrap.log" 2>&1 \
        || { tail -n 30 "$STATE/debootstrap.log" >&2; die "debootstrap failed (log: $STATE/debootstrap.log)"; }
    # What an image does not need: package lists and caches, documentation, message
    # translations (33 MB; tm logs in English), logs.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/cache/debconf/*-old \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
        "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/root/.cache
    find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
    say "debootstrap done in $(elapsed "$t0"); importing $BASE_IMAGE"
    tar --numeric-owner -C "$rootfs" -c . | "${PODMAN[@]}" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/usr/bin/python3"]' \
        --message "debootstrap --variant=minbase --include=$BASE_PACKAGES $suite" \
        - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
fi

# ---- 3. the wheels -----------------------------------------------------------------------
# The runtime dependencies at exactly the versions and hashes of uv.lock (`uv export`), fetched
# by the image's own Python, not the venv's: environment markers compare the full version (redis
# needs async-timeout on Python < 3.11.3 only: the venv's 3.11.7 would leave it out, the image's
# 3.11.2 needs it). The base is this machine's Debian release, so its python3 is the host's
# /usr/bin/python3; a venv of it (.stack/image/pip) runs pip, with --require-hashes.
UV="$(bash "$ROOT/stack/uv.sh")"
export PIP_DISABLE_PIP_VERSION_CHECK=1
PIP="$STATE/pip/bin/pip"
if [[ ! -x $PIP ]]; then
    /usr/bin/python3 -m venv "$STATE/pip" \
        || die "/usr/bin/python3 -m venv failed: install Debian's python3-venv"
fi
mkdir -p "$WHEELS"
"$UV" export --project "$ROOT" --frozen --no-emit-project --format requirements-txt --quiet \
    -o "$STATE/requirements.txt"
deps_key="$(sha256sum "$STATE/requirements.txt" | cut -d' ' -f1)"
tm_key="$(cd "$ROOT" && find pyproject.toml README.md tm -type f ! -path '*/__pycache__/*' \
    ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)"
# tm's own wheel (`uv build`: the build backend pinned in pyproject.toml), from a copy of the
# sources: setuptools would leave build/ and tm.egg-info/ in the work tree.
build_tm_wheel() {
    local src="$STATE/src"
    rm -rf "$src" "$WHEELS"/tm-*.whl
    mkdir -p "$src"
    (cd "$ROOT" && tar -c --exclude=__pycache__ --exclude='*.pyc' pyproject.toml README.md tm) \
        | tar -C "$src" -x
    "$UV" build --quiet --wheel --python /usr/bin/python3 --out-dir "$WHEELS" "$src" >&2
    rm -rf "$src"
    echo "$tm_key" >"$WHEELS/.tm.sha256"
}
if [[ "$(cat "$WHEELS/.deps.sha256" 2>/dev/null)" != "$deps_key" ]]; then
    say "fetching the wheels of tm's dependencies (uv.lock's versions and hashes; $(/usr/bin/python3 -V))"
    t0=$(date +%s)
    find "$WHEELS" -mindepth 1 -delete
    "$PIP" wheel -q --require-hashes --wheel-dir "$WHEELS" -r "$STATE/requirements.txt" >&2
    cp "$STATE/requirements.txt" "$WHEELS/requirements.txt"  # the image installs these
    echo "$deps_key" >"$WHEELS/.deps.sha256"
    say "wheels fetched in $(elapsed "$t0"): $(find "$WHEELS" -name '*.whl' | wc -l) wheels"
fi
if [[ "$(cat "$WHEELS/.tm.sha256" 2>/dev/null)" != "$tm_key" ]]; then
    say "building tm's wheel"
    build_tm_wheel
fi

# ---- 4. the image ------------------------------------------------------------------------
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -n 1)"
revision="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
# The source label: the repository's own remote when it has one (never a host written here).
source="$(git -C "$ROOT" remote get-url origin 2>/dev/null || echo "file://$ROOT")"
build_args=(
    --build-arg BASE="$BASE_IMAGE"
    --build-arg WHEELS=.stack/wheels
    --build-arg VERSION="$version"
    --build-arg REVISION="$revision"
    --build-arg SOURCE="$source"
)
# Everything the image is made of; an image already built from the same is kept as it is.
inputs="$( {
    "${PODMAN[@]}" image inspect --format '{{.Id}}' "$BASE_IMAGE"
    printf '%s\n' "${build_args[@]}"
    cd "$ROOT" && sha256sum Containerfile .containerignore .stack/wheels/*
} | sha256sum | cut -d' ' -f1)"
old_id="$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
if [[ -n $old_id && "$("${PODMAN[@]}" image inspect --format '{{index .Labels "tm.image.inputs"}}' \
        "$IMAGE")" == "$inputs" ]]; then
    say "$IMAGE is up to date (podman rmi it to build it again)"
    echo "$IMAGE"
    exit 0
fi
say "building $IMAGE from $BASE_IMAGE (offline)"
t0=$(date +%s)
# --layers=false: no cache of intermediate layers (the inputs check above stands for it), so a
# build leaves no builder-stage image behind.
"${PODMAN[@]}" build --network host --pull=never --layers=false "${build_args[@]}" \
    --label tm.image.inputs="$inputs" \
    --tag "$IMAGE" --file "$ROOT/Containerfile" "$ROOT" >"$STATE/build.log" 2>&1 \
    || { tail -n 40 "$STATE/build.log" >&2; die "podman build failed (log: $STATE/build.log)"; }
# The image this one replaces, now untagged: removed unless a container still uses it.
if [[ -n $old_id && "$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$IMAGE")" != "$old_id" ]]; then
    "${PODMAN[@]}" rmi "$old_id" >/dev/null 2>&1 || true
fi
size="$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")"
say "built $IMAGE in $(elapsed "$t0") ($(( size / 1000000 )) MB); make image took $(elapsed "$started")"
echo "$IMAGE"
