//! The bytes of a format 3 extract (docs/EXTRACT.md, section 6): the binary form and the
//! JSON-lines form, written and read one item at a time.

use std::io::{BufRead, Read, Write};

use base64::Engine;
use serde::Deserialize;
use serde_json::Value;
use tally_engine::format::Hash32;
use tally_engine::format::record::{Layout, RecordHeader};

/// The first 8 bytes of the binary form.
pub const MAGIC: &[u8; 8] = b"TALLYEXT";
/// The binary form's version (bytes 8..10, `u16` LE).
pub const BINARY_VERSION: u16 = 3;
/// Frame kinds (the first byte of every frame).
pub const FRAME_HEAD: u8 = 1;
/// An event of the selection.
pub const FRAME_EVENT: u8 = 2;
/// The record just before a window (window extracts only).
pub const FRAME_BEFORE: u8 = 3;
/// The record just after a window (window extracts only).
pub const FRAME_AFTER: u8 = 4;
/// The trailer: the last frame.
pub const FRAME_TRAILER: u8 = 5;
/// The most bytes a head or trailer frame may hold.
pub const JSON_FRAME_MAX: u32 = 1 << 20;
/// The most gap nodes before one record (two per level of a tree of 2^64 leaves).
pub const GAPS_MAX: usize = 128;
/// The longest line the JSON-lines form may hold: a record of the largest body in base64,
/// with its gap nodes and keys.
pub const LINE_MAX: usize =
    (tally_engine::format::record::BODY_BYTES_MAX as usize) * 4 / 3 + GAPS_MAX * 48 + 4096;

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// What a record item is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// An event of the selection.
    Event,
    /// The record at the window's first position minus one.
    Before,
    /// The record at the window's end position.
    After,
}

impl Role {
    fn frame(self) -> u8 {
        match self {
            Role::Event => FRAME_EVENT,
            Role::Before => FRAME_BEFORE,
            Role::After => FRAME_AFTER,
        }
    }

    fn key(self) -> &'static str {
        match self {
            Role::Event => "event",
            Role::Before => "before",
            Role::After => "after",
        }
    }
}

/// Which of the two forms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// Frames of bytes (section 6.2).
    Binary,
    /// JSON lines (section 6.3).
    Lines,
}

/// Writes an extract's items in order: head, records, trailer.
pub struct Writer<W: Write> {
    out: W,
    form: Form,
    line: Vec<u8>,
}

impl<W: Write> Writer<W> {
    /// Starts an extract.
    pub fn new(out: W, form: Form) -> Writer<W> {
        Writer {
            out,
            form,
            line: Vec::new(),
        }
    }

    fn json_frame(&mut self, kind: u8, v: &Value) -> std::io::Result<()> {
        let text = serde_json::to_vec(v)?;
        match self.form {
            Form::Binary => {
                let len = u32::try_from(text.len())
                    .ok()
                    .filter(|&n| n <= JSON_FRAME_MAX)
                    .ok_or_else(|| std::io::Error::other("extract head or trailer too large"))?;
                self.out.write_all(&[kind])?;
                self.out.write_all(&len.to_le_bytes())?;
                self.out.write_all(&text)
            }
            Form::Lines => {
                self.out.write_all(&text)?;
                self.out.write_all(b"\n")
            }
        }
    }

    /// The head (section 6.1); the binary form's preamble first.
    pub fn head(&mut self, head: &Value) -> std::io::Result<()> {
        if self.form == Form::Binary {
            self.out.write_all(MAGIC)?;
            self.out.write_all(&BINARY_VERSION.to_le_bytes())?;
            self.out.write_all(&0u16.to_le_bytes())?;
        }
        self.json_frame(FRAME_HEAD, head)
    }

