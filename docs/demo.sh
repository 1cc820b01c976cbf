#!/usr/bin/env bash
# Rehearse a whole batch without a Gemini key: a copy of the example marketplace, enhanced
# through the project's Gemini emulator (tests/emulator.py) on 127.0.0.1. Run it with
#     uv run bash docs/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
cp -r docs/example-marketplace "$work/marketplace"
rm -rf "$work/marketplace/.overnight"
port="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
python -m tests.emulator --port "$port" --api-key demo-key --latency 0.05,0.3 > "$work/emulator.log" 2>&1 &
emulator=$!
trap 'kill "$emulator" 2>/dev/null || true' EXIT
for _ in $(seq 50); do
    python -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null && break
    sleep 0.1
done
export GOOGLE_API_KEY=demo-key
overnight run "$work/marketplace" --base-url "http://127.0.0.1:$port" --rpm 120 --rpd 1000
overnight status "$work/marketplace"
overnight audit verify "$work/marketplace"
echo
echo "Enhanced marketplace: $work/marketplace (log: $work/marketplace/.overnight/overnight.db)"
find "$work/marketplace/plugins" -path '*/skills/*/SKILL.md' | sort
