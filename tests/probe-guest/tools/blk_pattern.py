#!/usr/bin/env python3
"""Disk images for the probe guest's virtio-blk checks (blk.*).

The patterns (o = absolute byte offset on the disk):

    H(o) = ((o >> 12) & 0xff) * 7 & 0xff  ^  (o & 0xff)     host pattern
    G(o) = ((o >> 9) & 0xff)  ^  (o & 0xff)  ^  0xa5        guest pattern

Regions:

    [1 MiB, 1 MiB + 64 KiB)   H, written here before boot; the guest reads it
                              (blk.<i>.host_pattern)
    [4 MiB, 4 MiB + 256 KiB)  G, written by the guest (blk.<i>.write_read,
                              writable disks only)
    [8 MiB, 8 MiB + 64 KiB)   0xff before boot; WRITE_ZEROES by the guest
                              (blk.<i>.write_zeroes, when offered)
    [12 MiB, 13 MiB)          0xff before boot; DISCARD by the guest
                              (blk.<i>.discard, when offered): contents after
                              it are not checked
    everything else           zero

Usage:

    blk_pattern.py make IMAGE [SIZE_MIB]   create IMAGE (default 16 MiB)
    blk_pattern.py verify-written IMAGE    after a run on a writable disk:
                                           G and the zeroes landed, H intact
    blk_pattern.py verify-untouched IMAGE  after a run on a read-only disk
                                           (or one the guest must not have
                                           written): exactly as `make` left it

Exit status 0 when the image is as expected, 1 (with the first differences
on stderr) when not.
"""

import sys

KIB = 1024
MIB = 1024 * KIB

HOST_AT, HOST_LEN = 1 * MIB, 64 * KIB
GUEST_AT, GUEST_LEN = 4 * MIB, 256 * KIB
ZERO_AT, ZERO_LEN = 8 * MIB, 64 * KIB
DISCARD_AT, DISCARD_LEN = 12 * MIB, 1 * MIB
FF_AT, FF_END = 8 * MIB, 13 * MIB


def host_pattern(o: int) -> int:
    """H(o): the byte the host writes at disk offset o."""
    return (((o >> 12) & 0xFF) * 7 & 0xFF) ^ (o & 0xFF)


def guest_pattern(o: int) -> int:
    """G(o): the byte the guest writes at disk offset o."""
    return ((o >> 9) & 0xFF) ^ (o & 0xFF) ^ 0xA5


def pattern(fn, at: int, length: int) -> bytes:
    return bytes(fn(o) for o in range(at, at + length))


def make(path: str, size_mib: int = 16) -> None:
    size = size_mib * MIB
    if size < FF_END:
        raise SystemExit(f"{path}: {size_mib} MiB is too small, need at least 13 MiB")
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(HOST_AT)
        f.write(pattern(host_pattern, HOST_AT, HOST_LEN))
        f.seek(FF_AT)
        f.write(b"\xff" * (FF_END - FF_AT))


def expect(f, what: str, at: int, want: bytes, errors: list) -> None:
    f.seek(at)
    got = f.read(len(want))
    if got == want:
        return
    if len(got) < len(want):
        errors.append(f"{what}: image ends at {at + len(got):#x}")
        return
    diffs = [i for i in range(len(want)) if got[i] != want[i]]
    i = diffs[0]
    errors.append(
        f"{what}: byte at {at + i:#x} is {got[i]:#04x}, want {want[i]:#04x} "
        f"({len(diffs)} bytes differ)"
    )


def verify(path: str, written: bool) -> int:
    errors: list = []
    with open(path, "rb") as f:
        expect(f, "host pattern", HOST_AT, pattern(host_pattern, HOST_AT, HOST_LEN), errors)
        if written:
            expect(f, "guest pattern", GUEST_AT,
                   pattern(guest_pattern, GUEST_AT, GUEST_LEN), errors)
            expect(f, "write-zeroes region", ZERO_AT, bytes(ZERO_LEN), errors)
            expect(f, "0xff between the zeroed and discarded regions", ZERO_AT + ZERO_LEN,
                   b"\xff" * (DISCARD_AT - ZERO_AT - ZERO_LEN), errors)
        else:
            expect(f, "guest-pattern region (untouched)", GUEST_AT, bytes(GUEST_LEN), errors)
            expect(f, "0xff region (untouched)", FF_AT, b"\xff" * (FF_END - FF_AT), errors)
    for e in errors:
        print(f"{path}: {e}", file=sys.stderr)
    if not errors:
        print(f"{path}: as expected ({'written' if written else 'untouched'})")
    return 1 if errors else 0


def main(argv: list) -> int:
    if len(argv) >= 3 and argv[1] == "make":
        make(argv[2], int(argv[3]) if len(argv) > 3 else 16)
        return 0
    if len(argv) == 3 and argv[1] == "verify-written":
        return verify(argv[2], True)
    if len(argv) == 3 and argv[1] == "verify-untouched":
        return verify(argv[2], False)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
