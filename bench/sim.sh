#!/usr/bin/env bash
# Replays the shipped traces against bench/sim-fleet.toml's policy and the
# baselines (static peak, EC2 target tracking, oracle) and prints the
# figures. Offline; about a minute with a release build.
#
#   bench/sim.sh [extra `gru sim run` flags, e.g. --boot-time 5m]
#
# The traces were made with:
#   gru sim generate --kind week  --seed 1 --peak 1000 -o bench/traces/week.csv
#   gru sim generate --kind spike --seed 1 --peak 1200 -o bench/traces/spike.csv
#   gru sim generate --kind batch --seed 1 --peak 1000 -o bench/traces/batch.csv
#   gru sim generate --kind shifts --seed 1 --peak 1000 -o bench/traces/shifts.csv
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p gru
for trace in week spike batch shifts; do
  echo "== $trace"
  target/release/gru sim run --trace "bench/traces/$trace.csv" --config bench/sim-fleet.toml \
    --out "target/sim/$trace" "$@"
  echo
done
