# Guest half of the lab scenarios (tests/lab/, tests/linux_guest.rs): sourced
# by /init when the command line has `lab=<name>`, which runs lab_<name>.
# Results are `LAB-GUEST <key> <value>` lines on the console; the host half
# (tests/lab/scenarios/) judges them.

g() { echo "LAB-GUEST $*"; }

# Stays up until the host ends the VM.
idle() { while :; do sleep 3600; done; }

lab_boot() {
    g nproc "$(nproc)"
    for c in /sys/devices/system/cpu/cpu[0-9]*; do
        g "topology-$(basename "$c")" \
            "package=$(cat "$c/topology/physical_package_id")" \
            "core=$(cat "$c/topology/core_id")" \
            "siblings=$(cat "$c/topology/thread_siblings_list")"
    done
    g cpuinfo-packages "$(grep '^physical id' /proc/cpuinfo | sort -u | wc -l)"
    g flags "$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2)"
    g memtotal-kib "$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
    # shellcheck disable=SC2046 # word splitting joins the names with spaces
    g disks "$(echo $(ls /sys/block | grep '^vd'))"
    # The CMOS RTC (a kernel with an RTC driver: Debian's binds rtc_cmos).
    g rtc0-name "$(cat /sys/class/rtc/rtc0/name 2>/dev/null)"
    g rtc0-epoch "$(cat /sys/class/rtc/rtc0/since_epoch 2>/dev/null)"
    g boot done
}

# First boot of the blk scenario: vda a file disk, vdb a loop device, vdc
# read-only.
lab_blk_write() {
    mkdir -p /mnt/a /mnt/b
    # vda: ext4 without discarding at mkfs (the host pre-filled it), files
    # with checksums, then fstrim gives the free space back.
    /usr/sbin/mke2fs -q -F -t ext4 -E nodiscard /dev/vda && mount -t ext4 /dev/vda /mnt/a &&
        g mkfs-vda ok || g mkfs-vda fail
    for i in 1 2 3 4; do
        dd if=/dev/urandom of=/mnt/a/f$i bs=64k count=$((i * 4)) 2>/dev/null
    done
    (cd /mnt/a && sha256sum f1 f2 f3 f4 > SUMS) && g files-vda ok || g files-vda fail
    sync
    fstrim /mnt/a && g fstrim ok || g fstrim fail
    umount /mnt/a && g umount-vda ok || g umount-vda fail
    # vdb: a 32 MiB filesystem on the 64 MiB loop device; the tail is discarded.
    /usr/sbin/mke2fs -q -F -t ext4 /dev/vdb 32M && mount -t ext4 /dev/vdb /mnt/b &&
        g mkfs-vdb ok || g mkfs-vdb fail
    dd if=/dev/urandom of=/mnt/b/big bs=1M count=8 2>/dev/null
    (cd /mnt/b && sha256sum big > SUMS) && g files-vdb ok || g files-vdb fail
    umount /mnt/b && g umount-vdb ok || g umount-vdb fail
    blkdiscard -o $((48 << 20)) -l $((8 << 20)) /dev/vdb && g blkdiscard ok || g blkdiscard fail
    # vdc: the kernel knows it is read-only, and a write fails.
    g vdc-ro "$(cat /sys/block/vdc/ro)"
    if dd if=/dev/zero of=/dev/vdc bs=4096 count=1 conv=fsync 2>/dev/null; then
        g vdc-write accepted
    else
        g vdc-write refused
    fi
    sync
    g blk-write done
}

# fsck_and_verify DEV MOUNTPOINT: e2fsck clean, then every checksum matches.
fsck_and_verify() {
    # Mounting replays the journal (as a boot would); then a read-only fsck.
    mkdir -p "$2"
    mount -t ext4 "$1" "$2" && umount "$2"
    /usr/sbin/e2fsck -fn "$1" >/tmp/fsck.out 2>&1
    g "fsck-$(basename "$1")" "$?"
    mkdir -p "$2"
    mount -t ext4 -o ro "$1" "$2" || { g "verify-$(basename "$1")" "mount failed"; return; }
    if (cd "$2" && sha256sum -c SUMS >/tmp/sums.out 2>&1); then
        g "verify-$(basename "$1")" ok
    else
        g "verify-$(basename "$1")" "$(tr '\n' ' ' </tmp/sums.out)"
    fi
    umount "$2"
}

# Second boot: both filesystems are clean and intact.
lab_blk_check() {
    fsck_and_verify /dev/vda /mnt/a
    fsck_and_verify /dev/vdb /mnt/b
    g blk-check done
}

# Writes a file, syncs, says so and waits to be killed (kill -9 of keel).
lab_blk_kill() {
    mkdir -p /mnt/a
    mount -t ext4 /dev/vda /mnt/a || { g synced "mount failed"; idle; }
    dd if=/dev/urandom of=/mnt/a/after-kill bs=64k count=32 2>/dev/null
    (cd /mnt/a && sha256sum f1 f2 f3 f4 after-kill > SUMS)
    sync
    g synced yes
    idle
}

