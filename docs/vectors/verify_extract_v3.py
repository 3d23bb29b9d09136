#!/usr/bin/env python3
"""A second, independent verifier of Tally's audit-extract format 3, written from
EXTRACT.md section 6 (and the checks of sections 2 and 3 it refers to) and FORMAT.md
(sections 5, 5.3, 5.4, 5.5, 6, 7, 15, 15.5, 17.1, 17.2, 17.6, 17.9) alone, not from Tally's code:
`pip install blake3 pynacl && python3 verify_extract_v3.py`.

For each line `FILE EXPECTED...` of extract-v3/expected.txt it verifies FILE (the binary
`TALLYEXT` form or the JSON-lines form) against the keys of extract-v3/log.pub, making every
check of EXTRACT.md 6.5 steps 1 to 5, and prints what the file verifies to in the words of
expected.txt (`ok EVENTS stream S`, `ok EVENTS window A B`, `ok EVENTS inclusion`). It then
runs a tamper self-test: one flipped bit in each byte after the head frame of each binary
file, and a swapped, a dropped and a missing trailer line in the lines file, each of which
must fail. It then verifies extract-v3-blobs/ the same way with every blob in its blobs/ checked (EXTRACT.md 6.5
step 3 with --blobs), and changes each blob file by one bit in a copy, which must fail. Last, it
verifies extract-v4-removed/ (a stream extract with records retention pruned, FORMAT.md 5.5)
and flips one bit in each byte after its head frame, each of which must fail. The exit
status is 0 only if every file verifies as expected and every tampered file fails."""
import base64, binascii, calendar, datetime, json, os, re, struct, sys, time, zlib
import blake3, nacl.exceptions, nacl.signing

HERE = os.path.dirname(os.path.abspath(__file__))
DIR = os.path.join(HERE, "extract-v3")

BODY_BYTES_MAX = 1049520                              # FORMAT.md 1.1
LINE_MAX = 4 * BODY_BYTES_MAX // 3 + 128 * 48 + 4096  # EXTRACT.md 6.3
FRAME_JSON_MAX = 1048576                              # EXTRACT.md 6.2
GAP_MAX = 128                                         # EXTRACT.md 6.1, 6.2
U64_MAX = 2**64 - 1
BATCH_START, BATCH_END, PRODUCER_SIGNED = 1, 2, 32    # FORMAT.md 5.1
KNOWN_FLAGS = {1: 3, 2: 35}
PRODUCER_BLOCK_LEN = 104                              # FORMAT.md 5.4
MAGIC3 = b'{"format":"tally-audit-extract/3"'         # EXTRACT.md 6.3, 33 bytes
ROLES = {2: "event", 3: "before", 4: "after"}         # EXTRACT.md 6.2
ALL_BITS = {"kind", "gap count", "trailer length", "trailer"}   # tamper test: every bit
# the texts of EXTRACT.md section 1 for `why`
WHY_TEXTS = [
    "which events share a correlation id is not committed to by the checkpoint (each event's "
    "own correlation id is): the events were selected through "
    "the attribute index (derived data; tally verify --attribute-indexes checks it), and the "
    "extract proves only that each of them is in the signed log",
    "format version 1 log: its checkpoints commit to no stream heads and its record times may "
    "decrease, so the extract proves only that each event is in the signed log",
]


class Fail(Exception):
    pass


def need(cond, msg):
    if not cond:
        raise Fail(msg)


H = lambda b: blake3.blake3(b).digest()
le16 = lambda b, o: struct.unpack_from("<H", b, o)[0]
le32 = lambda b, o: struct.unpack_from("<I", b, o)[0]
le64 = lambda b, o: struct.unpack_from("<Q", b, o)[0]
b64 = lambda b: base64.b64encode(b).decode()


# ---------------------------------------------------------------- JSON (EXTRACT.md 2)
def _no_constant(name):
    raise Fail("JSON: %s is not a JSON number" % name)


def _depth_ok(text, limit=127):
    """Arrays and objects nest at most 127 deep, counted from the document's top."""
    depth, in_str, esc = 0, False, False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _no_lone_surrogate(v):
    # Python's json turns a valid \uD8xx\uDCxx pair into one character, so any surrogate
    # code point left in a string came from a lone one: serde_json refuses those.
    if isinstance(v, str):
        need(not any(0xD800 <= ord(c) <= 0xDFFF for c in v), "JSON: lone surrogate in a string")
    elif isinstance(v, list):
        for x in v:
            _no_lone_surrogate(x)
    elif isinstance(v, dict):
        for k, x in v.items():
            _no_lone_surrogate(k)
            _no_lone_surrogate(x)


