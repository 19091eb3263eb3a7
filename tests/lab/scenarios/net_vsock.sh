# Lab scenario: virtio-net on a tap in a bridge, and virtio-vsock with
# keel-agent. Runs in L1 (or on a host with vmx/svm); see tests/lab/l1.sh.
. "$LAB_LIB"
K=$LAB_L2_KERNEL
I=$LAB_L2_INITRD
socat=${LAB_SOCAT:-socat}
# (named sha: busybox has a `sum` applet of its own)
sha() { sha256sum "$1" | cut -d' ' -f1; }

# --- net: a bridge with the documentation range 192.0.2.0/24 -----------------
ip link add labbr0 type bridge
ip addr add 192.0.2.1/24 dev labbr0
ip link set labbr0 up
# Two vCPUs: the guest's interrupt handling moves between them.
boot_keel net --transport mmio --kernel "$K" --initrd "$I" --cmdline "$(l2_cmdline net)" \
    --memory size=256M --cpus boot=2 --net tap=labtap0,bridge=labbr0,mtu=1400 \
    --api-socket "$LAB_DIR/net-api.sock"
c=$LAB_DIR/net.console
if wait_console "$c" '^LAB-GUEST net ready' 300; then ok net.up; else fail net.up "guest network never ready"; show net; fi
expect net.mtu "$(guest "$c" mtu)" 1400
case "$(guest "$c" net-irq)" in
    *IO-APIC*fasteoi*) ok net.irq-level-triggered ;;
    *) fail net.irq-level-triggered "/proc/interrupts: $(guest "$c" net-irq)" ;;
esac
expect net.ping-guest-to-host "$(guest "$c" ping-host)" ok
check net.ping-host-to-guest ping -c 3 -W 5 192.0.2.2
dd if=/dev/urandom of="$LAB_DIR/h2g" bs=1M count=16 2>/dev/null
# The listener answers with the SHA-256 of what it received: the guest
# waits for that answer before it ends (see lab_net in lab.sh). -t: once the
# guest's stream ends, socat gives the hash that long (not 0.5 s) to come.
"$socat" -T 60 -t 60 TCP-LISTEN:5002,reuseaddr \
    SYSTEM:"cat >$LAB_DIR/g2h; sha256sum <$LAB_DIR/g2h" &
listener=$!
n=0
# -T: a transfer that stalls for 60 s ends (and the checks below fail).
until timeout 300 "$socat" -T 60 -u FILE:"$LAB_DIR/h2g" TCP:192.0.2.2:5001,connect-timeout=2 2>"$LAB_DIR/h2g.err"; do
    n=$((n + 1))
    [ "$n" -lt 30 ] || break
    sleep 1
done
if wait_console "$c" '^LAB-GUEST net done' 300; then :; else show net; fi
# The listener ends once the guest's data is in (socat -T ends a stall).
n=0
while kill -0 "$listener" 2>/dev/null && [ "$n" -lt 300 ]; do
    n=$((n + 1))
    sleep 0.2
done
kill "$listener" 2>/dev/null
wait "$listener"
# The device's counters (stalls, drops) tell a stalled transfer's story.
"$LAB_KEELCTL" --socket "$LAB_DIR/net-api.sock" counters 2>&1 | grep -E '^(net|DEVICE)' | head -40
expect net.tcp-host-to-guest "$(guest "$c" recv-sum)" "$(sha "$LAB_DIR/h2g")"
expect net.tcp-guest-to-host "$(sha "$LAB_DIR/g2h")" "$(guest "$c" send-sum)"
expect net.tcp-guest-to-host-acknowledged "$(guest "$c" host-got)" "$(guest "$c" send-sum)"
wait_keel 120
expect net.exit "$KEEL_RC" 3
if ip link show labtap0 >/dev/null 2>&1; then fail net.tap-removed "labtap0 still exists"; else ok net.tap-removed; fi
ip link del labbr0

# --- vsock: keel-agent serves the guest ---------------------------------------
echo "lab-1.2.3" >"$LAB_DIR/version"
: >"$LAB_DIR/notify-console"
mkdir -p "$LAB_DIR/agent-state"
{ agent_config; cat <<TOML; } >"$LAB_DIR/agent.toml"
reboot_command = ["/bin/true"]
consoles = ["$LAB_DIR/notify-console"]
[metrics]
listen = "127.0.0.1:19100"
textfile = "$LAB_DIR/agent.prom"
TOML
start_agent "$LAB_DIR/agent.toml" vsock.agent-listening
# (Ctrl-Alt-Del: the minimal kernel has no ACPI button driver, and without
# an init that takes it over, the kernel reboots at once: the runs below end
# quickly at their SIGTERM.)
boot_keel vsock --transport mmio --kernel "$K" --initrd "$I" --cmdline "$(l2_cmdline vsock)" \
    --memory size=256M --cpus boot=1 --vsock "cid=3,socket=$LAB_DIR/vsock.sock" \
    --shutdown-method ctrl-alt-del
c=$LAB_DIR/vsock.console
if wait_console "$c" '^LAB-GUEST vsock ready' 300; then ok vsock.up; else fail vsock.up "guest never ready"; show vsock; fi
expect vsock.get-protocol "$(guest "$c" vsock-protocol)" '{"Ok":{"HostOSVsockVersion":{"major":1,"minor":0,"patch":0}}}'
expect vsock.get-version "$(guest "$c" vsock-version)" '{"Ok":{"HostOSVersion":"lab-1.2.3"}}'
expect vsock.notify "$(guest "$c" vsock-notify)" '{"Ok":"NoPayload"}'
if wait_file "$LAB_DIR/notify-console" 'hello from L2' 30; then ok vsock.notify-printed; else fail vsock.notify-printed "nothing on the console"; fi
case "$(guest "$c" vsock-wrong-cid)" in
    '{"Err":'*) ok vsock.wrong-cid-refused ;;
    *) fail vsock.wrong-cid-refused "answer: $(guest "$c" vsock-wrong-cid)" ;;
esac
out=$(printf 'CONNECT 5000\n' | "$socat" -t 5 - UNIX-CONNECT:"$LAB_DIR/vsock.sock" 2>&1)
case "$out" in
    OK*) fail vsock.host-connect-refused "accepted: $out" ;;
    *) ok vsock.host-connect-refused ;;
esac
kill "$KEEL_PID"
wait_keel 60

boot_keel vsock-allow --transport mmio --kernel "$K" --initrd "$I" --cmdline "$(l2_cmdline vsock)" \
    --memory size=256M --cpus boot=1 --vsock "cid=3,socket=$LAB_DIR/vsock.sock,allow_host_connect=on" \
    --shutdown-method ctrl-alt-del
c=$LAB_DIR/vsock-allow.console
wait_console "$c" '^LAB-GUEST vsock ready' 300 || show vsock-allow
# The guest starts its listener in the background just before it says
# ready: until socat listens, the guest answers the CONNECT with a reset
# (and the host side reads nothing). Try for up to 30 s.
n=0
while :; do
    out=$(printf 'CONNECT 5000\n' | "$socat" -t 5 - UNIX-CONNECT:"$LAB_DIR/vsock.sock" 2>&1)
    case "$out" in OK*guest-listener-says-hi*) break ;; esac
    n=$((n + 1))
    [ "$n" -lt 30 ] || break
    sleep 1
done
case "$out" in
    OK*guest-listener-says-hi*) ok vsock.host-connect-allowed ;;
    *) fail vsock.host-connect-allowed "answer: $(echo "$out" | tr '\n' ' ')" ;;
esac
kill "$KEEL_PID"
wait_keel 60
kill "$AGENT_PID"
finish
