# Shell library of the lab scenarios (sourced; busybox sh and bash alike).
#
# A scenario prints one line per check, which tests/linux_guest.rs parses:
#   LAB-RESULT <check> ok
#   LAB-RESULT <check> FAIL <why>
# The guest (L2) prints `LAB-GUEST <key> <value...>` lines on its console,
# which the scenario reads from Keel's serial log.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin:$PATH
LAB_DIR=${LAB_DIR:-$(mktemp -d /tmp/lab.XXXXXX)}

ok() { echo "LAB-RESULT $1 ok"; }
fail() {
    local name=$1
    shift
    echo "LAB-RESULT $name FAIL $*"
    echo "$name" >>"$LAB_DIR/failed"
}
# expect NAME ACTUAL WANTED: ok when equal.
expect() {
    if [ "$2" = "$3" ]; then ok "$1"; else fail "$1" "got '$2', want '$3'"; fi
}
# check NAME CMD...: ok when CMD succeeds.
check() {
    local name=$1
    shift
    if "$@" >"$LAB_DIR/check.out" 2>&1; then
        ok "$name"
    else
        fail "$name" "'$*' failed: $(tail -c 300 "$LAB_DIR/check.out" | tr '\n' ' ')"
    fi
}

# wait_file FILE PATTERN SECONDS [PID]: waits until FILE has a line matching
# PATTERN (grep -E); returns 1 on timeout. With PID, gives up as soon as
# that process has ended (after one last look at FILE).
wait_file() {
    local file=$1 pattern=$2 deadline=$(($(date +%s) + $3)) pid=${4:-}
    while ! grep -qE "$pattern" "$file" 2>/dev/null; do
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            grep -qE "$pattern" "$file" 2>/dev/null
            return
        fi
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

# wait_console CONSOLE PATTERN SECONDS: wait_file for a line from the guest
# of the keel started last, which gives up as soon as that keel has ended
# (a guest that died does not print: no use waiting out the time).
wait_console() {
    wait_file "$1" "$2" "$3" "$KEEL_PID"
}

# guest CONSOLE KEY: the value of the last `LAB-GUEST KEY value` line.
guest() {
    tr -d '\r' <"$1" | sed -n "s/^LAB-GUEST $2 //p" | tail -n1
}

# start_keel NAME ARGS...: starts keel in the background, console in
# $LAB_DIR/NAME.console, log in $LAB_DIR/NAME.log, pid in KEEL_PID.
start_keel() {
    local name=$1
    shift
    : >"$LAB_DIR/$name.console"
    "$LAB_KEEL" --serial "file=$LAB_DIR/$name.console" "$@" >"$LAB_DIR/$name.log" 2>&1 &
    KEEL_PID=$!
    KEEL_NAME=$name
    KEEL_START=$(date +%s)
    echo "lab: run $name started: keel $*"
}

# triple_faulted NAME: whether run NAME's guest triple-faulted (keel's log
# says so). The emulated SVM now and then spoils a guest that way (README,
# "Linux guests"); no scenario makes its guest triple-fault.
triple_faulted() {
    grep -q 'VM ended: guest triple-faulted' "$LAB_DIR/$1.log" 2>/dev/null
}

# keep_spoilt NAME WHEN: keeps run NAME's console and log as
# NAME-spoilt<N>.* (the next free N; `finish` prints them, the harness does
# not judge them) and says on a `lab: RUN-RETRY` line that its guest
# triple-faulted WHEN and that the run goes again (the harness reports it).
keep_spoilt() {
    local n=1
    while [ -e "$LAB_DIR/$1-spoilt$n.log" ]; do n=$((n + 1)); done
    mv "$LAB_DIR/$1.console" "$LAB_DIR/$1-spoilt$n.console"
    mv "$LAB_DIR/$1.log" "$LAB_DIR/$1-spoilt$n.log"
    echo "lab: RUN-RETRY $1: its L2 guest triple-faulted $2 (kept as $1-spoilt$n); running it again"
}

# boot_keel NAME ARGS...: start_keel, then waits (up to 300 s) until the
# guest's /init says it is there or keel has ended. A guest that
# triple-faulted before its /init is booted again, up to 3 boots in all:
# before /init nothing of the guest's has written to its disks, so the run
# starts from the same state. For runs whose VMM itself changes state before
# the boot (`--boot-slot` advances grubenv), use start_keel.
boot_keel() {
    local name=$1 n=1
    shift
    while :; do
        start_keel "$name" "$@"
        wait_console "$LAB_DIR/$name.console" 'KEEL-LINUX-GUEST: init reached' 300 && return 0
        triple_faulted "$name" && [ "$n" -lt 3 ] || return 0
        wait "$KEEL_PID" 2>/dev/null
        keep_spoilt "$name" "before /init, $(($(date +%s) - KEEL_START)) s after start"
        n=$((n + 1))
    done
}

# wait_keel SECONDS: waits for $KEEL_PID to exit; sets KEEL_RC (124 and a
# kill -9 on timeout).
wait_keel() {
    local deadline=$(($(date +%s) + $1))
    while kill -0 "$KEEL_PID" 2>/dev/null; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            kill -9 "$KEEL_PID" 2>/dev/null
            wait "$KEEL_PID" 2>/dev/null
            KEEL_RC=124
            echo "lab: run $KEEL_NAME still running after $1 s: killed"
            return 1
        fi
        sleep 0.2
    done
    wait "$KEEL_PID"
    KEEL_RC=$?
    echo "lab: run $KEEL_NAME ended with $KEEL_RC after $(($(date +%s) - KEEL_START)) s"
    return 0
}

# end_line FILE: after FILE was printed, a newline if FILE does not end in
# one (a console cut off mid-line by a hung guest must not glue what comes
# next to its last line).
end_line() {
    [ -z "$(tail -c 1 "$1")" ] || echo
}

# show NAME: prints a run's console and log (for a failed check's context).
show() {
    echo "----- $1: console -----"
    tr -d '\r' <"$LAB_DIR/$1.console" | tail -n 60
    end_line "$LAB_DIR/$1.console"
    echo "----- $1: keel log -----"
    tail -n 40 "$LAB_DIR/$1.log"
    echo "----- end of $1 -----"
}

# The L2 kernel's command line for a guest scenario.
l2_cmdline() {
    echo "console=ttyS0 reboot=k panic=1 nokaslr lab=$1"
}

# finish: after a scenario with a failed check, prints every run's whole
# console and log (the harness keeps this output).
finish() {
    [ -s "$LAB_DIR/failed" ] || return 0
    local f
    for f in "$LAB_DIR"/*.console "$LAB_DIR"/*.log; do
        [ -f "$f" ] || continue
        echo "===== $f ====="
        tr -d '\r' <"$f"
        end_line "$f"
    done
    echo "===== end of the runs' logs ====="
}

# agent_config: prints the keel-agent settings every lab scenario shares
# (guest CID 3, the vsock socket, version file, state, grubenv, Keel's API
# socket in $LAB_DIR); a scenario appends its own.
agent_config() {
    cat <<TOML
guest_cid = 3
vsock_socket = "$LAB_DIR/vsock.sock_19090"
version_file = "$LAB_DIR/version"
state_dir = "$LAB_DIR/agent-state"
grubenv = "$LAB_DIR/grubenv"
keel_api_socket = "$LAB_DIR/api.sock"
TOML
}

# start_agent CONFIG CHECK: starts keel-agent with CONFIG (AGENT_PID) and
# waits for its vsock socket ($LAB_DIR/vsock.sock_19090); CHECK reports it.
start_agent() {
    "$LAB_AGENT" --config "$1" serve >"$LAB_DIR/agent.log" 2>&1 &
    AGENT_PID=$!
    local n=0
    while [ ! -S "$LAB_DIR/vsock.sock_19090" ] && [ "$n" -lt 150 ]; do
        n=$((n + 1))
        sleep 0.2
    done
    if [ -S "$LAB_DIR/vsock.sock_19090" ]; then
        ok "$2"
    else
        fail "$2" "$(tail -n 5 "$LAB_DIR/agent.log" | tr '\n' ' ')"
    fi
}
