#!/usr/bin/env bash
# Shows why the daemon's background threads join a cgroup of their own
# ([commit] background_cgroup) and do not rely on nice alone (cgroup v1,
# root): the probe of BenchmarkPause spins in a cgroup, as a container
# does, beside two busy loops at nice 19 started from this shell, first in
# this shell's (auto)group, then moved into an idle top-level cpu cgroup.
# Each line is one second of the probe: "<window> <longest gap ns>
# <second longest ns> <sum of gaps over 1 ms, ns>"; the last number is the
# CPU time the "container" lost.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CPU=$(awk '{ for (i = 7; i < NF; i++) if ($i == "-") { if ($(i+1) == "cgroup" && $(i+3) ~ /(^|,)cpu(,|$)/) { print $5; exit } break } }' /proc/self/mountinfo)
[ -n "$CPU" ] || { echo "no cgroup v1 cpu hierarchy mounted" >&2; exit 1; }
WORK=$(mktemp -d)
CTR=$CPU/cpu-share-container LOW=$CPU/cpu-share-background
cleanup() {
	pkill -f 'cpu-share-hog' || true
	kill "${PROBE:-}" 2>/dev/null || true
	sleep 0.2
	rmdir "$CTR" "$LOW" 2>/dev/null || true
	rm -rf "$WORK"
}
trap cleanup EXIT

(cd "$REPO_ROOT" && CGO_ENABLED=0 go build -o "$WORK/probe" ./integration/probe)
mkdir -p "$CTR" "$LOW"
echo 1 >"$LOW/cpu.idle" 2>/dev/null || echo 2 >"$LOW/cpu.shares"

for where in nice-only background-cgroup; do
	"$WORK/probe" -out "$WORK/probe.out" &
	PROBE=$!
	echo "$PROBE" >"$CTR/cgroup.procs"
	sleep 1
	kill -USR1 "$PROBE"
	sleep 0.2
	for _ in 1 2; do
		setsid nice -n 19 bash -c 'exec -a cpu-share-hog bash -c "while :; do :; done"' &
	done
	sleep 0.1
	if [ "$where" = background-cgroup ]; then
		for pid in $(pgrep -f cpu-share-hog); do echo "$pid" >"$LOW/cgroup.procs"; done
	fi
	for _ in 1 2 3 4 5; do
		sleep 1
		kill -USR1 "$PROBE"
		sleep 0.05
		echo "$where: $(cat "$WORK/probe.out")"
	done
	pkill -f cpu-share-hog || true
	kill "$PROBE"
	wait "$PROBE" 2>/dev/null || true
	PROBE=
done