def jload(raw):
    try:
        text = raw.decode("utf-8")                     # UTF-8 only, strict
    except UnicodeDecodeError:
        raise Fail("JSON: not UTF-8")
    need(_depth_ok(text), "JSON: nested more than 127 deep")
    try:
        # a key given twice keeps its last value (dict does that); numbers keep every digit
        v = json.loads(text, parse_constant=_no_constant, parse_float=lambda s: ("float", s))
    except (ValueError, RecursionError) as e:
        raise Fail("JSON: %s" % e)
    _no_lone_surrogate(v)
    return v


def is_u64(v):
    return type(v) is int and 0 <= v <= U64_MAX


def hexbytes(v, n, what):
    """Hex of exactly n bytes: written in lower case, read in either (EXTRACT.md 2)."""
    need(isinstance(v, str) and len(v) == 2 * n and re.fullmatch(r"[0-9a-fA-F]*", v) is not None,
         "%s must be %d hex digits" % (what, 2 * n))
    return bytes.fromhex(v)


def b64bytes(v, what, n=None):
    """Standard base64 with padding (RFC 4648 section 4), canonical."""
    need(isinstance(v, str), "%s must be a string" % what)
    try:
        b = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise Fail("%s is not standard base64" % what)
    need(b64(b) == v, "%s is not canonical padded base64" % what)
    need(n is None or len(b) == n, "%s must be %s bytes" % (what, n))
    return b


def same(a, b):
    """Exact JSON equality: types too (1 is not 1.0 and not true)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# ---------------------------------------------------------------- times
def rfc3339(ns):
    """RFC 3339 UTC with nine fraction digits (EXTRACT.md 2)."""
    s, frac = divmod(ns, 10**9)
    d = datetime.datetime(1970, 1, 1) + datetime.timedelta(seconds=s)
    return d.strftime("%Y-%m-%dT%H:%M:%S") + ".%09dZ" % frac


def parse_time(v, what):
    """RFC 3339 UTC (`YYYY-MM-DDTHH:MM:SS[.f...]Z`) or nanoseconds since the epoch
    (EXTRACT.md section 1 and 3.1 step 2)."""
    need(isinstance(v, str), "%s must be a string" % what)
    if re.fullmatch(r"[0-9]+", v):
        ns = int(v)
    else:
        m = re.fullmatch(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?Z", v)
        need(m is not None, "%s is not an RFC 3339 UTC time: %r" % (what, v))
        try:
            d = datetime.datetime(*(int(m.group(i)) for i in range(1, 7)))
        except ValueError:
            raise Fail("%s is not a valid time: %r" % (what, v))
        ns = calendar.timegm(d.timetuple()) * 10**9 + int((m.group(7) or "").ljust(9, "0"))
    need(0 <= ns <= U64_MAX, "%s is out of range" % what)
    return ns


# ---------------------------------------------------------------- checkpoint (FORMAT.md 17)
def note_body(st):
    """The checkpoint note body of FORMAT.md 17.9, from a decoded statement."""
    lines = ["tally/" + st["log_id"].hex(), str(st["tree_size"]), b64(st["root"]), "hash blake3",
             "checkpoint %d" % st["id"], "time %d" % st["time"], "chain-head " + b64(st["chain_head"])]
    if st["version"] == 2:
        lines.append("streams %d %s" % (st["stream_count"], b64(st["streams_root"])))
    return ("\n".join(lines) + "\n").encode()


def check_entry(entry_hex, keys):
    """EXTRACT.md 3 steps 2 and 3: decode the entry, check its signature."""
    need(isinstance(entry_hex, str) and re.fullmatch(r"[0-9a-fA-F]*", entry_hex) is not None
         and len(entry_hex) % 2 == 0, "checkpoint.entry must be hex")
    e = bytes.fromhex(entry_hex)
    need(len(e) >= 10, "checkpoint.entry is too short")
    version = le16(e, 8)
    need(version in (1, 2), "checkpoint statement version %d" % version)
    L, S = (224, 120) if version == 1 else (264, 160)
    need(len(e) == L, "checkpoint.entry must be %d bytes" % L)
    need(zlib.crc32(e[:L - 8]) == le32(e, L - 8), "checkpoint entry CRC mismatch")
    need(e[L - 4:] == bytes(4), "checkpoint entry reserved bytes not zero")
    need(e[:8] == b"TALLYCKP", "checkpoint statement magic")
    need(e[10:16] == bytes(6), "checkpoint statement reserved bytes not zero")
    cid, tree_size, t = struct.unpack_from("<QQQ", e, 32)
    st = dict(version=version, log_id=e[16:32], id=cid, tree_size=tree_size, time=t,
              root=e[56:88], chain_head=e[88:120], public_key=e[S:S + 32],
              signature=e[S + 32:S + 96], entry=e)
    if version == 2:
        st.update(stream_count=le64(e, 120), streams_root=e[128:160])
    need(st["public_key"] in keys, "the checkpoint's public key is not a --pubkey key")
    msg = e[:120] if version == 1 else note_body(st)
    try:
        nacl.signing.VerifyKey(st["public_key"]).verify(msg, st["signature"])
    except (nacl.exceptions.BadSignatureError, ValueError, nacl.exceptions.CryptoError):
        raise Fail("checkpoint signature does not verify")
    st["fingerprint"] = H(st["public_key"])[:8].hex()
    return st


def readable_checkpoint(st):
    """checkpoint_json: the readable form of EXTRACT.md 2.3."""
    r = {"id": st["id"], "log_id": st["log_id"].hex(), "tree_size": st["tree_size"],
         "root": st["root"].hex(), "chain_head": st["chain_head"].hex(), "time": st["time"],
         "time_utc": rfc3339(st["time"]), "public_key": st["public_key"].hex(),
         "key_fingerprint": st["fingerprint"], "signature": st["signature"].hex(),
         "entry": st["entry"].hex()}
    if st["version"] == 2:
        r.update(statement_version=2, stream_count=st["stream_count"],
                 streams_root=st["streams_root"].hex())
    return r


# ---------------------------------------------------------------- records (FORMAT.md 5-7)
def decode_header(h, version):
    """FORMAT.md 5 and 5.3, in the decoder's order; EXTRACT.md 3 step 5.1."""
    n = 80 if version == 1 else 88
    need(len(h) == n, "header must be %d bytes" % n)
    need(zlib.crc32(h[4:n]) == le32(h, 0), "header CRC mismatch")
    # FORMAT.md 5.5: under a version 2 statement, byte 44 is body_form (0 or 1, format
    # version 4; logs of versions 2 and 3 always write 0); version 1 reserves it.
    need(h[44] in ((0, 1) if version == 2 else (0,)), "header body_form %d not allowed" % h[44])
    need(h[45:48] == bytes(3), "header reserved bytes not zero")
    body_len = le32(h, 4)
    need(body_len <= BODY_BYTES_MAX, "body_len above BODY_BYTES_MAX")
    flags, kind = le16(h, 40), le16(h, 42)
    need(flags & ~KNOWN_FLAGS[version] == 0, "unknown record flags %#x" % flags)
    if flags & PRODUCER_SIGNED:
        need(flags & BATCH_START and body_len >= PRODUCER_BLOCK_LEN,
             "PRODUCER_SIGNED without BATCH_START or with a short body")
    need(kind == 1, "record kind %d" % kind)
    r = dict(body_len=body_len, body_crc=le32(h, 8), durable_lag=le32(h, 12),
             stream_version=le64(h, 24), record_time=le64(h, 32), flags=flags,
             position=le64(h, 16) if version == 1 else le64(h, 48),
             chain_hash=h[48:80] if version == 1 else h[56:88], body_form=h[44])
    need(r["durable_lag"] <= r["position"], "durable_lag above position")
    if version == 2:
        r["stream_prev"] = le64(h, 16)
        if r["stream_version"] == 0:
            need(r["stream_prev"] == U64_MAX, "stream_prev of version 0 must be u64::MAX")
        else:
            need(r["stream_prev"] < r["position"], "stream_prev not below position")
    return r


