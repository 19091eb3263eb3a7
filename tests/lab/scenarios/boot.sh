# Lab scenario: boot (topology, CPUID flags, memory), Debian's stock kernel,
# and the VM's lifecycle (control socket, shutdown, SIGTERM, timeout, reboot,
# panic). Runs in L1 (or on a host with vmx/svm); see tests/lab/l1.sh.
. "$LAB_LIB"
K=$LAB_L2_KERNEL
I=$LAB_L2_INITRD

# boot_layout NAME CPUS: one boot of lab_boot; checks the common facts.
boot_layout() {
    local name=$1 cpus=$2
    boot_keel "$name" --transport mmio --kernel "$K" --initrd "$I" --cmdline "$(l2_cmdline boot)" \
        --memory size=256M --cpus "$cpus"
    wait_keel 240
    local c=$LAB_DIR/$name.console
    expect "boot.$name.init-reached" "$(grep -c 'KEEL-LINUX-GUEST: init reached' "$c")" 1
    expect "boot.$name.exit-reset" "$KEEL_RC" 3
    expect "boot.$name.nproc" "$(guest "$c" nproc)" 2
    case " $(guest "$c" flags) " in
        *" hypervisor "*) ok "boot.$name.hypervisor-flag" ;;
        *) fail "boot.$name.hypervisor-flag" "no hypervisor flag" ;;
    esac
    local mem
    mem=$(guest "$c" memtotal-kib)
    if [ -n "$mem" ] && [ "$mem" -gt $((200 << 10)) ] && [ "$mem" -le $((256 << 10)) ]; then
        ok "boot.$name.memory"
    else
        fail "boot.$name.memory" "MemTotal ${mem:-?} KiB for 256 MiB"
    fi
    [ "$(guest "$c" boot)" = done ] || show "$name"
}

# 1 socket x 1 core x 2 threads, AES masked.
boot_layout smt boot=2,sockets=1,cores=1,threads=2,mask=aes
c=$LAB_DIR/smt.console
expect boot.smt.cpu0 "$(guest "$c" topology-cpu0)" "package=0 core=0 siblings=0-1"
expect boot.smt.cpu1 "$(guest "$c" topology-cpu1)" "package=0 core=0 siblings=0-1"
expect boot.smt.packages "$(guest "$c" cpuinfo-packages)" 1
case " $(guest "$c" flags) " in
    *" aes "*) fail boot.smt.aes-masked "aes still in /proc/cpuinfo" ;;
    *) ok boot.smt.aes-masked ;;
esac

# 2 sockets x 1 core x 1 thread, nothing masked: AES is there (so the mask
# check above is not vacuous).
boot_layout sockets boot=2,sockets=2,cores=1,threads=1
c=$LAB_DIR/sockets.console
expect boot.sockets.cpu0 "$(guest "$c" topology-cpu0)" "package=0 core=0 siblings=0"
expect boot.sockets.cpu1 "$(guest "$c" topology-cpu1)" "package=1 core=0 siblings=1"
expect boot.sockets.packages "$(guest "$c" cpuinfo-packages)" 2
case " $(guest "$c" flags) " in
    *" aes "*) ok boot.sockets.aes-unmasked ;;
    *) fail boot.sockets.aes-unmasked "aes missing without a mask" ;;
esac

# Debian's stock kernel (a bzImage): boot, console, shutdown (its reboot).
# Its virtio modules come with LAB_STOCK_INITRD; it finds the disk through
# the DSDT (it has no virtio_mmio command-line devices built in).
if [ -n "${LAB_STOCK_KERNEL:-}" ]; then
    dd if=/dev/zero of="$LAB_DIR/stock.img" bs=1M count=8 2>/dev/null
    boot_keel stock --transport mmio --kernel "$LAB_STOCK_KERNEL" --initrd "${LAB_STOCK_INITRD:-$I}" \
        --cmdline "console=ttyS0 reboot=k panic=1 lab=boot" --memory size=256M --cpus boot=1 \
        --disk "path=$LAB_DIR/stock.img,readonly=on"
    wait_keel 400
    c=$LAB_DIR/stock.console
    expect stock.init-reached "$(grep -c 'KEEL-LINUX-GUEST: init reached' "$c")" 1
    expect stock.console "$(guest "$c" boot)" done
    expect stock.exit-reset "$KEEL_RC" 3
    expect stock.virtio-blk-from-acpi "$(guest "$c" disks)" "vda"
    # Keel's CMOS RTC, found through the DSDT (PNP0B00): rtc_cmos binds,
    # and the guest's clock reads L1's time (UTC) within 5 minutes (the
    # emulation is slow; the guest read it a while ago).
    # (rtc0's name is the driver and its PNP device: "rtc_cmos 00:02".)
    rtc_name=$(guest "$c" rtc0-name)
    expect stock.rtc-cmos "${rtc_name%% *}" "rtc_cmos"
    rtc=$(guest "$c" rtc0-epoch)
    now=$(date +%s)
    if [ -n "$rtc" ] && [ $((now - rtc)) -le 300 ] && [ $((rtc - now)) -le 300 ]; then
        ok stock.rtc-time
    else
        fail stock.rtc-time "guest RTC ${rtc:-?}, L1 time $now"
    fi
    [ "$KEEL_RC" = 3 ] || show stock