    /// A record: the gap nodes before it, the record hash before it, its header and body.
    pub fn record(
        &mut self,
        role: Role,
        gaps: &[Hash32],
        prev: &Hash32,
        header: &[u8],
        body: &[u8],
    ) -> std::io::Result<()> {
        let count = u8::try_from(gaps.len())
            .ok()
            .filter(|&n| usize::from(n) <= GAPS_MAX)
            .ok_or_else(|| std::io::Error::other("more gap nodes than a tree has levels"))?;
        match self.form {
            Form::Binary => {
                self.out.write_all(&[role.frame(), count])?;
                for g in gaps {
                    self.out.write_all(g)?;
                }
                self.out.write_all(prev)?;
                self.out.write_all(header)?;
                self.out.write_all(body)
            }
            Form::Lines => {
                let e = b64();
                let l = &mut self.line;
                l.clear();
                l.extend_from_slice(b"{\"");
                l.extend_from_slice(role.key().as_bytes());
                l.extend_from_slice(b"\":{\"gap\":[");
                for (i, g) in gaps.iter().enumerate() {
                    if i > 0 {
                        l.push(b',');
                    }
                    l.push(b'"');
                    push_b64(l, &e, g);
                    l.push(b'"');
                }
                l.extend_from_slice(b"],\"prev\":\"");
                push_b64(l, &e, prev);
                l.extend_from_slice(b"\",\"header\":\"");
                push_b64(l, &e, header);
                l.extend_from_slice(b"\",\"body\":\"");
                push_b64(l, &e, body);
                l.extend_from_slice(b"\"}}\n");
                self.out.write_all(l)
            }
        }
    }

