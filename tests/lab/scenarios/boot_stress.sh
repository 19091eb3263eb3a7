# Lab diagnostic (not part of the test tier): boots the 1-vCPU lifecycle
# guest LAB_STRESS_N times (default 40) and, when a boot stops before the
# guest's second heartbeat (console silent for 45 s, or the VMM gone),
# prints what L1 can see of the stuck vCPU: thread states, KVM debugfs and
# 2 s of KVM trace events. LAB_STRESS_VMM=qemu boots the same kernel and
# initramfs with QEMU (-M microvm -accel kvm) instead of Keel, for
# comparison; it needs LAB_QEMU (qemu-system-x86_64) and LAB_QBIOS (a copy
# of QEMU's bios-microvm.bin, with pvh.bin and linuxboot_dma.bin beside it,
# each passed as its own LAB_ variable so that l1.sh copies it).
#   LAB_L2_KERNEL=... LAB_L2_INITRD=... LAB_KEEL=... LAB_TIMEOUT=7000 \
#       tests/lab/l1.sh tests/lab/scenarios/boot_stress.sh
# Ends with `LAB-STRESS <stopped> of <N>`; each boot prints `LAB-STRESS-RUN`.
. "$LAB_LIB"
K=$LAB_L2_KERNEL
I=$LAB_L2_INITRD
N=${LAB_STRESS_N:-40}
VMM=${LAB_STRESS_VMM:-keel}
mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null
mount -t debugfs nodev /sys/kernel/debug 2>/dev/null
T=/sys/kernel/tracing

# diagnose PID: what L1 sees of a stuck VMM process.
diagnose() {
    local pid=$1 t d f
    echo "=== stuck: $KEEL_NAME (pid $pid)"
    for t in /proc/"$pid"/task/*; do echo "thread $(cat "$t/comm") state/utime/stime $(cut -d' ' -f3,14,15 "$t/stat") wchan=$(cat "$t/wchan")"; done
    sleep 2
    for t in /proc/"$pid"/task/*; do echo "thread $(cat "$t/comm") 2 s later $(cut -d' ' -f3,14,15 "$t/stat")"; done
    for d in /sys/kernel/debug/kvm/"$pid"-*/vcpu*; do
        [ -d "$d" ] || continue
        for f in "$d"/*; do [ -f "$f" ] && echo "debugfs $(basename "$d")/$(basename "$f"): $(head -c 200 "$f" 2>/dev/null)"; done
    done
    if [ -d "$T/events/kvm" ]; then
        echo 0 >"$T/tracing_on"
        : >"$T/trace"
        echo 1 >"$T/events/kvm/enable"
        echo 1 >"$T/tracing_on"
        sleep 2
        echo 0 >"$T/tracing_on"
        echo "--- KVM trace, $(wc -l <"$T/trace") lines; the first 60:"
        head -n 72 "$T/trace"
        echo 0 >"$T/events/kvm/enable"
    else
        echo "no KVM trace events in L1"
    fi
    echo "=== end of $KEEL_NAME"
}

start_vmm() {
    if [ "$VMM" = qemu ]; then
        : >"$LAB_DIR/$1.console"
        "$LAB_QEMU" -M microvm -accel kvm -cpu host -smp 1 -m 256 -L "$(dirname "$LAB_QBIOS")" \
            -kernel "$K" -initrd "$I" -append "$(l2_cmdline lifecycle)" -display none \
            -monitor none -serial "file:$LAB_DIR/$1.console" -no-reboot >"$LAB_DIR/$1.log" 2>&1 &
        KEEL_PID=$!
        KEEL_NAME=$1
        KEEL_START=$(date +%s)
    else
        start_keel "$1" --transport mmio --kernel "$K" --initrd "$I" --cmdline "$(l2_cmdline lifecycle)" \
            --memory size=256M --cpus boot=1 --shutdown-timeout 60 --shutdown-method ctrl-alt-del
    fi
}

i=0
stopped=0
while [ "$i" -lt "$N" ]; do
    i=$((i + 1))
    start_vmm "r$i"
    c=$LAB_DIR/r$i.console
    last=-1
    quiet=0
    up=0
    while :; do
        if grep -q '^LAB-GUEST tick 2' "$c" 2>/dev/null; then
            up=1
            break
        fi
        kill -0 "$KEEL_PID" 2>/dev/null || break
        size=$(wc -c <"$c")
        if [ "$size" = "$last" ]; then quiet=$((quiet + 1)); else quiet=0 last=$size; fi
        [ "$quiet" -ge 90 ] && break
        sleep 0.5
    done
    if [ "$up" = 1 ]; then
        echo "LAB-STRESS-RUN r$i up after $(($(date +%s) - KEEL_START)) s"
        kill -9 "$KEEL_PID" 2>/dev/null
        wait "$KEEL_PID" 2>/dev/null
    else
        stopped=$((stopped + 1))
        echo "LAB-STRESS-RUN r$i STOPPED after $(($(date +%s) - KEEL_START)) s"
        if kill -0 "$KEEL_PID" 2>/dev/null; then diagnose "$KEEL_PID"; fi
        kill -9 "$KEEL_PID" 2>/dev/null
        wait "$KEEL_PID" 2>/dev/null
        show "r$i"
    fi
done
echo "LAB-STRESS $stopped of $N"