else
    fail stock.init-reached "LAB_STOCK_KERNEL not given"
fi

# Lifecycle: the control socket, then a graceful shutdown through it.
sock=$LAB_DIR/api.sock
ctl() { "$LAB_KEELCTL" --socket "$sock" "$@"; }
state() { ctl --json info 2>/dev/null | sed -n 's/.*"state":"\([a-z-]*\)".*/\1/p'; }
last_tick() { tr -d '\r' <"$1" | sed -n 's/^LAB-GUEST tick \([0-9]*\)$/\1/p' | tail -n1; }

# The minimal kernel has no ACPI button driver: its busybox init acts on
# Ctrl-Alt-Del, so these runs ask for that method (the default is the
# ACPI power button).
boot_keel life --transport mmio --kernel "$K" --initrd "$I" --cmdline "$(l2_cmdline lifecycle)" \
    --memory size=256M --cpus boot=1 --api-socket "$sock" --shutdown-timeout 120 \
    --shutdown-method ctrl-alt-del
c=$LAB_DIR/life.console
if wait_console "$c" '^LAB-GUEST tick 2' 240; then ok lifecycle.up; else fail lifecycle.up "no heartbeat"; show life; fi
expect lifecycle.info-running "$(state)" running
check lifecycle.pause ctl pause
expect lifecycle.info-paused "$(state)" paused
size1=$(wc -c <"$c")
sleep 3
size2=$(wc -c <"$c")
expect lifecycle.paused-guest-silent "$size2" "$size1"
n=$(last_tick "$c")
check lifecycle.resume ctl resume
if wait_console "$c" "^LAB-GUEST tick $((n + 2))" 60; then ok lifecycle.runs-after-resume; else fail lifecycle.runs-after-resume "no tick after $n"; fi
check lifecycle.shutdown-request ctl shutdown --timeout 120
# graceful_end RUN CHECK: the run's guest saw Ctrl-Alt-Del, powered off by
# itself (S5 through ACPI) before the timeout, and keel exited 0.
graceful_end() {
    wait_keel 180
    if grep -q 'LAB-GUEST ctrlaltdel received' "$LAB_DIR/$1.console"; then ok "$2-reaches-init"; else fail "$2-reaches-init" "init never saw Ctrl-Alt-Del"; fi
    expect "$2-exit" "$KEEL_RC" 0
    if grep -q 'VM ended: stopped on graceful shutdown' "$LAB_DIR/$1.log"; then ok "$2-graceful"; else fail "$2-graceful" "$(tail -n 3 "$LAB_DIR/$1.log" | tr '\n' ' ')"; fi
}
graceful_end life lifecycle.shutdown

# SIGTERM: the same graceful path.
boot_keel term --transport mmio --kernel "$K" --initrd "$I" --cmdline "$(l2_cmdline lifecycle)" \
    --memory size=256M --cpus boot=1 --shutdown-timeout 120 --shutdown-method ctrl-alt-del
c=$LAB_DIR/term.console
wait_console "$c" '^LAB-GUEST tick 2' 240 || show term
kill -TERM "$KEEL_PID"
graceful_end term lifecycle.sigterm

# A guest that ignores the request is stopped at the timeout.
boot_keel ignore --transport mmio --kernel "$K" --initrd "$I" --cmdline "$(l2_cmdline lifecycle-ignore)" \
    --memory size=256M --cpus boot=1 --api-socket "$sock" --shutdown-method ctrl-alt-del
c=$LAB_DIR/ignore.console
wait_console "$c" '^LAB-GUEST tick 2' 240 || show ignore
check lifecycle.ignore-request ctl shutdown --timeout 5
wait_keel 60
if grep -q 'LAB-GUEST ctrlaltdel ignored' "$c"; then ok lifecycle.ignore-reaches-init; else fail lifecycle.ignore-reaches-init "init never saw Ctrl-Alt-Del"; fi
expect lifecycle.ignore-stopped-at-timeout "$KEEL_RC" 0
if grep -q 'shutdown timeout; forced stop' "$LAB_DIR/ignore.log"; then ok lifecycle.ignore-forced-stop-logged; else fail lifecycle.ignore-forced-stop-logged "$(tail -n 3 "$LAB_DIR/ignore.log" | tr '\n' ' ')"; fi

# The guest's reboot, and a guest panic (panic=1 reboots): exit 3.
boot_keel reboot --transport mmio --kernel "$K" --initrd "$I" --cmdline "$(l2_cmdline reboot)" --memory size=256M
wait_keel 240
expect lifecycle.reboot-exit "$KEEL_RC" 3
boot_keel panic --transport mmio --kernel "$K" --initrd "$I" --cmdline "$(l2_cmdline panic)" --memory size=256M
wait_keel 240
expect lifecycle.panic-exit "$KEEL_RC" 3
if grep -q 'Kernel panic' "$LAB_DIR/panic.console"; then ok lifecycle.panic-logged; else fail lifecycle.panic-logged "no panic on the console"; fi
finish