    /// The trailer (section 6.1), and the writer back.
    pub fn trailer(mut self, trailer: &Value) -> std::io::Result<W> {
        match self.form {
            Form::Binary => self.json_frame(FRAME_TRAILER, trailer)?,
            Form::Lines => {
                self.json_frame(FRAME_TRAILER, &serde_json::json!({ "trailer": trailer }))?
            }
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

fn push_b64(out: &mut Vec<u8>, e: &base64::engine::GeneralPurpose, bytes: &[u8]) {
    let start = out.len();
    out.resize(start + bytes.len().div_ceil(3) * 4, 0);
    let n = e
        .encode_slice(bytes, &mut out[start..])
        .expect("sized for the encoding");
    out.truncate(start + n);
}

/// One record item as read, not yet checked.
#[derive(Debug)]
pub struct RawItem {
    /// Its role, when the form says it before parsing (binary); lines say it in the line.
    pub role: Option<Role>,
    /// The item's bytes: a binary frame after its kind byte, or a line.
    pub bytes: Vec<u8>,
}

/// A record item's parts.
#[derive(Debug)]
pub struct Parts {
    /// What it is.
    pub role: Role,
    /// The gap nodes before it.
    pub gaps: Vec<Hash32>,
    /// The record hash before it.
    pub prev: Hash32,
    /// Its header bytes.
    pub header: Vec<u8>,
    /// Its body.
    pub body: Vec<u8>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineRecord<'a> {
    #[serde(borrow)]
    gap: Vec<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    prev: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    header: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    body: std::borrow::Cow<'a, str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "lowercase")]
enum Line<'a> {
    #[serde(borrow)]
    Event(LineRecord<'a>),
    #[serde(borrow)]
    Before(LineRecord<'a>),
    #[serde(borrow)]
    After(LineRecord<'a>),
}

impl RawItem {
    /// Splits the item into its parts. `layout` gives the header's length.
    ///
    /// # Errors
    /// A description of what is malformed.
    pub fn parts(&self, layout: Layout) -> Result<Parts, String> {
        match self.role {
            Some(role) => {
                let b = &self.bytes;
                let gaps = usize::from(b[0]);
                let fixed = 1 + gaps * 32 + 32 + layout.header_len();
                let hash = |at: usize| -> Hash32 { b[at..at + 32].try_into().expect("32 bytes") };
                // The reader framed it: `fixed` bytes and the body are there.
                Ok(Parts {
                    role,
                    gaps: (0..gaps).map(|i| hash(1 + 32 * i)).collect(),
                    prev: hash(1 + 32 * gaps),
                    header: b[1 + 32 * gaps + 32..fixed].to_vec(),
                    body: b[fixed..].to_vec(),
                })
            }
            None => {
                let line: Line<'_> = serde_json::from_slice(&self.bytes)
                    .map_err(|e| format!("not a record line: {e}"))?;
                let (role, r) = match line {
                    Line::Event(r) => (Role::Event, r),
                    Line::Before(r) => (Role::Before, r),
                    Line::After(r) => (Role::After, r),
                };
                if r.gap.len() > GAPS_MAX {
                    return Err(format!("{} gap nodes, more than a tree has", r.gap.len()));
                }
                let e = b64();
                let hash = |name: &str, s: &str| -> Result<Hash32, String> {
                    let v = e
                        .decode(s)
                        .map_err(|err| format!("{name}: not base64: {err}"))?;
                    v.try_into()
                        .map_err(|_| format!("{name}: not 32 bytes in base64"))
                };
                Ok(Parts {
                    role,
                    gaps: r
                        .gap
                        .iter()
                        .enumerate()
                        .map(|(i, g)| hash(&format!("gap[{i}]"), g))
                        .collect::<Result<_, _>>()?,
                    prev: hash("prev", &r.prev)?,
                    header: e
                        .decode(r.header.as_bytes())
                        .map_err(|err| format!("header: not base64: {err}"))?,
                    body: e
                        .decode(r.body.as_bytes())
                        .map_err(|err| format!("body: not base64: {err}"))?,
                })
            }
        }
    }
}

/// What the reader gives next.
pub enum Next {
    /// A record item.
    Item(RawItem),
    /// The trailer (the reader has checked that nothing follows it).
    Trailer(Value),
}

/// Reads an extract's items in order.
pub struct Reader<R: BufRead> {
    input: R,
    form: Form,
    layout: Option<Layout>,
    /// Lines form: the line read ahead (the last line is the trailer).
    ahead: Option<Vec<u8>>,
    records: u64,
}

fn too_short(what: &str) -> String {
    format!("the extract ends inside {what}: it is truncated")
}

impl<R: BufRead> Reader<R> {
    /// Recognises the form by the first bytes.
    ///
    /// # Errors
    /// When the input is neither form of format 3 (the caller tries the older formats).
    pub fn sniff(input: &mut R) -> std::io::Result<Option<Form>> {
        let start = input.fill_buf()?;
        if start.starts_with(MAGIC) {
            return Ok(Some(Form::Binary));
        }
        // The lines form starts with its head, whose first key is "format" with the
        // format 3 name.
        let want = format!("{{\"format\":\"{}\"", super::EXTRACT_FORMAT_V3);
        Ok(start.starts_with(want.as_bytes()).then_some(Form::Lines))
    }

    /// A reader of `form`.
    pub fn new(input: R, form: Form) -> Reader<R> {
        Reader {
            input,
            form,
            layout: None,
            ahead: None,
            records: 0,
        }
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &str) -> Result<(), String> {
        self.input.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                too_short(what)
            } else {
                format!("reading the extract: {e}")
            }
        })
    }

    fn json_frame(&mut self, what: &str) -> Result<Value, String> {
        let mut len = [0u8; 4];
        self.read_exact(&mut len, what)?;
        let len = u32::from_le_bytes(len);
        if len > JSON_FRAME_MAX {
            return Err(format!(
                "the {what} claims {len} bytes, more than {JSON_FRAME_MAX}"
            ));
        }
        let mut text = vec![0u8; len as usize];
        self.read_exact(&mut text, what)?;
        serde_json::from_slice(&text).map_err(|e| format!("the {what} is not JSON: {e}"))
    }

    fn line(&mut self) -> Result<Option<Vec<u8>>, String> {
        let mut line = Vec::new();
        let n = (&mut self.input)
            .take(LINE_MAX as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("reading the extract: {e}"))?;
        if n == 0 {
            return Ok(None);
        }
        if line.last() != Some(&b'\n') {
            if line.len() > LINE_MAX {
                return Err(format!(
                    "line {} is longer than any record line ({LINE_MAX} bytes)",
                    self.records + 2
                ));
            }
            return Err(too_short("its last line (no newline at its end)"));
        }
        line.pop();
        Ok(Some(line))
    }

    /// The head, with the preamble checked (binary form).
    ///
    /// # Errors
    /// A description of what is malformed.
    pub fn head(&mut self) -> Result<Value, String> {
        match self.form {
            Form::Binary => {
                let mut pre = [0u8; 12];
                self.read_exact(&mut pre, "its preamble")?;
                let version = u16::from_le_bytes([pre[8], pre[9]]);
                let flags = u16::from_le_bytes([pre[10], pre[11]]);
                if &pre[..8] != MAGIC || version != BINARY_VERSION || flags != 0 {
                    return Err(format!(
                        "preamble: binary extract version {version}, flags {flags}: only version 3 with no flags is known"
                    ));
                }
                let mut kind = [0u8];
                self.read_exact(&mut kind, "its head")?;
                if kind[0] != FRAME_HEAD {
                    return Err(format!(
                        "the first frame is of kind {}, not a head",
                        kind[0]
                    ));
                }
                self.json_frame("head")
            }
            Form::Lines => {
                let line = self.line()?.ok_or_else(|| too_short("its head"))?;
                serde_json::from_slice(&line).map_err(|e| format!("the head line is not JSON: {e}"))
            }
        }
    }

    /// Sets the record layout (from the head's checkpoint) before the first record.
    pub fn set_layout(&mut self, layout: Layout) {
        self.layout = Some(layout);
    }

    /// The next item.
    ///
    /// # Errors
    /// A description of what is malformed, naming the record by its place in the file.
    pub fn next(&mut self) -> Result<Next, String> {
        match self.form {
            Form::Binary => self.next_frame(),
            Form::Lines => self.next_line(),
        }
    }

    fn next_frame(&mut self) -> Result<Next, String> {
        let layout = self.layout.expect("layout set before the records");
        let what = format!("record {} (counting from 0)", self.records);
        let mut kind = [0u8];
        self.read_exact(&mut kind, "a frame: there is no trailer")?;
        let role = match kind[0] {
            FRAME_EVENT => Role::Event,
            FRAME_BEFORE => Role::Before,
            FRAME_AFTER => Role::After,
            FRAME_TRAILER => {
                let trailer = self.json_frame("trailer")?;
                let mut rest = [0u8];
                return match self.input.read(&mut rest) {
                    Ok(0) => Ok(Next::Trailer(trailer)),
                    Ok(_) => Err("bytes follow the trailer".into()),
                    Err(e) => Err(format!("reading the extract: {e}")),
                };
            }
            k => return Err(format!("{what}: a frame of unknown kind {k}")),
        };
        let mut gaps = [0u8];
        self.read_exact(&mut gaps, &what)?;
        let gaps = usize::from(gaps[0]);
        if gaps > GAPS_MAX {
            return Err(format!("{what}: {gaps} gap nodes, more than a tree has"));
        }
        let fixed = 1 + gaps * 32 + 32 + layout.header_len();
        let mut bytes = vec![0u8; fixed];
        bytes[0] = gaps as u8;
        self.read_exact(&mut bytes[1..], &what)?;
        let header = RecordHeader::decode_in(&bytes[fixed - layout.header_len()..], layout)
            .map_err(|e| format!("{what}: header: {e}"))?;
        bytes.resize(fixed + header.body_len as usize, 0);
        self.read_exact(&mut bytes[fixed..], &what)?;
        self.records += 1;
        Ok(Next::Item(RawItem {
            role: Some(role),
            bytes,
        }))
    }

    fn next_line(&mut self) -> Result<Next, String> {
        let current = match self.ahead.take() {
            Some(l) => l,
            None => self
                .line()?
                .ok_or_else(|| too_short("its records: there is no trailer"))?,
        };
        match self.line()? {
            Some(next) => {
                self.ahead = Some(next);
                self.records += 1;
                Ok(Next::Item(RawItem {
                    role: None,
                    bytes: current,
                }))
            }
            None => {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct TrailerLine {
                    trailer: Value,
                }
                let t: TrailerLine = serde_json::from_slice(&current).map_err(|e| {
                    format!("the last line is not a trailer ({{\"trailer\": ...}}): {e}: the extract may be truncated")
                })?;
                Ok(Next::Trailer(t.trailer))
            }
        }
    }
}
