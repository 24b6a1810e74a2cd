#!/usr/bin/env bash
# CPU per proxied streamed request at concurrency 64, one process per proxy in front of the
# stand-in engine, the same load for all: a minimal ASGI proxy on uvicorn (proxy_app.py:asgi),
# the same logic on granian (RSGI and ASGI), our sidecar, our coordinator (round-robin), and
# vllm-router round_robin. Needs granian in GRANIAN_LIB (pip install --target DIR granian==2.8.7):
# it is not a dependency of pd-runtime. Run from the repository root.
set -euo pipefail
PY=${PY:-.venv/bin/python}
HERE=benchmarks/results/2026-12-07-hop/minimal-proxy
GRANIAN_LIB=${GRANIAN_LIB:-/tmp/granian-lib}
ROUNDS=${ROUNDS:-3}
N=${N:-8000}
LOGS=$(mktemp -d)
cleanup() { kill $(jobs -p) 2>/dev/null || true; }
trap cleanup EXIT
$PY benchmarks/standin_openai.py --port 13001 >"$LOGS/standin.log" 2>&1 &
PYTHONPATH=$HERE $PY -m uvicorn proxy_app:asgi --port 13101 --loop uvloop --http httptools \
  --no-access-log --log-level warning >"$LOGS/uvicorn.log" 2>&1 &
UV=$!
PYTHONPATH=$GRANIAN_LIB:$HERE $PY -m granian --interface rsgi --port 13102 --loop uvloop \
  --workers 1 --runtime-threads 1 --log-level warning --no-ws proxy_app:rsgi >"$LOGS/gr-rsgi.log" 2>&1 &
GR=$!
PYTHONPATH=$GRANIAN_LIB:$HERE $PY -m granian --interface asgi --port 13103 --loop uvloop \
  --workers 1 --runtime-threads 1 --log-level warning --no-ws proxy_app:asgi >"$LOGS/gr-asgi.log" 2>&1 &
GA=$!
$PY -m pd_runtime sidecar --port 13011 --decode-url http://127.0.0.1:13001 \
  --prefiller 127.0.0.1:13002 --log-level info >"$LOGS/sidecar.log" 2>&1 &
SC=$!
cat >"$LOGS/coord.yaml" <<YAML
{host: 127.0.0.1, port: 13021, models: [standin], scheduler: {policy: round-robin, params: {}},
 endpoints: [{name: decode-0, role: decode, address: "127.0.0.1:13001", url: "http://127.0.0.1:13001"}]}
YAML
$PY -m pd_runtime coordinator --config "$LOGS/coord.yaml" --log-level info >"$LOGS/coord.log" 2>&1 &
CO=$!
.venv/bin/vllm-router --host 127.0.0.1 --port 13031 --worker-urls http://127.0.0.1:13001 \
  --policy round_robin --prometheus-host 127.0.0.1 --prometheus-port 13041 --log-level warning >"$LOGS/router.log" 2>&1 &
RR=$!
sleep 8
for round in $(seq 1 "$ROUNDS"); do
  echo "# round $round"
  $PY $HERE/load.py http://127.0.0.1:13101/v1/completions 64 "$N" $UV "uvicorn, minimal ASGI proxy"
  $PY $HERE/load.py http://127.0.0.1:13102/v1/completions 64 "$N" $GR "granian RSGI, minimal proxy"
  $PY $HERE/load.py http://127.0.0.1:13103/v1/completions 64 "$N" $GA "granian ASGI, minimal proxy"
  $PY $HERE/load.py http://127.0.0.1:13011/v1/completions 64 "$N" $SC "our sidecar (direct mode)"
  $PY $HERE/load.py http://127.0.0.1:13021/v1/completions 64 "$N" $CO "our coordinator, round-robin"
  $PY $HERE/load.py http://127.0.0.1:13031/v1/completions 64 "$N" $RR "vllm-router round_robin"
done
