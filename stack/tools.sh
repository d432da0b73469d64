#!/usr/bin/env bash
# Tools the test suite runs besides the services of stack.sh:
#
#   bash stack/tools.sh        # installs what is missing; a second run does nothing
#
# - prometheus and promtool (Debian's `prometheus` package): tests/unit/test_alert_rules.py
#   checks and unit-tests k8s/prometheus/tm-alerts.yaml; tests/e2e/test_metrics.py scrapes a
#   running tm with a real Prometheus server, started on a free port by the test itself.
# - chromium and chromedriver (Debian's `chromium` and `chromium-driver`, with a font so that
#   screenshots show text): tests/e2e/test_status_page.py drives the status page in a headless
#   browser through Selenium, pointed at these two binaries so that nothing is downloaded.
#
# The prometheus package's maintainer scripts would start a system Prometheus on :9090. Nothing
# here needs it, so the install runs under a policy-rc.d that forbids starting services (the
# usual way in containers), and a service that got started anyway is stopped again.
set -euo pipefail

say() { echo "tools: $*"; }
die() { echo "tools: $*" >&2; exit 1; }

CHROMIUM=/usr/bin/chromium
CHROMEDRIVER=/usr/bin/chromedriver

has_prometheus() { command -v prometheus >/dev/null && command -v promtool >/dev/null; }
has_chromium() { [[ -x $CHROMIUM && -x $CHROMEDRIVER ]]; }

missing=()
has_prometheus || missing+=(prometheus)
has_chromium || missing+=(chromium chromium-driver fonts-dejavu-core)
if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi
command -v apt-get >/dev/null \
    || die "${missing[*]} missing and no apt-get: install them (prometheus and promtool 2.x on PATH; $CHROMIUM and $CHROMEDRIVER)"
[[ $EUID -eq 0 ]] || die "${missing[*]} missing: run 'sudo apt-get install ${missing[*]}' (or this script as root)"

POLICY=/usr/sbin/policy-rc.d
made_policy=0
if [[ ! -e $POLICY ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$POLICY"
    chmod 755 "$POLICY"
    made_policy=1
fi
cleanup() { if [[ $made_policy -eq 1 ]]; then rm -f "$POLICY"; fi; }
trap cleanup EXIT

say "installing ${missing[*]} (apt)"
apt-get update -qq >/dev/null || die "apt-get update failed"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"

# In case the policy was not ours and allowed the start: stop the packaged service.
if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl stop prometheus || true
    systemctl disable prometheus >/dev/null 2>&1 || true
elif [[ -x /etc/init.d/prometheus ]] && /etc/init.d/prometheus status >/dev/null 2>&1; then
    /etc/init.d/prometheus stop >/dev/null || true
fi

has_prometheus || die "installed the prometheus package, but 'prometheus' or 'promtool' is not on PATH"
has_chromium || die "installed chromium and chromium-driver, but $CHROMIUM or $CHROMEDRIVER is missing"
say "$(promtool --version 2>&1 | head -n 1)"
say "$("$CHROMEDRIVER" --version 2>&1 | head -n 1)"
