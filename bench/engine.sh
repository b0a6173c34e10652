#!/usr/bin/env bash
# The origin's benchmark on this machine: DRIVER -> reference engine (the
# system under test, its own process) -> SINK(s), over MLLP on loopback:
# T1 (pass-through), T2 (1 in, 1 transform, 2 out), T4 (4 routes with
# transforms, 5 out) and T4 without ACK, each in memory (ACK after delivery)
# and durable (ACK once written to the engine's write-ahead queue). Prints a
# table of msg/s and latency, and fails if any sink misses a message it
# should have received.
#
#   bench/engine.sh [gru bench suite options]
#   e.g. bench/engine.sh --duration 20s --connections 32 --size 65536
#
# Everything shares this machine's cores: the figures are for comparing
# workloads within one run, not absolute capacity.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p gru
exec target/release/gru bench suite "$@"
