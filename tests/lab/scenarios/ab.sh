# Lab scenario: the GuestOS's A/B boot from its own disk. LAB_AB_DISK is a
# GuestOS-shaped disk the test built (tests/support/guestos_disk.rs) with the
# project's Linux guest in both boot partitions, each slot's boot_args with
# its own marker. keel --boot-slot guestos runs three times, restarted after
# each guest reboot as systemd would: A (the guest switches grubenv to B,
# first_boot), B (grubenv failsafe_check; the guest does not confirm), A
# again (rolled back, grubenv stable). See lab_ab in lab.sh.
. "$LAB_LIB"
disk=$LAB_AB_DISK
for step in 1 2 3; do
    start_keel "ab$step" --transport mmio --boot-slot guestos --disk "path=$disk" \
        --memory size=256M --cpus boot=1
    if wait_console "$LAB_DIR/ab$step.console" '^LAB-GUEST ab-step' 300; then :; else show "ab$step"; fi
    wait_keel 120
    expect "ab.boot$step-exit-is-reset" "$KEEL_RC" 3
done
c1=$LAB_DIR/ab1.console
c2=$LAB_DIR/ab2.console
c3=$LAB_DIR/ab3.console
expect ab.first-boot-slot "$(guest "$c1" ab-marker)" slot-A
expect ab.guest-wrote-first-boot "$(guest "$c1" ab-step)" wrote-first-boot
expect ab.upgraded-slot-booted "$(guest "$c2" ab-marker)" slot-B
# has "VARS" NAME=VALUE: whether grubenv's variables (as the guest printed
# them, space-separated) include NAME=VALUE.
has() { case " $1 " in *" $2 "*) return 0 ;; esac; return 1; }
env2=$(guest "$c2" ab-grubenv)
if has "$env2" boot_alternative=B && has "$env2" boot_cycle=failsafe_check && has "$env2" lab_step=1; then
    ok ab.grubenv-failsafe-check
else
    fail ab.grubenv-failsafe-check "grubenv: $env2"
fi
expect ab.upgraded-slot-unconfirmed "$(guest "$c2" ab-step)" unconfirmed
expect ab.rollback-slot-booted "$(guest "$c3" ab-marker)" slot-A
expect ab.rolled-back-guest-reports "$(guest "$c3" ab-step)" report
env3=$(guest "$c3" ab-grubenv)
if has "$env3" boot_alternative=A && has "$env3" boot_cycle=stable && has "$env3" lab_step=1; then
    ok ab.grubenv-stable-after-rollback
else
    fail ab.grubenv-stable-after-rollback "grubenv: $env3"
fi
if grep -q 'booting slot B' "$LAB_DIR/ab2.log" && grep -q 'booting slot A' "$LAB_DIR/ab3.log"; then
    ok ab.log-names-slot
else
    fail ab.log-names-slot "$(grep -h 'slot' "$LAB_DIR/ab2.log" "$LAB_DIR/ab3.log" | tr '\n' ' ')"
fi
finish