LIMITS = [256, 128, 128, 128, 128, 128]  # stream, aggregate_type, event_type, correlation, causation, actor


def decode_envelope(b, version):
    """FORMAT.md 6: the event envelope. Under a version 2 statement (a log of format
    version 2 or 3, EXTRACT.md 3 step 5.6), payload_form may be 1: a 40-byte blob
    reference (FORMAT.md 6.5)."""
    need(len(b) >= 48, "envelope shorter than 48 bytes")
    need(b[42:44] == bytes(2), "envelope reserved bytes not zero")
    form = b[29]
    need(form == 0 or (version == 2 and form == 1), "envelope payload_form %d not allowed" % form)
    ct = b[28]
    need(ct in (0, 1), "unknown content_type %d" % ct)
    lens = [le16(b, 30 + 2 * i) for i in range(6)]
    payload_len = le32(b, 44)
    for n, m in zip(lens, LIMITS):
        need(n <= m, "envelope field longer than its limit")
    need(payload_len <= 1048576, "payload longer than its limit")
    need(48 + sum(lens) + payload_len == len(b), "envelope lengths do not add up to its length")
    blob = None
    if form == 1:
        need(payload_len == 40, "a blob reference is not 40 bytes")
        size = le64(b, len(b) - 8)
        need(1 <= size <= 268435456, "blob size out of range")
        blob = (b[len(b) - 40:len(b) - 8], size)
    off, f = 48, []
    for n in lens:
        try:
            f.append(b[off:off + n].decode("utf-8"))
        except UnicodeDecodeError:
            raise Fail("envelope string is not UTF-8")
        off += n
    stream, _agg, etype = f[0], f[1], f[2]
    need(stream != "" and etype != "", "empty stream or event_type")
    need(not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in stream),
         "control character in stream")
    return dict(stream=stream, event_type=etype, correlation_id=f[3], blob=blob)


