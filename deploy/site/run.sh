#!/usr/bin/env bash
# Run go2rtc and Prometheus side by side on a base station, from the directory that
# `spotrelay site-config` wrote (SITE_DIR, default .cache/site). Stays in the foreground; Ctrl-C or
# SIGTERM stops both, and if either exits the other is stopped too.
#
#   SITE_DIR     generated configs                     (default .cache/site)
#   PROM_LISTEN  Prometheus web address                (default 0.0.0.0:9090)
#   GO2RTC       go2rtc binary                         (default .cache/go2rtc/go2rtc, installed if missing)
#   PROMETHEUS   Prometheus binary                     (default: prometheus on PATH)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
site=$(cd "${SITE_DIR:-$repo/.cache/site}" 2>/dev/null && pwd) ||
  { echo "run.sh: ${SITE_DIR:-.cache/site} does not exist: run 'make site-config ROBOTS=...' first" >&2; exit 2; }
[ -f "$site/go2rtc.yaml" ] && [ -f "$site/prometheus.yml" ] ||
  { echo "run.sh: no configs in $site: run 'make site-config ROBOTS=...' first" >&2; exit 2; }
go2rtc=${GO2RTC:-$repo/.cache/go2rtc/go2rtc}
[ -x "$go2rtc" ] || "$here/get-go2rtc.sh"
prometheus=${PROMETHEUS:-$(command -v prometheus || true)}
[ -n "$prometheus" ] || { echo "run.sh: prometheus not found (apt-get install prometheus)" >&2; exit 2; }

# Prometheus loads every *.rules.yml next to its config: the shipped per-robot rules.
ln -sfn "$repo/deploy/prometheus/spotrelay.rules.yml" "$site/spotrelay.rules.yml"
mkdir -p "$site/prometheus-data"

pids=()
stop() { kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; }
trap stop EXIT
trap 'exit 130' INT TERM

# go2rtc resolves ${SPOTRELAY_TOKEN} from $CREDENTIALS_DIRECTORY/SPOTRELAY_TOKEN, a link to the
# token file: the token is in neither its command line nor its environment.
# Relays with --tls: go2rtc (Go) trusts the certificate site-config --ca-file copied here.
ca=()
[ -f "$site/credentials/relay-ca.crt" ] && ca=(SSL_CERT_FILE="$site/credentials/relay-ca.crt")
env "${ca[@]}" CREDENTIALS_DIRECTORY="$site/credentials" "$go2rtc" -c "$site/go2rtc.yaml" &
pids+=($!)
"$prometheus" --config.file="$site/prometheus.yml" --storage.tsdb.path="$site/prometheus-data" \
  --web.listen-address="${PROM_LISTEN:-0.0.0.0:9090}" &
pids+=($!)
echo "run.sh: go2rtc (pid ${pids[0]}) and Prometheus (pid ${pids[1]}, ${PROM_LISTEN:-0.0.0.0:9090}) running; Ctrl-C stops both" >&2
wait -n "${pids[@]}"
echo "run.sh: an engine exited; stopping the other" >&2
exit 1
