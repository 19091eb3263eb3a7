#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (fuzz/corpus/<target>/), in the
input formats the targets' doc comments describe. Run from anywhere:
`python3 fuzz/seeds.py` (needs the zstd command for the upgrade archives)."""
import io
import os
import struct
import subprocess
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA = 0x8_0000
N, W, I = 1, 2, 4  # VRING_DESC_F_NEXT, _WRITE, _INDIRECT
VERSION_1 = 1 << 32
EVENT_IDX = 1 << 29
INDIRECT = 1 << 28


def out(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def desc(addr, length, flags=0, nxt=0):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def ring(descs, heads):
    return (bytes([len(descs)]) + b"".join(descs) + bytes([len(heads)])
            + b"".join(struct.pack("<H", h) for h in heads))


def place(layout, size=None):
    """Bytes of the DATA area: {offset: bytes}."""
    end = max(o + len(b) for o, b in layout.items())
    buf = bytearray(size or end)
    for o, b in layout.items():
        buf[o:o + len(b)] = b
    return bytes(buf)


# ---- virtio_block: flags u8, features u64, ring, DATA ----
def blk_hdr(kind, sector):
    return struct.pack("<IIQ", kind, 0, sector)


def blk(name, flags, features, chains, layout):
    descs, heads = [], []
    for chain in chains:
        heads.append(len(descs))
        base = len(descs)
        for k, (addr, length, fl) in enumerate(chain):
            last = k == len(chain) - 1
            descs.append(desc(DATA + addr, length, fl | (0 if last else N), 0 if last else base + k + 1))
    out("virtio_block", name, bytes([flags]) + struct.pack("<Q", features) + ring(descs, heads) + place(layout))


F = VERSION_1
blk("write", 0, F, [[(0, 16, 0), (0x100, 512, 0), (0x40, 1, W)]],
    {0: blk_hdr(1, 2), 0x100: bytes(range(256)) * 2, 0x40: b"\xff"})
blk("read", 0, F | EVENT_IDX, [[(0, 16, 0), (0x100, 1024, W), (0x40, 1, W)]], {0: blk_hdr(0, 4), 0x40: b"\xff"})
blk("flush", 0, F, [[(0, 16, 0), (0x40, 1, W)]], {0: blk_hdr(4, 0), 0x40: b"\xff"})
blk("get_id", 1, F, [[(0, 16, 0), (0x100, 20, W), (0x40, 1, W)]], {0: blk_hdr(8, 0), 0x40: b"\xff"})
blk("discard", 0, F, [[(0, 16, 0), (0x80, 16, 0), (0x40, 1, W)]],
    {0: blk_hdr(11, 0), 0x80: struct.pack("<QII", 8, 16, 0), 0x40: b"\xff"})
blk("write_zeroes_cow", 2, F, [[(0, 16, 0), (0x80, 16, 0), (0x40, 1, W)]],
    {0: blk_hdr(13, 0), 0x80: struct.pack("<QII", 12, 24, 1), 0x40: b"\xff"})
blk("write_cow_ro", 3, F, [[(0, 16, 0), (0x100, 512, 0), (0x40, 1, W)]],
    {0: blk_hdr(1, 20), 0x100: b"\x42" * 512, 0x40: b"\xff"})
blk("batch", 0, F, [[(0, 16, 0), (0x200, 512, 0), (0x40, 1, W)],
                    [(0x10, 16, 0), (0x400, 512, W), (0x41, 1, W)],
                    [(0x20, 16, 0), (0x42, 1, W)]],
    {0: blk_hdr(1, 1), 0x10: blk_hdr(0, 1), 0x20: blk_hdr(4, 0), 0x200: b"\x17" * 512})
# An indirect table at DATA+0x600: header, data, status.
blk("indirect", 0, F | INDIRECT, [[(0x600, 48, I)]],
    {0: blk_hdr(0, 0), 0x600: desc(DATA, 16, N, 1) + desc(DATA + 0x100, 512, W | N, 2) + desc(DATA + 0x40, 1, W, 0)})

# ---- virtio_net: features u64, rx ring, tx ring, frames, DATA ----
ETH = bytes([0x6a, 0, 0, 0, 0, 2, 0x6a, 0, 0, 0, 0, 1, 0x88, 0xb5]) + bytes(range(46))
IPV4_TCP = (bytes([0x6a, 0, 0, 0, 0, 2, 0x6a, 0, 0, 0, 0, 1, 0x08, 0x00])
            + bytes([0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2])
            + struct.pack(">HHIIBBHHH", 1234, 80, 1, 0, 0x50, 0x18, 1000, 0, 0))


def vhdr(flags=0, gso=0, hdr_len=0, gso_size=0, cs=0, co=0, nb=0):
    return struct.pack("<BBHHHHH", flags, gso, hdr_len, gso_size, cs, co, nb)


def net(name, features, tx, rxbufs, frames):
    rx_descs = [desc(DATA + 0x1000 + i * 0x800, 0x800, W, 0) for i in range(rxbufs)]
    tx_descs, heads, layout, at = [], [], {}, 0
    for hdr, frame in tx:
        heads.append(len(tx_descs))
        layout[at] = hdr + frame
        tx_descs.append(desc(DATA + at, 12, N, len(tx_descs) + 1))
        tx_descs.append(desc(DATA + at + 12, len(frame), 0, 0))
        at += 0x100
    fr = bytes([len(frames)]) + b"".join(struct.pack("<H", len(f)) + f for f in frames)
    data = place(layout) if layout else b""
    out("virtio_net", name, struct.pack("<Q", features) + ring(rx_descs, list(range(rxbufs)))
        + ring(tx_descs, heads) + fr + data)


MRG, CSUM, GCSUM, HTSO4, GTSO4 = 1 << 15, 1 << 0, 1 << 1, 1 << 11, 1 << 7
net("tx", F, [(vhdr(), ETH)], 0, [])
net("rx", F | MRG, [], 2, [vhdr() + ETH, vhdr() + IPV4_TCP])
net("tx_csum", F | CSUM | GCSUM, [(vhdr(1, 0, 0, 0, 34, 16), IPV4_TCP)], 1, [vhdr(1, 0, 0, 0, 34, 16) + IPV4_TCP])
net("tx_gso", F | CSUM | HTSO4 | GTSO4 | EVENT_IDX, [(vhdr(1, 1, 54, 1400, 34, 16), IPV4_TCP), (vhdr(), ETH)], 3,
    [vhdr(1, 1, 54, 1400, 34, 16) + IPV4_TCP])

# ---- virtio_vsock: flags u8, features u64, rx ring, tx ring, line, reply, DATA ----
def vs_hdr(op, src_port, dst_port, length=0, flags=0, buf_alloc=65536, fwd=0, dst_cid=2, src_cid=3):
    return struct.pack("<QQIIIHHIII", src_cid, dst_cid, src_port, dst_port, length, 1, op, flags, buf_alloc, fwd)


def vsock(name, flags, packets, rxbufs, line=b"", reply=b""):
    rx_descs = [desc(DATA + 0x4000 + i * 0x1100, 0x1000 + 44, W, 0) for i in range(rxbufs)]
    tx_descs, heads, layout, at = [], [], {}, 0
    for hdr, payload in packets:
        heads.append(len(tx_descs))
        layout[at] = hdr + payload
        if payload:
            tx_descs.append(desc(DATA + at, 44, N, len(tx_descs) + 1))
            tx_descs.append(desc(DATA + at + 44, len(payload), 0, 0))
        else:
            tx_descs.append(desc(DATA + at, 44, 0, 0))
        at += 0x100
    out("virtio_vsock", name, bytes([flags]) + struct.pack("<Q", F) + ring(rx_descs, list(range(rxbufs)))
        + ring(tx_descs, heads) + bytes([len(line)]) + line + bytes([len(reply)]) + reply
        + (place(layout) if layout else b""))


REQ, RESP, RST, SHUT, RW, CUPD, CREQ = 1, 2, 3, 4, 5, 6, 7
vsock("connect_send_close", 0, [(vs_hdr(REQ, 5000, 1024), b""), (vs_hdr(RW, 5000, 1024, 5), b"hello"),
                                (vs_hdr(SHUT, 5000, 1024, flags=3), b"")], 4, reply=b"hi from host")
vsock("connect_refused", 0, [(vs_hdr(REQ, 5001, 7), b"")], 2)
vsock("credit", 0, [(vs_hdr(REQ, 5002, 1024, buf_alloc=4096), b""), (vs_hdr(CREQ, 5002, 1024), b""),
                    (vs_hdr(CUPD, 5002, 1024, buf_alloc=8192, fwd=100), b""), (vs_hdr(RST, 5002, 1024), b"")], 4,
      reply=b"x" * 200)
vsock("host_connect", 1, [(vs_hdr(RESP, 52, 1073741824), b""), (vs_hdr(RW, 52, 1073741824, 3), b"abc")], 4,
      line=b"CONNECT 52\n", reply=b"host data")

# ---- virtio_mmio: count u8, accesses (kind u8, offset u16, value u32), DATA ----
R4, W4 = 4, 5


def acc(kind, off, val=0):
    return struct.pack("<BHI", kind, off, val)


def mmio(name, accesses, layout):
    out("virtio_mmio", name, bytes([len(accesses)]) + b"".join(accesses) + place(layout))


init = [acc(R4, 0), acc(R4, 4), acc(R4, 8), acc(W4, 0x70, 0), acc(W4, 0x70, 1), acc(W4, 0x70, 3),
        acc(W4, 0x14, 0), acc(R4, 0x10), acc(W4, 0x14, 1), acc(R4, 0x10),
        acc(W4, 0x24, 1), acc(W4, 0x20, 1), acc(W4, 0x24, 0), acc(W4, 0x20, 0),
        acc(W4, 0x70, 0xb), acc(R4, 0x70), acc(W4, 0x30, 0), acc(R4, 0x34), acc(W4, 0x38, 16),
        acc(W4, 0x80, DATA + 0x200), acc(W4, 0x84, 0), acc(W4, 0x90, DATA + 0x300), acc(W4, 0x94, 0),
        acc(W4, 0xa0, DATA + 0x400), acc(W4, 0xa4, 0), acc(W4, 0x44, 1), acc(W4, 0x70, 0xf)]
queue = {0: blk_hdr(1, 3), 0x40: b"\xff",
         0x200: desc(DATA, 16, N, 1) + desc(DATA + 0x600, 512, N, 2) + desc(DATA + 0x40, 1, W, 0),
         0x300: struct.pack("<HHH", 0, 1, 0), 0x600: b"\x33" * 512}
mmio("driver_init_write", init + [acc(W4, 0x50, 0), acc(R4, 0x60), acc(W4, 0x64, 1), acc(R4, 0x70)], queue)
mmio("config_reads", [acc(0, 0x100), acc(2, 0x101), acc(R4, 0x104), acc(6, 0x100), acc(R4, 0xfc),
                      acc(1, 0x100, 7), acc(R4, 0xfc), acc(2, 0x1), acc(W4, 0x3, 1)], {0: b"\0"})
mmio("reset_after_ok", init + [acc(W4, 0x50, 0), acc(W4, 0x70, 0), acc(R4, 0x70), acc(W4, 0x44, 0),
                               acc(W4, 0x70, 1), acc(W4, 0x30, 5), acc(R4, 0x34)], queue)

# ---- virtio_pci: count u8, accesses (kind u8: bit 3 config space; offset u16, value u32), DATA ----
R1, W1, R2, W2, CFG = 0, 1, 2, 3, 8
MSIX_CTRL = 0x86  # MSI-X capability (after the four virtio ones at 0x40..0x84) + 2


def pci(name, accesses, layout):
    out("virtio_pci", name, bytes([len(accesses)]) + b"".join(accesses) + place(layout))


pci_init = [acc(CFG | R2, 0), acc(CFG | R1, 0x34), acc(W1, 0x14, 0), acc(W1, 0x14, 1), acc(W1, 0x14, 3),
            acc(W4, 0x00, 0), acc(R4, 0x04), acc(W4, 0x00, 1), acc(R4, 0x04),
            acc(W4, 0x08, 1), acc(W4, 0x0c, 1), acc(W4, 0x08, 0), acc(W4, 0x0c, 0),
            acc(W1, 0x14, 0xb), acc(R1, 0x14), acc(R2, 0x12), acc(W2, 0x16, 0), acc(R2, 0x18), acc(W2, 0x18, 16),
            acc(W4, 0x20, DATA + 0x200), acc(W4, 0x24, 0), acc(W4, 0x28, DATA + 0x300), acc(W4, 0x2c, 0),
            acc(W4, 0x30, DATA + 0x400), acc(W4, 0x34, 0)]
msix = [acc(W2, 0x1a, 0), acc(W2, 0x10, 1), acc(R2, 0x1a),
        acc(W4, 0x4000, 0xfee00000), acc(W4, 0x4004, 0), acc(W4, 0x4008, 0x30), acc(W4, 0x400c, 1),
        acc(CFG | W2, MSIX_CTRL, 0x8000)]
go = [acc(W2, 0x1c, 1), acc(W1, 0x14, 0xf), acc(W2, 0x3000, 0)]
pci("msix_masked_then_unmasked", pci_init + msix + go + [acc(R4, 0x6000), acc(W4, 0x400c, 0), acc(R4, 0x6000)], queue)
pci("intx_isr", pci_init + go + [acc(R1, 0x1000), acc(R1, 0x1000)], queue)
pci("bar_sizing_and_move", [acc(CFG | W4, 0x10, 0xffffffff), acc(CFG | R4, 0x10), acc(CFG | W4, 0x14, 0xffffffff),
                            acc(CFG | R4, 0x14), acc(CFG | W4, 0x10, 0x2000_0000), acc(CFG | W4, 0x14, 1),
                            acc(CFG | W2, 0x04, 0), acc(R4, 0x00), acc(CFG | W2, 0x04, 6)] + pci_init + go, queue)
pci("reset_after_ok", pci_init + msix + go + [acc(W1, 0x14, 0), acc(R1, 0x14), acc(W1, 0x14, 1),
                                               acc(W2, 0x16, 5), acc(R2, 0x18), acc(W2, 0x1a, 7)], queue)

# ---- config_toml: Keel's example config files ----
for f in sorted(os.listdir(os.path.join(ROOT, "resources", "examples"))):
    with open(os.path.join(ROOT, "resources", "examples", f), "rb") as fh:
        out("config_toml", f, fh.read())

# ---- config_flags: selector byte + a flag's value ----
flags = [(0, "size=2G,hugepages=on,shared=off"), (0, "4096M"), (1, "boot=4,sockets=1,cores=2,threads=2"),
         (2, "path=/var/lib/keel/disk.img,readonly=on,direct=off,serial=disk0"),
         (3, "cid=3,socket=/run/keel/vsock.sock,allow_host_connect=on"),
         (4, "tap=vnet1,bridge=br6,mac=6a:01:02:03:04:05,queues=2"),
         (5, "type=q35"), (6, "enabled=on,timeout=300"), (7, "path=/tmp/cfg.img,label=CONFIG"),
         (8, "file=/var/log/keel/serial.log"), (9, "1.5GiB")]
for i, (sel, v) in enumerate(flags):
    out("config_flags", f"flag{i}", bytes([sel]) + v.encode())

# ---- http_request ----
http = {
    "get_vm": b"GET /v1/vm HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "put_pause_body": b"PUT /v1/vm/pause HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    "pipelined_close": b"GET /v1/counters?format=json HTTP/1.1\r\n\r\nPUT /v1/vm/shutdown HTTP/1.1\r\n"
                       b"Connection: close\r\nContent-Length: 0\r\n\r\n",
    "bad_length": b"PUT /v1/vm/stop HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
}
for k, v in http.items():
    out("http_request", k, v)

# ---- grubenv: 1024-byte blocks ----
def block(lines):
    b = b"# GRUB Environment Block\n" + lines
    return b + b"#" * (1024 - len(b))


out("grubenv", "stable_a", block(b"boot_alternative=A\nboot_cycle=stable\n"))
out("grubenv", "install_b", block(b"boot_alternative=B\nboot_cycle=install\n# comment\n\nsaved_entry=x\n"))
out("grubenv", "escapes", block(b"v=a\\\\b\\\nc\nboot_cycle=failure\nboot_cycle=stable\n"))
out("grubenv", "unterminated", block(b"boot_alternative=A")[:60])

# ---- agent_protocol: JSON requests ----
reqs = [b'{"sender_cid":3,"message":"GetVsockProtocol"}', b'{"sender_cid":3,"message":"GetHostOSVersion"}',
        b'{"sender_cid":3,"message":"attach-hsm"}',
        b'{"sender_cid":3,"message":{"upgrade":{"url":"https://example.invalid/update-img.tar.zst",'
        b'"target-hash":"' + b"ab" * 32 + b'"}}}',
        b'{"sender_cid":3,"message":{"notify":{"count":2,"message":"hello \\u00e9"}}} trailing']
for i, r in enumerate(reqs):
    out("agent_protocol", f"req{i}", r)


# ---- upgrade_archive: update-img.tar.zst ----
def archive(name, members):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as t:
        for path, data, kind in members:
            ti = tarfile.TarInfo(path)
            ti.type = kind
            ti.size = len(data) if kind == tarfile.REGTYPE else 0
            t.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    z = subprocess.run(["zstd", "-19", "--check", "-q", "-c"], input=raw.getvalue(), capture_output=True, check=True)
    out("upgrade_archive", name, z.stdout)


archive("good", [("boot.img", b"\xeb" * 2048, tarfile.REGTYPE), ("root.img", bytes(range(256)) * 16, tarfile.REGTYPE)])
archive("dot_paths_extra", [("./boot.img", b"b" * 512, tarfile.REGTYPE), ("VERSION", b"1.2.3\n", tarfile.REGTYPE),
                            ("./root.img", b"r" * 512, tarfile.REGTYPE)])
archive("missing_root_symlink", [("boot.img", b"b" * 512, tarfile.REGTYPE), ("root.img", b"", tarfile.SYMTYPE)])
