# Lab scenario: an A/B host upgrade end to end. The guest asks keel-agent
# (over Keel's vsock) to install update-img.tar.zst from an HTTPS server in
# L1 (test CA); the agent writes the inactive slot's volumes (loop devices),
# switches grubenv, shuts the guest down through Keel's control socket and
# runs the reboot command (a recorder). Runs in L1 (or on a host with
# vmx/svm); see tests/lab/l1.sh. The harness makes the image and the TLS
# files (LAB_UPGRADE_*).
. "$LAB_LIB"
socat=${LAB_SOCAT:-socat}
# (named sha: busybox has a `sum` applet of its own)
sha() { sha256sum "$1" | cut -d' ' -f1; }
pattern() { dd if=/dev/zero bs=1M count="$2" 2>/dev/null | tr '\000' "$3" >"$1"; }

# Six volumes on loop devices, A holding the running system.
for slot in A B; do
    pattern "$LAB_DIR/${slot}_boot.img" 4 '\101'
    pattern "$LAB_DIR/${slot}_root.img" 8 '\102'
    pattern "$LAB_DIR/${slot}_var.img" 20 '\103'
    for v in boot root var; do
        dev=$(losetup -f)
        losetup "$dev" "$LAB_DIR/${slot}_$v.img"
        eval "${slot}_$v=$dev"
    done
done
a_sums="$(sha "$A_boot") $(sha "$A_root") $(sha "$A_var")"

# GRUB's environment block: 1024 bytes, '#' padding.
printf '# GRUB Environment Block\nboot_alternative=A\nboot_cycle=stable\n' >"$LAB_DIR/grubenv"
pad=$((1024 - $(wc -c <"$LAB_DIR/grubenv")))
dd if=/dev/zero bs=1 count="$pad" 2>/dev/null | tr '\000' '#' >>"$LAB_DIR/grubenv"

# The HTTPS server: one answer per connection, the image.
size=$(wc -c <"$LAB_UPGRADE_IMG")
cat >"$LAB_DIR/serve.sh" <<SERVE
printf 'HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: $size\r\nConnection: close\r\n\r\n'
cat "$LAB_UPGRADE_IMG"
SERVE
"$socat" OPENSSL-LISTEN:8443,bind=127.0.0.1,reuseaddr,fork,cert="$LAB_UPGRADE_CERT",key="$LAB_UPGRADE_KEY",verify=0 \
    SYSTEM:"sh $LAB_DIR/serve.sh" 2>"$LAB_DIR/https.log" &
https=$!

echo "lab-1.0.0" >"$LAB_DIR/version"
mkdir -p "$LAB_DIR/agent-state"
{ agent_config; cat <<TOML; } >"$LAB_DIR/agent.toml"
reboot_command = ["/bin/sh", "-c", "echo rebooted > $LAB_DIR/rebooted"]
consoles = []
extra_ca_file = "$LAB_UPGRADE_CA"
system_ca_file = "$LAB_UPGRADE_CA"
shutdown_timeout_s = 120
[volumes.A]
boot = "$A_boot"
root = "$A_root"
var = "$A_var"
[volumes.B]
boot = "$B_boot"
root = "$B_root"
var = "$B_var"
[metrics]
listen = ""
textfile = ""
TOML
start_agent "$LAB_DIR/agent.toml" upgrade.agent-listening

hash=$(sha "$LAB_UPGRADE_IMG")
boot_keel upgrade --transport mmio --kernel "$LAB_L2_KERNEL" --initrd "$LAB_L2_INITRD" \
    --cmdline "$(l2_cmdline upgrade) lab.url=https://127.0.0.1:8443/update-img.tar.zst lab.hash=$hash" \
    --memory size=256M --cpus boot=1 --api-socket "$LAB_DIR/api.sock" \
    --vsock "cid=3,socket=$LAB_DIR/vsock.sock" --shutdown-method ctrl-alt-del
c=$LAB_DIR/upgrade.console
wait_console "$c" '^LAB-GUEST upgrade-answer' 300
answer=$(guest "$c" upgrade-answer)
expect upgrade.answer "$answer" '{"Ok":"NoPayload"}'
# A refused upgrade shuts nothing down: do not wait for it.
[ "$answer" = '{"Ok":"NoPayload"}' ] || kill "$KEEL_PID"
wait_keel 300
if grep -q 'LAB-GUEST ctrlaltdel received' "$c"; then ok upgrade.guest-shut-down; else fail upgrade.guest-shut-down "the guest never saw Ctrl-Alt-Del"; fi
expect upgrade.keel-exit "$KEEL_RC" 0
if wait_file "$LAB_DIR/rebooted" rebooted 60; then ok upgrade.reboot-command-ran; else fail upgrade.reboot-command-ran "no reboot recorded"; fi
if grep -q '^boot_alternative=B$' "$LAB_DIR/grubenv" && grep -q '^boot_cycle=first_boot$' "$LAB_DIR/grubenv"; then
    ok upgrade.grubenv-switched
else
    fail upgrade.grubenv-switched "$(head -c 200 "$LAB_DIR/grubenv" | tr '\n' ' ')"
fi
expect upgrade.grubenv-size "$(wc -c <"$LAB_DIR/grubenv" | tr -d ' ')" 1024
boot_len=$(wc -c <"$LAB_UPGRADE_BOOT")
root_len=$(wc -c <"$LAB_UPGRADE_ROOT")
expect upgrade.b-boot-written "$(head -c "$boot_len" "$B_boot" | sha256sum | cut -d' ' -f1)" "$(sha "$LAB_UPGRADE_BOOT")"
expect upgrade.b-root-written "$(head -c "$root_len" "$B_root" | sha256sum | cut -d' ' -f1)" "$(sha "$LAB_UPGRADE_ROOT")"
expect upgrade.b-var-cleared "$(head -c $((16 << 20)) "$B_var" | tr -d '\000' | wc -c | tr -d ' ')" 0
expect upgrade.a-untouched "$(sha "$A_boot") $(sha "$A_root") $(sha "$A_var")" "$a_sums"
[ -s "$LAB_DIR/failed" ] && { tail -n 30 "$LAB_DIR/agent.log"; tail -n 10 "$LAB_DIR/https.log"; }
kill "$AGENT_PID" "$https" 2>/dev/null
for slot in A B; do for v in boot root var; do eval "losetup -d \$${slot}_$v"; done; done
finish
