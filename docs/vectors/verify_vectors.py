#!/usr/bin/env python3
"""An independent check of merkle-checkpoint-v1.txt, written from RFC 9162 and RFC 8032
rather than from Tally's code: `pip install blake3 pynacl && python3 verify_vectors.py`.
It recomputes every root and proof from the record hashes and verifies the signed
checkpoint, then the same checkpoint as a signed note with a witness cosignature
(checkpoint-note-v1.txt); engine/tests/vectors.rs checks the Rust code against both files."""
import sys, os
import blake3, nacl.signing

here = os.path.dirname(os.path.abspath(__file__))
L = [l.split() for l in open(os.path.join(here, "merkle-checkpoint-v1.txt")) if not l.startswith("#")]
rh = [bytes.fromhex(l[2]) for l in L if l[0] == "record_hash"]
H = lambda b: blake3.blake3(b).digest()

def split(n):
    k = 1
    while k * 2 < n:
        k *= 2
    return k

def mth(d):
    if not d:
        return H(b"")
    if len(d) == 1:
        return H(b"\x00" + d[0])
    k = split(len(d))
    return H(b"\x01" + mth(d[:k]) + mth(d[k:]))

def path(m, d):
    if len(d) <= 1:
        return []
    k = split(len(d))
    return path(m, d[:k]) + [mth(d[k:])] if m < k else path(m - k, d[k:]) + [mth(d[:k])]

def sub(m, d, b):
    if m == len(d):
        return [] if b else [mth(d)]
    k = split(len(d))
    return sub(m, d[:k], b) + [mth(d[k:])] if m <= k else sub(m - k, d[k:], False) + [mth(d[:k])]

hexes = lambda hs: [h.hex() for h in hs]
listed = lambda l: l[3].split(",") if len(l) > 3 else []
ok = True
for l in L:
    if l[0] == "leaf_hash":
        ok &= bytes.fromhex(l[2]) == H(b"\x00" + rh[int(l[1])])
    elif l[0] == "root":
        ok &= bytes.fromhex(l[2]) == mth(rh[: int(l[1])])
    elif l[0] == "inclusion":
        ok &= hexes(path(int(l[1]), rh[: int(l[2])])) == listed(l)
    elif l[0] == "consistency":
        m, n = int(l[1]), int(l[2])
        ok &= hexes(sub(m, rh[:n], True) if m < n else []) == listed(l)
d = {l[0]: l[1] for l in L if len(l) == 2}
st = bytes.fromhex(d["statement"])
nacl.signing.VerifyKey(bytes.fromhex(d["public_key"])).verify(st, bytes.fromhex(d["signature"]))
ok &= st[:8] == b"TALLYCKP" and st[56:88] == mth(rh[: int.from_bytes(st[40:48], "little")])
ok &= bytes.fromhex(d["checkpoint_entry"])[:120] == st
# checkpoint-note-v1.txt: the same checkpoint as a C2SP signed note with a witness's
# cosignature (FORMAT.md 17.9), checked from c2sp.org/signed-note and tlog-cosignature.
import base64, hashlib, struct
text = open(os.path.join(here, "checkpoint-note-v1.txt"), encoding="utf-8").read()
note, _, tail = text.partition("\n#")
body, _, sigs = note.rpartition("\n\n")
body += "\n"
lines = body.splitlines()
origin, size, root = lines[0], int(lines[1]), base64.b64decode(lines[2])
ok &= lines[3] == "hash blake3" and root == mth(rh[:size])
cp_id, t, head = int(lines[4].split()[1]), int(lines[5].split()[1]), base64.b64decode(lines[6].split()[1])
log_id = bytes.fromhex(origin.split("/")[1])
stmt = b"TALLYCKP" + struct.pack("<H", 1) + bytes(6) + log_id + struct.pack("<QQQ", cp_id, size, t) + root + head
ok &= stmt == st
kid = lambda name, typ, key: hashlib.sha256(name.encode() + b"\n" + typ + key).digest()[:4]
vkey = tail.splitlines()[-1].split("+", 2)
wkey = base64.b64decode(vkey[2])[1:]
for line in sigs.splitlines():
    name, sig = line.split(" ")[1], base64.b64decode(line.split(" ")[2])
    if name == origin:
        ok &= sig[:4] == kid(name, b"\xfftally-statement-v1", bytes.fromhex(d["public_key"]))
        nacl.signing.VerifyKey(bytes.fromhex(d["public_key"])).verify(stmt, sig[4:])
    elif name == vkey[0]:
        ok &= sig[:4] == kid(name, b"\x04", wkey) and sig[:4].hex() == vkey[1]
        ts = int.from_bytes(sig[4:12], "big")
        msg = b"cosignature/v1\ntime %d\n" % ts + body.encode()
        nacl.signing.VerifyKey(wkey).verify(msg, sig[12:])
print("vectors ok" if ok else "VECTORS DIFFER")
sys.exit(0 if ok else 1)
