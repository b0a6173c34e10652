#!/bin/sh
# An operator's part: installs their engine before gru's agent starts.
set -eu
echo "installing the engine"