lab_net() {
    ip link set eth0 up
    ip addr add 192.0.2.2/24 dev eth0
    g mtu "$(cat /sys/class/net/eth0/mtu)"
    # How Linux handles the NIC's interrupt: "fasteoi" for a level-triggered
    # I/O APIC line, as Keel describes its virtio lines.
    g net-irq "$(grep -m1 virtio /proc/interrupts | tr -s ' ')"
    if ping -c 3 -W 5 192.0.2.1 >/tmp/ping.out 2>&1; then g ping-host ok; else g ping-host fail; fi
    /usr/bin/socat -T 60 -u TCP-LISTEN:5001,reuseaddr CREATE:/tmp/in &
    listener=$!
    dd if=/dev/urandom of=/tmp/out bs=1M count=16 2>/dev/null
    g send-sum "$(sha256sum /tmp/out | cut -d' ' -f1)"
    g net ready
    wait "$listener"
    g recv-sum "$(sha256sum /tmp/in | cut -d' ' -f1)"
    # The host answers with the SHA-256 of what it received once our end of
    # the stream reached it: only then has every byte left this guest (socat
    # alone exits as soon as the data is in the socket's send buffer, and
    # the reboot that ends the scenario would drop what is still in flight).
    n=0
    until got=$(/usr/bin/socat -T 60 -t 60 FILE:/tmp/out!!STDOUT TCP:192.0.2.1:5002,connect-timeout=2 2>/dev/null) &&
        [ -n "$got" ]; do
        n=$((n + 1))
        [ "$n" -lt 60 ] || break
        sleep 1
    done
    # ("<sha256>  -": the host hashed its stdin)
    g host-got "${got%% *}"
    g net done
}

# vsock_request JSON: one request to the host agent (CID 2, port 19090).
vsock_request() {
    printf '%s' "$1" | /usr/bin/socat -t 10 - VSOCK-CONNECT:2:19090 2>&1 | tr -d '\n'
}

lab_vsock() {
    g vsock-protocol "$(vsock_request '{"sender_cid":3,"message":"GetVsockProtocol"}')"
    g vsock-version "$(vsock_request '{"sender_cid":3,"message":"GetHostOSVersion"}')"
    g vsock-notify "$(vsock_request '{"sender_cid":3,"message":{"notify":{"count":1,"message":"hello from L2"}}}')"
    g vsock-wrong-cid "$(vsock_request '{"sender_cid":7,"message":"GetVsockProtocol"}')"
    /usr/bin/socat VSOCK-LISTEN:5000,reuseaddr,fork SYSTEM:'echo guest-listener-says-hi' &
    g vsock ready
    idle
}

# Busybox init with the given Ctrl-Alt-Del action, a heartbeat, and an
# optional command run once init has taken Ctrl-Alt-Del over from the kernel.
run_init_with_cad() {
    cat >/etc/inittab <<INITTAB
::sysinit:/bin/sh -c 'i=0; while :; do i=\$((i+1)); echo "LAB-GUEST tick \$i"; sleep 1; done &'
::sysinit:/bin/sh -c '. /lab.sh; ${2:-true}'
::ctrlaltdel:$1
INITTAB
    g lifecycle ready
    exec /sbin/init
}

lab_lifecycle() {
    run_init_with_cad "/bin/sh -c 'echo LAB-GUEST ctrlaltdel received; sync; poweroff -f'"
}

lab_lifecycle_ignore() {
    run_init_with_cad "/bin/sh -c 'echo LAB-GUEST ctrlaltdel ignored'"
}

lab_reboot() {
    g reboot now
    reboot -f
}

lab_panic() {
    g panic now
    echo c >/proc/sysrq-trigger
}

# cmdline_value KEY: the value of KEY=... on the kernel command line.
cmdline_value() {
    for word in $(cat /proc/cmdline); do
        case "$word" in
            "$1"=*) echo "${word#*=}" ;;
        esac
    done
}

# Asks the host agent for an upgrade (lab.url, lab.hash on the command line),
# then runs busybox init so that the agent's graceful shutdown powers off.
upgrade_request() {
    url=$(cmdline_value lab.url)
    hash=$(cmdline_value lab.hash)
    g upgrade-answer "$(vsock_request "{\"sender_cid\":3,\"message\":{\"upgrade\":{\"url\":\"$url\",\"target-hash\":\"$hash\"}}}")"
}

lab_upgrade() {
    # The request goes out from init's sysinit: the agent's graceful shutdown
    # must find init handling Ctrl-Alt-Del (before, the kernel would reboot).
    run_init_with_cad "/bin/sh -c 'echo LAB-GUEST ctrlaltdel received; sync; poweroff -f'" upgrade_request
}