def decode_pruned(b):
    """FORMAT.md 5.5: a pruned body keeps the original body's hash, the position of the
    retention run that removed the event, and its stream; the rest is zero."""
    need(len(b) >= 48, "pruned body shorter than 48 bytes")
    need(b[42:48] == bytes(6), "pruned body reserved bytes not zero")
    n = le16(b, 40)
    need(1 <= n <= 256 and 48 + n <= len(b), "pruned body stream length %d" % n)
    try:
        stream = b[48:48 + n].decode("utf-8")
    except UnicodeDecodeError:
        raise Fail("pruned body stream is not UTF-8")
    need(not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in stream),
         "control character in stream")
    need(b[48 + n:] == bytes(len(b) - 48 - n), "pruned body tail not zero")
    return dict(body_hash=b[:32], removed_by=le64(b, 32), stream=stream)


def check_record(prev, header, body, version, tree_size):
    """EXTRACT.md 6.5 step 3 (3 steps 5.1 to 5.3 and 5.6); returns the decoded header."""
    need(len(prev) == 32, "prev must be 32 bytes")
    r = decode_header(header, version)
    need(len(body) == r["body_len"], "body length is not body_len")
    need(zlib.crc32(body) == r["body_crc"], "body CRC mismatch")
    pruned = decode_pruned(body) if r["body_form"] == 1 else None
    linked = pruned["body_hash"] if pruned else H(body)
    rh = blake3.blake3(header[12:44] + linked, key=prev).digest()  # chain_step, FORMAT.md 7
    need(rh == r["chain_hash"], "record hash mismatch")
    r["record_hash"] = rh
    if pruned:                                       # removed by retention: a marker
        r["envelope"] = dict(stream=pruned["stream"], event_type="$Removed", correlation_id="",
                             blob=None, removed_by=pruned["removed_by"])
    else:
        env = body
        if r["flags"] & PRODUCER_SIGNED:            # FORMAT.md 5.4
            need(body[100:104] == bytes(4), "producer block reserved bytes not zero")
            env = body[PRODUCER_BLOCK_LEN:]
        r["envelope"] = decode_envelope(env, version)
    need(r["position"] < tree_size, "position %d not below tree_size %d" % (r["position"], tree_size))
    return r


# ---------------------------------------------------------------- multiproof (EXTRACT.md 6.4)
def split(m):
    """The largest power of two below m (m >= 2)."""
    return 1 << ((m - 1).bit_length() - 1)


def cover(n, x, y):
    """The gap nodes of the run x..y: the largest nodes inside it, left to right."""
    out, todo = [], [(0, n)]
    while todo:
        s, e = todo.pop()
        if y <= s or e <= x or s >= e:
            continue
        if x <= s and e <= y:
            out.append((s, e))
        else:
            k = split(e - s)
            todo.append((s + k, e))
            todo.append((s, s + k))
    return out


def is_pow2(m):
    return m > 0 and m & (m - 1) == 0


class Fold:
    def __init__(self, n):
        self.n, self.covered, self.stack = n, 0, []

    def is_node(self, s, e):
        n = self.n
        if not (s < e <= n):
            return False
        if is_pow2(e - s) and s % (e - s) == 0:
            return True
        tz = (s & -s).bit_length() - 1 if s else None
        return e == n and (s == 0 or e - s < (1 << tz))

    def push(self, s, e, h):
        need(s == self.covered and self.is_node(s, e), "proof node %d..%d out of place" % (s, e))
        self.covered = e
        st = self.stack
        st.append((s, e, h))
        while len(st) >= 2:
            (a, b, l), (b2, c, r) = st[-2], st[-1]
            if b == b2 and self.is_node(a, c) and c - a >= 2 and b == a + split(c - a):
                st[-2:] = [(a, c, H(b"\x01" + l + r))]
            else:
                break

    def root(self):
        if self.covered == self.n and len(self.stack) == 1 and self.stack[0][:2] == (0, self.n):
            return self.stack[0][2]
        return None


