#!/usr/bin/env bash
# Anchor measurement (the project's reference Serf benchmark, kept with the benchmarks that use it): N real Serf agents (Debian's serf) on loopback; fire K user events and measure the
# time from `serf event` to the last agent's handler run. Prints per-event max latency (ms) and the median.
# usage: serf_anchor.sh [N=12] [K=5]
set -u
N=${1:-12}; K=${2:-5}
command -v serf >/dev/null || apt-get install -y -qq serf >/dev/null 2>&1
D=$(mktemp -d /tmp/serfanchor.XXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$D"; }
trap cleanup EXIT
cat > "$D/h.sh" <<'H'
#!/bin/sh
payload=$(cat)
echo "$payload $(date +%s%N)" >> "$HANDLER_OUT"
H
chmod +x "$D/h.sh"
for i in $(seq 1 "$N"); do
  HANDLER_OUT="$D/recv.$i" serf agent -node=n$i -bind=127.0.0.1:$((17946+i)) -rpc-addr=127.0.0.1:$((17373+i)) \
    -event-handler="user=$D/h.sh" -log-level=warn >"$D/log.$i" 2>&1 &
  pids+=($!)
done
sleep 2
for i in $(seq 2 "$N"); do serf join -rpc-addr=127.0.0.1:$((17373+i)) 127.0.0.1:17947 >/dev/null 2>&1; done
sleep 3
members=$(serf members -rpc-addr=127.0.0.1:17374 | grep -c alive)
lats=()
for k in $(seq 1 "$K"); do
  t0=$(date +%s%N)
  serf event -coalesce=false -rpc-addr=127.0.0.1:17374 policy "v$k" >/dev/null
  for w in $(seq 1 100); do
    n=$(cat "$D"/recv.* 2>/dev/null | grep -c "^v$k ")
    [ "$n" -ge "$N" ] && break; sleep 0.05
  done
  last=$(cat "$D"/recv.* | awk -v k="v$k" '$1==k{print $2}' | sort -n | tail -1)
  got=$(cat "$D"/recv.* | grep -c "^v$k ")
  lats+=($(( (last - t0) / 1000000 )))
  echo "event v$k: $got/$N agents, last after $(( (last - t0) / 1000000 )) ms"
  sleep 1
done
med=$(printf '%s\n' "${lats[@]}" | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}')
echo "serf $N agents ($members alive): median time to last agent ${med} ms over $K events"