# A/B boot from the guest's own disk (keel --boot-slot guestos). The slot's
# boot_args carry lab.marker=<slot> and lab.grubenv=<byte offset of the
# grubenv block on /dev/vda> (the file's cluster in the grub partition, found
# by the test). The guest reads grubenv there and, like a GuestOS after an
# upgrade, writes it in place as GRUB does: in slot A the first time, it
# switches to B with boot_cycle=first_boot (lab_step=1 says it did); in B it
# reboots without confirming; back in A it only reports.
lab_ab() {
    marker=$(sed -n 's/.*lab\.marker=\([^ ]*\).*/\1/p' /proc/cmdline)
    off=$(sed -n 's/.*lab\.grubenv=\([0-9]*\).*/\1/p' /proc/cmdline)
    g ab-marker "$marker"
    env=$(dd if=/dev/vda bs=512 skip=$((off / 512)) count=2 2>/dev/null | grep -v '^#' | tr '\n' ' ')
    g ab-grubenv "$env"
    case "$marker $env" in
        slot-B*) g ab-step unconfirmed ;;
        *lab_step=1*) g ab-step report ;;
        slot-A*)
            {
                printf '# GRUB Environment Block\nboot_alternative=B\nboot_cycle=first_boot\nlab_step=1\n'
                dd if=/dev/zero bs=1024 count=1 2>/dev/null | tr '\0' '#'
            } | head -c 1024 >/tmp/grubenv
            if dd if=/tmp/grubenv of=/dev/vda bs=512 seek=$((off / 512)) conv=notrunc,fsync 2>/dev/null; then
                g ab-step wrote-first-boot
            else
                g ab-step write-failed
            fi
            ;;
        *) g ab-step "unknown marker" ;;
    esac
}

# Debian's stock kernel on a PCI machine (keel --transport pci): what a
# distro finds (udev names the NIC, as systemd's default .link policy does),
# then busybox init with busybox acpid, whose power-button action is a plain
# `poweroff` (init's orderly power-off, ACPI S5).
lab_pci() {
    mkdir -p /run && mount -t tmpfs run /run
    /lib/systemd/systemd-udevd --daemon >/dev/null 2>&1
    udevadm trigger --action=add --subsystem-match=net
    udevadm settle --timeout=60
    # shellcheck disable=SC2046 # word splitting joins the names with spaces
    g nics "$(echo $(ls /sys/class/net | grep -v '^lo$'))"
    # shellcheck disable=SC2046
    g disks "$(echo $(ls /sys/block | grep '^vd'))"
    for d in vda vdb; do g "$d-head" "$(head -c 16 "/dev/$d" | tr -dc 'a-z0-9-')"; done
    g vdb-ro "$(cat /sys/block/vdb/ro)"
    for d in vda vdb; do g "$d-queues" "$(ls "/sys/block/$d/mq" | wc -l)"; done
    # Each virtio device: the PCI function it sits on, its driver, and how
    # many MSI-X vectors that function has enabled.
    for v in /sys/bus/virtio/devices/*; do
        fn=$(basename "$(dirname "$(readlink -f "$v")")")
        g "virtio-at-$fn" "$(cat "$v/device") $(basename "$(readlink "$v/driver")") msix=$(ls "/sys/bus/pci/devices/$fn/msi_irqs" 2>/dev/null | wc -l)"
    done
    if hwclock -s -u; then g hwclock-epoch "$(date +%s)"; else g hwclock-epoch fail; fi
    # NUMA: each node with its CPUs, node 0's distances, each node's memory.
    nodes=""
    for n in /sys/devices/system/node/node[0-9]*; do
        nodes="$nodes $(basename "$n"):$(cat "$n/cpulist")"
    done
    g numa-nodes "${nodes# }"
    g numa-distance "$(cat /sys/devices/system/node/node0/distance 2>/dev/null)"
    for n in 0 1; do
        g "node$n-kib" "$(awk '/MemTotal/ {print $4}' "/sys/devices/system/node/node$n/meminfo" 2>/dev/null)"
    done
    nic=$(ls /sys/class/net | grep -v '^lo$' | head -n1)
    ip link set "$nic" up
    ip addr add 192.0.2.2/24 dev "$nic"
    if ping -c 3 -W 5 192.0.2.1 >/tmp/ping.out 2>&1; then g ping-host ok; else g ping-host fail; fi
    g vsock-protocol "$(vsock_request '{"sender_cid":3,"message":"GetVsockProtocol"}')"
    mkdir -p /etc/acpi/PWRF
    printf '#!/bin/sh\necho "LAB-GUEST acpid power-button" >/dev/console\npoweroff\n' >/etc/acpi/PWRF/00000080
    chmod +x /etc/acpi/PWRF/00000080
    cat >/etc/inittab <<'INITTAB'
::sysinit:/bin/busybox acpid -c /etc/acpi -l /tmp/acpid.log
::sysinit:/bin/sh -c 'echo "LAB-GUEST pci ready"'
::shutdown:/bin/sh -c 'echo "LAB-GUEST init powering off"; sync'
INITTAB
    exec /sbin/init
}
