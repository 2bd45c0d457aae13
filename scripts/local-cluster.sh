#!/usr/bin/env bash
# Starts a local Shoal cluster on loopback for trying it out: 3 servers and 2 agents, then
# trains the demo Iris model, pushes it and deploys 2 replicas. Ctrl-C stops everything.
#   scripts/local-cluster.sh [DATA_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-.shoal-local}
cargo build -q -p shoal-node
shoal=${CARGO_TARGET_DIR:-target}/debug/shoal
mkdir -p "$data"
peers=1=127.0.0.1:7101,2=127.0.0.1:7102,3=127.0.0.1:7103
http=1=127.0.0.1:7071,2=127.0.0.1:7072,3=127.0.0.1:7073
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
for i in 1 2 3; do
  "$shoal" server --id $i --peers $peers --http-peers $http --raft-listen 127.0.0.1:710$i \
    --listen 127.0.0.1:707$i --data-dir "$data/server-$i" 2>"$data/server-$i.log" &
  pids+=($!)
done
for i in 1 2; do
  "$shoal" agent --id $i --servers 127.0.0.1:7071,127.0.0.1:7072,127.0.0.1:7073 \
    --listen 127.0.0.1:720$i --data-dir "$data/agent-$i" 2>"$data/agent-$i.log" &
  pids+=($!)
done
export SHOAL_ADDR=http://127.0.0.1:7071
for _ in $(seq 150); do curl -sf $SHOAL_ADDR/v2/health/ready >/dev/null && break; sleep 0.2; done
curl -sf $SHOAL_ADDR/v2/health/ready >/dev/null || { echo "servers did not start; see $data/*.log" >&2; exit 1; }
"$shoal" model demo --out "$data/iris"
"$shoal" model push "$data/iris" --name iris
printf 'name = "iris"\nmodel = "iris"\nversion = 1\nreplicas = 2\n' > "$data/iris.toml"
"$shoal" deploy apply -f "$data/iris.toml"
for _ in $(seq 100); do "$shoal" deploy list | grep -q ' 2/2' && break; sleep 0.3; done
"$shoal" deploy list
"$shoal" infer iris --data '[[6.3,3.3,6.0,2.5]]'
echo "cluster up: SHOAL_ADDR=$SHOAL_ADDR; logs in $data; Ctrl-C stops it"
wait
