#!/usr/bin/env bash
# The soak: 1,000,000 HL7 messages at 2,000 msg/s through the load balancer
# of a `gru dev` fleet while it is pinned at new sizes 20 times, three of its
# minions are killed with SIGKILL and its controller (gru dev itself) is
# killed with SIGKILL twice while a minion drains. The DRIVER counts ACKs,
# the SINK arrivals by control id; it prints sent, ACKed, delivered,
# ACKed-but-not-delivered (must be 0), duplicates, NACKs and every event,
# and fails if an ACKed message never arrived. About 9 minutes.
#
#   bench/soak.sh [gru bench soak options]
#   e.g. bench/soak.sh --messages 200000 --rate 1000 --json
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p gru
exec target/release/gru bench soak "$@"
