#!/usr/bin/env bash
# Smoke test of a built sectorlog executable (CI runs it on dist/sectorlog after `deno task build`):
# --version, snapshot + restore of a small image, and DESIGN.md's exit codes for a success, a usage
# error, an integrity error and a busy lock. Usage: scripts/smoke_binary.sh [path/to/sectorlog]
set -euo pipefail
binary=$(realpath "${1:-dist/sectorlog}")
work=$(mktemp -d)
holder=""
cleanup() {
  if [ -n "$holder" ]; then kill "$holder" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
cd "$work"

fail() {
  echo "smoke: FAILED: $*" >&2
  exit 1
}

# expect CODE ARGS...: runs the binary and checks its exit code.
expect() {
  local want=$1 got=0
  shift
  "$binary" "$@" >out.txt 2>err.txt || got=$?
  if [ "$got" != "$want" ]; then
    cat out.txt err.txt >&2
    fail "sectorlog $* exited $got, expected $want"
  fi
  echo "smoke: sectorlog $* → exit $got"
}

version=$("$binary" --version)
[[ "$version" =~ ^sectorlog\ [0-9.]+\ \(logdir\ format\ [0-9]+,\ entry\ format\ [0-9]+,\ ship\ protocol\ [0-9]+\)$ ]] ||
  fail "unexpected --version output: $version"
echo "smoke: $version"

truncate -s 8M disk.img
printf 'sectorlog smoke test' | dd of=disk.img bs=1 seek=1048576 conv=notrunc status=none
expect 0 snapshot disk.img log
expect 0 mark log smoke
expect 0 restore log out.img --at mark:smoke
cmp disk.img out.img || fail "the restored image differs from the snapshot"
expect 0 verify log

expect 2 restore log out2.img --at not-a-time
expect 2 frobnicate

if command -v flock >/dev/null; then
  flock --no-fork log/lock sleep 30 &
  holder=$!
  for _ in $(seq 100); do
    flock -n -E 75 log/lock true && status=0 || status=$?
    [ "$status" = 75 ] && break
    sleep 0.1
  done
  expect 4 mark log busy
  kill "$holder" && wait "$holder" 2>/dev/null || true
  holder=""
else
  echo "smoke: skipping the busy-lock check: flock is not installed"
fi

base=$(sed -n 's/.*"file": *"\(base[^"]*\)".*/\1/p' log/manifest.json | head -n 1)
[ -n "$base" ] || fail "no base file named in log/manifest.json"
printf '\xff\xff\xff\xff' | dd of="log/$base" bs=1 seek=4096 conv=notrunc status=none
expect 3 verify log
echo "smoke: ok"
