# Lab scenario: Debian's stock kernel on a PCI machine (keel --transport pci),
# 2 sockets with memory.numa:
# it finds every virtio device on PCI with MSI-X, names its NIC enp0sN and its
# disks vda, vdb in configuration order, reads Keel's CMOS RTC with hwclock,
# and `keelctl shutdown` (the ACPI power button) reaches busybox acpid, whose
# `poweroff` ends keel with exit 0. Runs in L1 (or on a host with vmx/svm);
# see tests/lab/l1.sh.
. "$LAB_LIB"

ip link add labbr0 type bridge
ip addr add 192.0.2.1/24 dev labbr0
ip link set labbr0 up
# Two disks that say which is which in their first bytes.
printf 'keel-disk-zero--' >"$LAB_DIR/d0.img"
truncate -s 8M "$LAB_DIR/d0.img"
printf 'keel-disk-one---' >"$LAB_DIR/d1.img"
truncate -s 16M "$LAB_DIR/d1.img"
echo "lab-1.2.3" >"$LAB_DIR/version"
mkdir -p "$LAB_DIR/agent-state"
{ agent_config; echo 'reboot_command = ["/bin/true"]'; } >"$LAB_DIR/agent.toml"
start_agent "$LAB_DIR/agent.toml" pci.agent-listening

# Slots in configuration order: the disks (1, 2), vsock (3), the NIC (4).
boot_keel pci --transport pci --kernel "$LAB_STOCK_KERNEL" --initrd "$LAB_STOCK_INITRD" \
    --cmdline "console=ttyS0 reboot=k panic=1 lab=pci" --memory size=256M,numa=on \
    --cpus boot=2,sockets=2,cores=1,threads=1 \
    --disk "path=$LAB_DIR/d0.img" --disk "path=$LAB_DIR/d1.img,readonly=on,num_queues=1" \
    --vsock "cid=3,socket=$LAB_DIR/vsock.sock" --net tap=labtap0,bridge=labbr0 \
    --api-socket "$LAB_DIR/api.sock" --shutdown-timeout 120
c=$LAB_DIR/pci.console
if wait_console "$c" '^LAB-GUEST pci ready' 500; then ok pci.up; else fail pci.up "the guest never got ready"; show pci; fi
expect pci.nic-name "$(guest "$c" nics)" enp0s4
expect pci.disks "$(guest "$c" disks)" "vda vdb"
expect pci.vda-is-disk-0 "$(guest "$c" vda-head)" keel-disk-zero--
expect pci.vdb-is-disk-1 "$(guest "$c" vdb-head)" keel-disk-one---
expect pci.vdb-read-only "$(guest "$c" vdb-ro)" 1
# Each function's virtio device, driver and MSI-X vectors (queues + config).
# The disks have one request queue per vCPU by default (2), the second
# disk one (num_queues=1): blk-mq's hardware queues follow.
expect pci.slot1-blk "$(guest "$c" virtio-at-0000:00:01.0)" "0x0002 virtio_blk msix=3"
expect pci.slot2-blk "$(guest "$c" virtio-at-0000:00:02.0)" "0x0002 virtio_blk msix=2"
expect pci.vda-queues "$(guest "$c" vda-queues)" 2
expect pci.vdb-queues "$(guest "$c" vdb-queues)" 1
expect pci.slot3-vsock "$(guest "$c" virtio-at-0000:00:03.0)" "0x0013 vmw_vsock_virtio_transport msix=4"
expect pci.slot4-net "$(guest "$c" virtio-at-0000:00:04.0)" "0x0001 virtio_net msix=3"
# Two sockets with memory.numa: one NUMA node each (SRAT/SLIT), half the RAM.
expect pci.numa-nodes "$(guest "$c" numa-nodes)" "node0:0 node1:1"
expect pci.numa-distance "$(guest "$c" numa-distance)" "10 20"
# (Each node's MemTotal is its 128 MiB less what the kernel reserved there:
# node 1, at the top, also lost the initramfs's pages.)
bad=""
for n in 0 1; do
    kib=$(guest "$c" "node$n-kib")
    if [ -z "$kib" ] || [ "$kib" -le $((64 << 10)) ] || [ "$kib" -gt $((128 << 10)) ]; then
        bad="$bad node$n has ${kib:-?} KiB of 128 MiB;"
    fi
done
if [ -z "$bad" ]; then ok pci.numa-memory; else fail pci.numa-memory "$bad"; fi
expect pci.ping-guest-to-host "$(guest "$c" ping-host)" ok
check pci.ping-host-to-guest ping -c 3 -W 5 192.0.2.2
expect pci.vsock-request "$(guest "$c" vsock-protocol)" '{"Ok":{"HostOSVsockVersion":{"major":1,"minor":0,"patch":0}}}'
rtc=$(guest "$c" hwclock-epoch)
now=$(date +%s)
if [ -n "$rtc" ] && [ "$rtc" != fail ] && [ $((now - rtc)) -le 300 ] && [ $((rtc - now)) -le 300 ]; then
    ok pci.hwclock
else
    fail pci.hwclock "hwclock gave ${rtc:-nothing}, L1 time $now"
fi
# The default shutdown method presses the ACPI power button.
check pci.shutdown-request "$LAB_KEELCTL" --socket "$LAB_DIR/api.sock" shutdown --timeout 120
wait_keel 240
if grep -q 'LAB-GUEST acpid power-button' "$c"; then ok pci.power-button-reaches-acpid; else fail pci.power-button-reaches-acpid "acpid never ran its action"; fi
if grep -q 'LAB-GUEST init powering off' "$c"; then ok pci.init-powers-off; else fail pci.init-powers-off "init never ran its shutdown"; fi
expect pci.poweroff-exit "$KEEL_RC" 0
if grep -q 'VM ended: stopped on graceful shutdown' "$LAB_DIR/pci.log"; then ok pci.graceful; else fail pci.graceful "$(tail -n 3 "$LAB_DIR/pci.log" | tr '\n' ' ')"; fi
if ip link show labtap0 >/dev/null 2>&1; then fail pci.tap-removed "labtap0 still exists"; else ok pci.tap-removed; fi
kill "$AGENT_PID" 2>/dev/null
ip link del labbr0
finish
