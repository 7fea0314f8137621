#!/usr/bin/env bash
# Measures the daemon's memory, the figures the manifest's resource requests
# and limits are sized from (deployments/helm/gpu-plugin/values.yaml):
# bin/gpu-plugin runs `demo` (the whole daemon against the in-process
# stand-in kubelet) on the simulated dgx-a100-mig node while /metrics is
# scraped every second, then VmRSS and VmHWM are read from /proc.
#
#   make build && tests/deploy/measure_rss.sh [seconds] [profile] [daemon flags...]
# e.g. tests/deploy/measure_rss.sh 60 dgx-a100-mig --mig-strategy=mixed
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-60}
profile=${2:-dgx-a100-mig}
shift $(( $# < 2 ? $# : 2 ))
port=${PORT:-19400}
bin=./bin/gpu-plugin
[ -x "$bin" ] || { echo "build first: make build" >&2; exit 1; }

log=$(mktemp)
"$bin" demo --simulate="$profile" --metrics-address="127.0.0.1:$port" "$@" >"$log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -f "$log"' EXIT

for _ in $(seq 100); do
	curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
	sleep 0.1
done
curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null || { cat "$log"; exit 1; }

cpu0=$(awk '{print $14+$15}' "/proc/$pid/stat")
bytes=0; series=0
for _ in $(seq "$secs"); do
	body=$(curl -fsS "http://127.0.0.1:$port/metrics")
	bytes=${#body}
	series=$(grep -vc '^#' <<<"$body" || true)
	sleep 1
done
cpu1=$(awk '{print $14+$15}' "/proc/$pid/stat")
hz=$(getconf CLK_TCK)

echo "profile=$profile flags=[$*] seconds=$secs scrapes=$secs last_scrape_bytes=$bytes series=$series"
grep -E '^(VmRSS|VmHWM|RssAnon|RssFile)' "/proc/$pid/status"
awk -v c=$((cpu1 - cpu0)) -v hz="$hz" -v s="$secs" 'BEGIN{printf "cpu=%.1f%% of one core (average over the run)\n", 100*c/hz/s}'
