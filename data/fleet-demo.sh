#!/usr/bin/env bash
# A fleet on loopback: a nats-server with JetStream, a test receiver, three agents owning 12
# partitions between them, the sample updates published into the stream. Needs nats-server
# (Debian: apt-get install nats-server) and a built outpost (cargo build --release).
#
#   data/fleet-demo.sh [path/to/outpost]
#
# It prints what each agent took and what the receiver got, then stops everything and removes
# its folder.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
outpost=${1:-$here/../target/release/outpost}
command -v nats-server >/dev/null || { echo "nats-server is not installed (apt-get install nats-server)" >&2; exit 1; }
[ -x "$outpost" ] || { echo "no outpost binary at $outpost (cargo build --release)" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

nats-server -js -a 127.0.0.1 -p 14222 -sd "$work/nats" >"$work/nats.log" 2>&1 & pids+=($!)
"$outpost" receiver --listen 127.0.0.1:18687 --out "$work/exports.ndjson" 2>"$work/receiver.log" & pids+=($!)
sleep 1
for pid in "${pids[@]}"; do
    kill -0 "$pid" 2>/dev/null || { echo "nats-server or the receiver did not start (ports 14222, 18687 in use?)" >&2; exit 1; }
done

owned=("0-3" "4-7" "8-11")
for i in 0 1 2; do
    mkdir -p "$work/agent$i"
    sed -e "s|^path = \"outpost-data\"|path = \"store\"|" -e "s|127.0.0.1:8687|127.0.0.1:18687|g" \
        -e "s|^listen = \"127.0.0.1:8686\"|listen = \"127.0.0.1:1868$i\"|" \
        "$here/outpost.example.toml" >"$work/agent$i/outpost.toml"
    cat >>"$work/agent$i/outpost.toml" <<TOML

[source.nats]
servers = ["nats://127.0.0.1:14222"]
partitions = 12
owned = "${owned[$i]}"
TOML
done
export OUTPOST_CLIENT_SECRET=change-me
"$outpost" nats setup --config "$work/agent0/outpost.toml"
for i in 0 1 2; do
    OUTPOST_LOG=warn "$outpost" run --config "$work/agent$i/outpost.toml" 2>"$work/agent$i.log" & pids+=($!)
done
sleep 1
"$outpost" publish --config "$work/agent0/outpost.toml" "$here/sample-updates.ndjson"
sleep 5
for i in 0 1 2; do
    echo "agent $i (partitions ${owned[$i]}):"
    curl -s "http://127.0.0.1:1868$i/metrics" | grep -E '^outpost_(source_messages_total|source_acks_total|exports_total)' | sed 's/^/  /'
    "$outpost" outbox stats --config "$work/agent$i/outpost.toml" | sed 's/^/  /'
    "$outpost" rejected list --config "$work/agent$i/outpost.toml" | sed "s/^/  /"
done
echo "receiver: $(wc -l <"$work/exports.ndjson") exports received"
