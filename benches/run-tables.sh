#!/usr/bin/env bash
# Reruns every table of the README's "Benchmarks" in one go, all VMMs in the
# same run: each keel-bench subcommand writes its JSON into OUT_DIR, then
# `keel-bench report` draws OUT_DIR/charts. Prints each bench's duration.
#
# usage: benches/run-tables.sh OUT_DIR [PREVIOUS_RUN_DIR...]
#   RUNS (default 3): runs per cell of the guest benches (medians of RUNS).
#   FIRECRACKER=PATH: a Firecracker binary built by hand (this project never
#   fetches or builds it); without it every Firecracker cell says "not
#   measured". QEMU is taken from $PATH (Debian's qemu-system-x86).
#   BENCHES (default "boot startup blk blk-guest api vsock net"): which ones.
#   PREVIOUS_RUN_DIR: earlier runs drawn beside this one in the charts.
# Needs root (loop devices, a network namespace, hugepages), /dev/kvm and a
# release build (`cargo build --release --workspace`). Run it on a quiet
# host: these are throughput figures, and the ratios are only as good as
# the machine is still.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benches/run-tables.sh OUT_DIR [PREVIOUS_RUN_DIR...]}
shift
runs=${RUNS:-3}
bench=./target/release/keel-bench
[ -x "$bench" ] || { echo "no $bench: run cargo build --release --workspace first" >&2; exit 1; }
fc=()
if [ -n "${FIRECRACKER:-}" ]; then
    [ -f "$FIRECRACKER" ] || { echo "FIRECRACKER=$FIRECRACKER is not a file" >&2; exit 1; }
    fc=(--firecracker "$FIRECRACKER")
else
    echo "Firecracker: not measured (set FIRECRACKER=PATH to a binary built by hand)" >&2
fi
mkdir -p "$out"
json=(--json-dir "$out")
total=$SECONDS
for b in ${BENCHES:-boot startup blk blk-guest api vsock net}; do
    case "$b" in
        boot) args=(boot --runs $((runs * 3)) "${fc[@]}") ;;
        startup) args=(startup --runs "$runs") ;;
        blk) args=(blk --seconds 2) ;;
        blk-guest) args=(blk-guest --runs "$runs" "${fc[@]}") ;;
        api) args=(api) ;;
        vsock) args=(vsock --runs "$runs" "${fc[@]}") ;;
        net) args=(net --runs "$runs" "${fc[@]}") ;;
        *) echo "unknown bench $b" >&2; exit 2 ;;
    esac
    echo "== keel-bench ${args[*]}"
    t=$SECONDS
    "$bench" "${args[@]}" "${json[@]}" 2>&1 | tee "$out/$b.txt"
    echo "== $b took $((SECONDS - t)) s"
done
"$bench" report "$out" "$@" --out "$out/charts"
echo "== all tables took $((SECONDS - total)) s; JSON, text and charts in $out"