# ---------------------------------------------------------------- stream heads (EXTRACT.md 2.6)
def head_proof_ok(stream, version, position, proof, streams_root):
    key = H(stream.encode())
    h = H(b"\x02" + key + struct.pack("<QQ", version, position))
    n = len(proof)
    for i in range(n):
        d = n - 1 - i
        bit = (key[d // 8] >> (7 - d % 8)) & 1
        h = H(b"\x03" + proof[i] + h) if bit else H(b"\x03" + h + proof[i])
    return h == streams_root


# ---------------------------------------------------------------- readers (EXTRACT.md 6.2, 6.3)
class Ctx:
    hlen = None       # the record header length, known once the head is verified


def binary_items(data, ctx, regions=None):
    """Yields ('head', obj), ('record', role, gaps, prev, header, body), ('trailer', obj)."""
    need(len(data) >= 12 and data[:8] == b"TALLYEXT", "magic")
    need(le16(data, 8) == 3, "binary form version %d" % le16(data, 8))
    need(le16(data, 10) == 0, "binary form flags not 0")
    pos, seen_head = 12, False

    def take(k, region):
        nonlocal pos
        need(pos + k <= len(data), "the file ends inside a frame")
        if regions is not None:
            regions.append((pos, pos + k, region))
        pos += k
        return data[pos - k:pos]

    while True:
        need(pos < len(data), "the file ends before the trailer")
        kind = take(1, "kind")[0]
        if not seen_head:
            need(kind == 1, "the first frame is not the head")
        if kind in (1, 5):
            n = le32(take(4, "head length" if kind == 1 else "trailer length"), 0)
            need(n <= FRAME_JSON_MAX, "JSON frame longer than 1048576 bytes")
            obj = jload(take(n, "head" if kind == 1 else "trailer"))
            if kind == 1:
                need(not seen_head, "a second head frame")
                seen_head = True
                yield ("head", obj)
            else:
                need(pos == len(data), "bytes after the trailer")
                yield ("trailer", obj)
                return
        elif kind in ROLES:
            g = take(1, "gap count")[0]
            need(g <= GAP_MAX, "more than 128 gap nodes")
            gaps = [take(32, "gap node") for _ in range(g)]
            prev = take(32, "prev")
            header = take(ctx.hlen, "header")
            r = decode_header(header, 1 if ctx.hlen == 80 else 2)   # before reading the body
            body = take(r["body_len"], "body")
            yield ("record", ROLES[kind], gaps, prev, header, body)
        else:
            raise Fail("unknown frame kind %d" % kind)


def line_items(data, ctx):
    need(data.endswith(b"\n"), "the last line does not end with a newline")
    lines = data[:-1].split(b"\n")
    for i, line in enumerate(lines):
        need(len(line) + 1 <= LINE_MAX, "line %d longer than LINE_MAX" % (i + 1))
        obj = jload(line)
        if i == 0:
            need(line.startswith(MAGIC3), "the head line does not begin with the format")
            yield ("head", obj)
            continue
        need(isinstance(obj, dict) and len(obj) == 1, "line %d is not an object of one key" % (i + 1))
        (role, v), = obj.items()
        if role == "trailer":
            need(i == len(lines) - 1, "lines after the trailer")
            yield ("trailer", v)
            return
        need(role in ("event", "before", "after"), "line %d: unknown item %r" % (i + 1, role))
        need(isinstance(v, dict) and set(v) == {"gap", "prev", "header", "body"},
             "line %d: a record item needs exactly gap, prev, header and body" % (i + 1))
        need(isinstance(v["gap"], list) and len(v["gap"]) <= GAP_MAX, "line %d: gap" % (i + 1))
        gaps = [b64bytes(g, "gap", 32) for g in v["gap"]]
        yield ("record", role, gaps, b64bytes(v["prev"], "prev", 32),
               b64bytes(v["header"], "header", ctx.hlen), b64bytes(v["body"], "body"))
    raise Fail("the file ends before the trailer")


# ---------------------------------------------------------------- the verifier (EXTRACT.md 6.5)
def check_blob(blob, blobs):
    """EXTRACT.md 6.5 step 3 with --blobs: the file named by the blob's hash (hex) in
    `blobs` has the reference's length and BLAKE3 hash (FORMAT.md 6.5)."""
    h, size = blob
    path = os.path.join(blobs, h.hex())
    need(os.path.isfile(path), "blob %s is not in %s" % (h.hex(), blobs))
    data = open(path, "rb").read()
    need(len(data) == size and H(data) == h, "blob %s does not match its reference" % h.hex())


def verify(data, keys, regions=None, blobs=None):
    ctx = Ctx()
    if data[:8] == b"TALLYEXT":
        items = binary_items(data, ctx, regions)
    elif data[:33] == MAGIC3:
        items = line_items(data, ctx)
    else:
        raise Fail("not a format 3 extract")

    # 2. head
    tag, head = next(items)
    need(isinstance(head, dict), "the head is not a JSON object")
    need(head.get("format") == "tally-audit-extract/3", "head format")
    cp = head.get("checkpoint")
    need(isinstance(cp, dict), "checkpoint must be an object")
    st = check_entry(cp.get("entry"), keys)
    need(same(cp, readable_checkpoint(st)), "checkpoint differs from its entry")
    need(same(head.get("public_key"), st["public_key"].hex()), "public_key is not the signer's")
    need(same(head.get("key_fingerprint"), st["fingerprint"]), "key_fingerprint is not the signer's")
    need(same(head.get("log_id"), st["log_id"].hex()), "log_id is not the statement's")
    sel = head.get("selection")
    need(isinstance(sel, dict) and sel.get("kind") in ("stream", "window", "inclusion"),
         "selection must be of kind stream, window or inclusion")
    kind = sel["kind"]
    if kind == "stream":
        need(isinstance(sel.get("stream"), str), "selection.stream must be a string")
        need(st["version"] == 2, "a stream selection needs a version 2 statement")
        stream = sel["stream"]
    elif kind == "window":
        need(st["version"] == 2, "a window selection needs a version 2 statement")
        t1 = parse_time(sel.get("from_time"), "from_time")
        t2 = parse_time(sel.get("to_time"), "to_time")
        need(t1 < t2, "from_time must be before to_time")
    else:
        need(isinstance(sel.get("why"), str), "selection.why must be a string")
    version, n = st["version"], st["tree_size"]
    ctx.hlen = 80 if version == 1 else 88

    # 3 and 4. record items
    fold = Fold(n)
    last = None          # position of the previous record item
    events, roles, ev = 0, [], []
    first_event_pos = last_event = None
    before = after = None
    for item in items:
        if item[0] == "trailer":
            trailer = item[1]
            break
        _, role, gaps, prev, header, body = item
        where = "events[%d]" % events if role == "event" else "the record %s the window" % role
        try:
            r = check_record(prev, header, body, version, n)
            p = r["position"]
            if kind == "stream" and role == "event":
                need(r["envelope"]["stream"] == stream, "not of stream %r" % stream)
            if blobs is not None and role == "event" and r["envelope"]["blob"] is not None:
                check_blob(r["envelope"]["blob"], blobs)
            # 4. order and proof
            need(role == "event" or kind == "window", "%s outside a window extract" % role)
            need(role != "before" or not roles, "before is not the first item")
            need(not roles or roles[-1] != "after", "an item after after")
            need(last is None or p > last, "position does not follow the previous one")
            run = cover(n, 0 if last is None else last + 1, p)
            need(len(gaps) == len(run), "%d gap nodes where the run needs %d" % (len(gaps), len(run)))
            for (s, e), g in zip(run, gaps):
                fold.push(s, e, g)
            fold.push(p, p + 1, H(b"\x00" + r["record_hash"]))
            if kind == "stream":
                need(r["stream_version"] == events, "stream version %d, expected %d"
                     % (r["stream_version"], events))
                want_prev = U64_MAX if last_event is None else last_event[1]
                need(r["stream_prev"] == want_prev, "stream_prev is not the previous event's position")
            if kind == "window":
                need(last is None or p == last + 1, "not contiguous with the previous record")
                t = r["record_time"]
                if role == "before":
                    need(t < t1, "recorded at or after from_time")
                    before = p
                elif role == "after":
                    need(t >= t2, "recorded before to_time")
                    after = p
                else:
                    need(t1 <= t < t2, "recorded outside the window")
        except Fail as e:
            raise Fail("%s (position %s): %s" % (where, header and _pos(header, ctx.hlen), e))
        roles.append(role)
        last = p
        if role == "event":
            if first_event_pos is None:
                first_event_pos = p
            last_event = (r["stream_version"], p)
            events += 1

    # 5. trailer
    need(isinstance(trailer, dict), "trailer is not a JSON object")
    need(same(trailer.get("events"), events) if is_u64(trailer.get("events")) else False,
         "trailer: events is not the number of event items")
    g = trailer.get("gap")
    need(isinstance(g, list), "trailer: gap must be an array")
    run = cover(n, 0 if last is None else last + 1, n)
    need(len(g) == len(run), "trailer: %d gap nodes where %d are needed" % (len(g), len(run)))
    for (s, e), x in zip(run, g):
        fold.push(s, e, hexbytes(x, 32, "trailer: gap node"))
    root = fold.root()
    need(root == st["root"], "the Merkle root computed from the extract's %d records and proof "
         "nodes is %s, but checkpoint %d signs %s" % (len(roles), root and root.hex(), st["id"],
                                                      st["root"].hex()))
    if kind == "stream":
        hd = trailer.get("head")
        need(isinstance(hd, dict), "trailer: head must be an object")
        need(is_u64(hd.get("version")) and is_u64(hd.get("position")),
             "trailer: head.version and head.position must be integers")
        pr = hd.get("proof")
        need(isinstance(pr, list) and len(pr) <= 256, "trailer: head.proof must be an array of at most 256")
        pr = [hexbytes(x, 32, "trailer: head.proof entry") for x in pr]
        need(last_event is not None and last_event == (hd["version"], hd["position"]),
             "trailer: the last event is not the stream's head")
        need(head_proof_ok(stream, hd["version"], hd["position"], pr, st["streams_root"]),
             "trailer: the head proof does not verify against streams_root")
        return "ok %d stream %s" % (events, stream)
    if kind == "window":
        a, b = trailer.get("first_position"), trailer.get("end_position")
        need(is_u64(a) and is_u64(b), "trailer: first_position and end_position must be integers")
        need(a <= b <= n, "trailer: need first_position <= end_position <= tree_size")
        need(events == b - a, "trailer: %d events in a window of %d positions" % (events, b - a))
        need(events == 0 or first_event_pos == a, "trailer: the first event is not at first_position")
        need((before is not None) == (a > 0), "trailer: before present exactly when a > 0")
        need(before is None or before == a - 1, "trailer: before is not at a - 1")
        need((after is not None) == (b < n), "trailer: after present exactly when b < tree_size")
        need(after is None or after == b, "trailer: after is not at b")
        return "ok %d window %d %d" % (events, a, b)
    return "ok %d inclusion" % events


def _pos(header, hlen):
    if len(header) != hlen:
        return "?"
    return le64(header, 16 if hlen == 80 else 48)


def _head_why(data):
    """The head's selection.why, for a note when it is not a text of section 1."""
    try:
        ctx = Ctx()
        items = binary_items(data, ctx) if data[:8] == b"TALLYEXT" else line_items(data, ctx)
        sel = next(items)[1].get("selection", {})
        return sel.get("why") if sel.get("kind") == "inclusion" else None
    except Exception:
        return None


def read_keys(path):
    """A public key file (FORMAT.md 17.6)."""
    keys = set()
    for line in open(path, encoding="utf-8"):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        k = bytes.fromhex(line)
        assert len(k) == 32, "a key line must be 64 hex digits"
        nacl.signing.VerifyKey(k)
        keys.add(k)
    assert keys, "no key in " + path
    return keys


def check(data, keys, regions=None, blobs=None):
    try:
        return verify(data, keys, regions, blobs)
    except Fail as e:
        return "FAILED: %s" % e


# ---------------------------------------------------------------- main
def main():
    keys = read_keys(os.path.join(DIR, "log.pub"))
    ok = True
    files = []
    for line in open(os.path.join(DIR, "expected.txt"), encoding="utf-8"):
        if line.startswith("#") or not line.strip():
            continue
        name, expected = line.split(None, 1)
        expected = " ".join(expected.split())
        data = open(os.path.join(DIR, name), "rb").read()
        got = check(data, keys)
        same_ = got == expected
        ok &= same_
        print("%-16s %s%s" % (name, got, "" if same_ else "   EXPECTED: " + expected))
        files.append((name, data, expected))
        why = _head_why(data)
        if why is not None and why not in WHY_TEXTS:
            print("  note: selection.why is not one of the texts of EXTRACT.md section 1: %r" % why)

    # tamper self-test
    print("tamper self-test:")
    total = caught = 0
    t0 = time.time()
    for name, data, expected in files:
        if data[:8] == b"TALLYEXT":
            regions = []
            verify(data, keys, regions)
            head_end = next(e for s, e, r in regions if r == "head")
            region_of = {}
            for s, e, r in regions:
                for i in range(s, e):
                    region_of[i] = r
            counts, missed = {}, []
            for i in range(head_end, len(data)):
                r = region_of[i]
                # one bit (rotating) in every byte; every bit of the framing and trailer bytes
                bits = range(8) if r in ALL_BITS else [i % 8]
                for bit in bits:
                    if r == "trailer" and bit == 5 and chr(data[i]) in "abcdefABCDEF":
                        # a hex digit's case: the same bytes, read either way (EXTRACT.md 2)
                        continue
                    t = bytearray(data)
                    t[i] ^= 1 << bit
                    got = check(bytes(t), keys)
                    c = counts.setdefault(r, [0, 0])
                    c[0] += 1
                    total += 1
                    if got.startswith("FAILED"):
                        c[1] += 1
                        caught += 1
                    else:
                        missed.append((i, bit, r, got))
            print("  %s: %d bytes after the head frame, %d single-bit flips: %d fail (%s)"
                  % (name, len(data) - head_end, sum(c[0] for c in counts.values()),
                     sum(c[1] for c in counts.values()),
                     ", ".join("%s %d/%d" % (r, c[1], c[0]) for r, c in counts.items())))
            for i, bit, r, got in missed:
                print("    NOT CAUGHT: byte %d bit %d (%s): %s" % (i, bit, r, got))
            # whole record frames dropped, and adjacent ones swapped
            starts = [s for s, e, r in regions if r == "kind"]
            frames = [(a, b) for a, b in zip(starts, starts[1:])][1:]   # record frames
            edits = []
            for k, (a, b) in enumerate(frames):
                edits.append(("drop record frame %d" % k, data[:a] + data[b:]))
                if k + 1 < len(frames):
                    c = frames[k + 1][1]
                    edits.append(("swap record frames %d and %d" % (k, k + 1),
                                  data[:a] + data[b:c] + data[a:b] + data[c:]))
            n_caught = 0
            for what, t in edits:
                got = check(t, keys)
                total += 1
                if got.startswith("FAILED"):
                    caught += 1
                    n_caught += 1
                else:
                    print("    NOT CAUGHT: %s: %s" % (what, got))
            print("  %s: %d record frames dropped or swapped: %d fail" % (name, len(edits), n_caught))
        else:
            lines = data[:-1].split(b"\n")
            recs = list(range(1, len(lines) - 1))
            cases = []
            if len(recs) >= 2:
                a, b = recs[0], recs[len(recs) // 2]
                sw = list(lines)
                sw[a], sw[b] = sw[b], sw[a]
                cases.append(("swap record lines %d and %d" % (a + 1, b + 1), sw))
                sw = list(lines)
                sw[recs[-1]], sw[recs[-2]] = sw[recs[-2]], sw[recs[-1]]
                cases.append(("swap the last two record lines", sw))
            for d in (recs[0], recs[len(recs) // 2], recs[-1]):
                cases.append(("drop record line %d" % (d + 1), lines[:d] + lines[d + 1:]))
            cases.append(("drop the trailer line", lines[:-1]))
            n_caught = 0
            for what, ls in cases:
                got = check(b"\n".join(ls) + b"\n", keys)
                total += 1
                if got.startswith("FAILED"):
                    caught += 1
                    n_caught += 1
                else:
                    print("    NOT CAUGHT: %s: %s" % (what, got))
            print("  %s: %d line edits (swaps, drops, no trailer): %d fail" % (name, len(cases), n_caught))
    print("tamper: %d of %d altered files fail (%.1f s)" % (caught, total, time.time() - t0))
    ok &= caught == total
    print("extract-v3 ok" if ok else "EXTRACT-V3 DIFFERS")
    ok &= check_blob_vectors()
    ok &= check_removed_vectors()
    sys.exit(0 if ok else 1)


def check_blob_vectors():
    """extract-v3-blobs: a stream extract whose events refer to blobs, verified with every
    blob in blobs/ checked; then each blob file changed by one bit (in a copy) must fail."""
    import shutil, tempfile
    d = os.path.join(HERE, "extract-v3-blobs")
    keys = read_keys(os.path.join(d, "log.pub"))
    blobs = os.path.join(d, "blobs")
    ok = True
    for line in open(os.path.join(d, "expected.txt"), encoding="utf-8"):
        if line.startswith("#") or not line.strip():
            continue
        name, expected = line.split(None, 1)
        expected = " ".join(expected.split())
        data = open(os.path.join(d, name), "rb").read()
        got = check(data, keys, blobs=blobs)
        ok &= got == expected
        print("%-16s %s%s (blobs checked)" % (name, got, "" if got == expected else "   EXPECTED: " + expected))
        names = sorted(os.listdir(blobs))
        caught = 0
        for victim in names:
            with tempfile.TemporaryDirectory() as t:
                for n in names:
                    shutil.copy(os.path.join(blobs, n), os.path.join(t, n))
                p = os.path.join(t, victim)
                b = bytearray(open(p, "rb").read())
                b[len(b) // 2] ^= 1
                open(p, "wb").write(bytes(b))
                if check(data, keys, blobs=t).startswith("FAILED"):
                    caught += 1
        print("  %s: %d blob files changed by one bit: %d fail" % (name, len(names), caught))
        ok &= caught == len(names) and len(names) > 0
    print("extract-v3-blobs ok" if ok else "EXTRACT-V3-BLOBS DIFFERS")
    return ok


def check_removed_vectors():
    """extract-v4-removed: a complete stream extract of a format version 4 log whose older
    events retention removed (FORMAT.md 5.5): it verifies to expected.txt, it holds pruned
    records, and every single-bit change after the head frame fails (a hex digit's case in
    the trailer excepted)."""
    d = os.path.join(HERE, "extract-v4-removed")
    keys = read_keys(os.path.join(d, "log.pub"))
    ok = True
    for line in open(os.path.join(d, "expected.txt"), encoding="utf-8"):
        if line.startswith("#") or not line.strip():
            continue
        name, expected = line.split(None, 1)
        expected = " ".join(expected.split())
        data = open(os.path.join(d, name), "rb").read()
        got = check(data, keys)
        ok &= got == expected
        print("%-16s %s%s" % (name, got, "" if got == expected else "   EXPECTED: " + expected))
        regions = []
        verify(data, keys, regions)
        head_end = next(e for s, e, r in regions if r == "head")
        region_of = {}
        for s, e, r in regions:
            for i in range(s, e):
                region_of[i] = r
        pruned = sum(1 for s, e, r in regions if r == "header" and data[s + 44] == 1)
        ok &= pruned > 0
        tried = caught = 0
        for i in range(head_end, len(data)):
            bit = i % 8
            if region_of.get(i) == "trailer" and bit == 5 and chr(data[i]) in "abcdefABCDEF":
                continue
            t = bytearray(data)
            t[i] ^= 1 << bit
            tried += 1
            caught += check(bytes(t), keys).startswith("FAILED")
        print("  %s: %d pruned records; %d single-bit flips after the head: %d fail"
              % (name, pruned, tried, caught))
        ok &= caught == tried
    print("extract-v4-removed ok" if ok else "EXTRACT-V4-REMOVED DIFFERS")
    return ok


if __name__ == "__main__":
    main()
