#!/usr/bin/env bash
# The origin's benchmark on this machine: DRIVER -> reference engine (the
# system under test) -> SINK(s), over MLLP on loopback, for T1 (pass-through),
# T2 (1 in, 1 transform, 2 out) and T4 (4 routes with transforms, 5 out),
# each in memory (ACK after delivery) and durable (ACK once written to the
# engine's write-ahead queue). Prints msg/s ACKed and latency percentiles.
#
#   bench/engine.sh [seconds per run, default 10] [driver connections, default 16]
#
# Everything shares this machine's cores: the figures are for comparing
# workloads within one run, not absolute capacity.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
conns=${2:-16}
cargo build --release --quiet -p gru
gru=target/release/gru
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

# Starts a gru process in the background (in this shell, so cleanup can
# stop it) and sets $addr from the address on its first line.
start() {
  local out=$1; shift
  "$gru" "$@" > "$out" 2>/dev/null &
  pids+=($!)
  for _ in $(seq 100); do
    local line
    line=$(head -n 1 "$out" 2>/dev/null || true)
    if [ -n "$line" ]; then addr=${line##* }; return; fi
    sleep 0.05
  done
  echo "error: $* did not start" >&2; exit 1
}

run() {
  local workload=$1 mode=$2 sinks=$3
  local downstream=() extra=()
  for i in $(seq "$sinks"); do
    start "$tmp/sink-$workload-$mode-$i" bench sink --listen 127.0.0.1:0
    downstream+=(--downstream "$addr")
  done
  if [ "$mode" = durable ]; then extra=(--ack after-enqueue --queue-dir "$tmp/queue-$workload"); fi
  start "$tmp/engine-$workload-$mode" bench engine --listen 127.0.0.1:0 --workload "$workload" "${downstream[@]}" "${extra[@]}"
  "$gru" bench drive --target "$addr" --rate 0 --duration "${secs}s" --connections "$conns" --json 2>/dev/null > "$tmp/drive.json"
  python3 - "$workload" "$mode" "$tmp/drive.json" <<'PY'
import json, sys
w, m, f = sys.argv[1:]
d = json.load(open(f))
print(f"{w:<4} {m:<9} {d['acked_per_sec']:>10.0f} {d['latency_p50_ms']:>9.2f} {d['latency_p99_ms']:>9.2f} {d['nacked']:>7} {d['errors']:>7}")
PY
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
}

echo "$(nproc) cores, ${secs}s per run, $conns driver connections, 1 KiB messages"
printf '%-4s %-9s %10s %9s %9s %7s %7s\n' load mode "msg/s" "p50 ms" "p99 ms" nacked errors
for w in t1:1 t2:2 t4:5; do
  for m in memory durable; do
    run "${w%%:*}" "$m" "${w##*:}"
  done
done
echo "(T4 without ACK needs a driver that does not wait for ACKs: not in gru bench drive yet)"
