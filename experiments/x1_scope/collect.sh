#!/usr/bin/env bash
# Copy the finished runs of an X1 grid (testbed-experiment x1 --jobs 2 --out DIR) into runs/, with their
# testbed-analyze results: experiments/collect.sh (SH and BA scored with their balanced routing too).
exec "$(dirname "$0")/../collect.sh" "$1" "$(dirname "$0")"
