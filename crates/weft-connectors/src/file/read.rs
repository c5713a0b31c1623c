//! Reading one file: the checking and hashing pass, then a reader thread
//! that parses batches of records from a byte offset and feeds them through
//! a bounded channel, so parsing overlaps the ingest of the previous batch.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use weft_core::Event;
use weft_core::config::{FileFormat, TextEncoding};
use weft_core::mapping::Program;

use crate::source::{BadRecord, Record};

/// Everything the reader needs to turn one file into records.
pub(super) struct Plan {
    /// The one descriptor of the file: every pass reads it by position.
    pub file: Arc<File>,
    /// Its length when it was opened (and hashed): nothing after it is read.
    pub len: u64,
    /// The file's name, for locations and ids.
    pub name: String,
    pub format: FileFormat,
    pub delimiter: u8,
    /// Encoding of CSV files.
    pub encoding: TextEncoding,
    /// XML: element names from the root to a record; `*` is any name.
    pub record_path: Arc<[String]>,
    /// Short content hash, the prefix of every record id.
    pub short: String,
    pub correlation_id: String,
    pub source: String,
    pub event_type: String,
    pub id_field: Option<Arc<Program>>,
    pub batch_size: usize,
    /// CSV: lines where records start that the check pass found read
    /// leniently (text after a closing quote): bad records.
    pub suspect: BTreeSet<u64>,
}

/// Where reading stands: the byte offset of the next record, the number
/// of lines before it (CSV, JSON Lines, JSON arrays) and the number of
/// records before it (JSON arrays, XML: their record ids).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Pos {
    pub offset: u64,
    pub line: u64,
    pub record: u64,
}

/// One batch of parsed records and the position after them.
pub(super) struct Parsed {
    pub records: Vec<Record>,
    pub pos: Pos,
    /// Nothing after this batch.
    pub done: bool,
}

/// Why the reader stopped before the end.
#[derive(Debug)]
pub(super) enum ReadError {
    /// An I/O error: try again later.
    Io(String),
    /// The rest of the file cannot be parsed (a CSV record that never ends).
    Unreadable(String),
}

/// Why a file cannot be read at all (it goes to quarantine).
#[derive(Debug)]
pub(super) struct Unreadable(pub String);

pub(super) const BUF: usize = 1 << 20;

/// Size and modification time of the open file (`fstat`): if either
/// changes while the file is read, what was read is not what was hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stamp {
    pub len: u64,
    pub mtime: Option<SystemTime>,
}

impl Stamp {
    pub(super) fn of(f: &File) -> std::io::Result<Stamp> {
        let m = f.metadata()?;
        Ok(Stamp {
            len: m.len(),
            mtime: m.modified().ok(),
        })
    }

    /// `Some(what changed)` when the file is no longer as it was opened.
    pub(super) fn changed(&self, f: &File) -> std::io::Result<Option<String>> {
        let now = Stamp::of(f)?;
        Ok(if now.len != self.len {
            Some(format!(
                "the file changed while it was read (its size went from {} to {} bytes): \
                 it was still being written; raise `settle` or use `ready_marker`",
                self.len, now.len
            ))
        } else if now.mtime != self.mtime {
            Some(
                "the file changed while it was read (it was written to; its size stayed): \
                 it was still being written; raise `settle` or use `ready_marker`"
                    .into(),
            )
        } else {
            None
        })
    }
}

/// Open `path` once for every pass. In a drop folder (`follow: false`) a
/// symbolic link is not followed (`O_NOFOLLOW`: the name could have been
/// swapped for a link after the folder was listed). `O_NONBLOCK` keeps a
/// FIFO from blocking the open; anything but a regular file is refused.
/// `Ok(Err(_))`: not a file weft reads (it goes to quarantine).
pub(super) fn open(
    path: &Path,
    follow: bool,
) -> std::io::Result<Result<(File, Stamp), Unreadable>> {
    let mut o = OpenOptions::new();
    o.read(true);
    let mut flags = libc::O_NONBLOCK;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    o.custom_flags(flags);
    let f = match o.open(path) {
        Ok(f) => f,
        Err(e) if !follow && e.raw_os_error() == Some(libc::ELOOP) => {
            return Ok(Err(Unreadable(
                "the name is a symbolic link; links are not followed in a drop folder".into(),
            )));
        }
        Err(e) => return Err(e),
    };
    if !f.metadata()?.is_file() {
        return Ok(Err(Unreadable("not a regular file".into())));
    }
    let stamp = Stamp::of(&f)?;
    Ok(Ok((f, stamp)))
}

/// A reader over the one open file by positional reads (`pread`): the
/// hash pass, the check pass and every reader attempt share the
/// descriptor but not a file offset (a reader of an abandoned attempt may
/// still be running), and none reads past `len`, the length that was
/// hashed, so what is read is what was hashed.
pub(super) struct FileAt {
    file: Arc<File>,
    pos: u64,
    len: u64,
}

impl FileAt {
    pub(super) fn new(file: Arc<File>, pos: u64, len: u64) -> FileAt {
        FileAt { file, pos, len }
    }
}

impl Read for FileAt {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for FileAt {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let next = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
        };
        match next {
            Some(n) => {
                self.pos = n;
                Ok(n)
            }
            None => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek before the start of the file",
            )),
        }
    }
}

/// An encoding weft does not read, told by a byte order mark (or, for
/// XML without one, by `<?` in UTF-16), by name.
fn foreign_bom(head: &[u8]) -> Option<&'static str> {
    // UTF-32 first: its little-endian mark starts like UTF-16's
    if head.starts_with(&[0xFF, 0xFE, 0, 0]) {
        Some("UTF-32 (little-endian)")
    } else if head.starts_with(&[0, 0, 0xFE, 0xFF]) {
        Some("UTF-32 (big-endian)")
    } else if head.starts_with(&[0xFF, 0xFE]) {
        Some("UTF-16 (little-endian)")
    } else if head.starts_with(&[0xFE, 0xFF]) {
        Some("UTF-16 (big-endian)")
    } else if head.starts_with(&[b'<', 0, b'?', 0]) || head.starts_with(&[b'<', 0, b'<', 0]) {
        Some("UTF-16 (little-endian, without a byte order mark)")
    } else if head.starts_with(&[0, b'<', 0, b'?']) {
        Some("UTF-16 (big-endian, without a byte order mark)")
    } else {
        None
    }
}

/// What the check pass learned of a readable file.
#[derive(Debug, Default)]
pub(super) struct Checked {
    /// SHA-256 of the content, hex.
    pub hash: String,
    /// CSV: the lines where records start that the csv parser would read
    /// leniently (text after a closing quote): bad records.
    pub suspect: BTreeSet<u64>,
}

/// Hash the whole content (streaming, `stamp.len` bytes) and check that it
/// can be read as `format`. `Ok(Err(_))`: the file is unreadable as such;
/// `Err`: I/O, or `Interrupted` when `stop` was cancelled.
pub(super) fn hash_and_check(
    file: &Arc<File>,
    stamp: Stamp,
    format: FileFormat,
    delimiter: u8,
    encoding: TextEncoding,
    stop: &tokio_util::sync::CancellationToken,
) -> std::io::Result<Result<Checked, Unreadable>> {
    let mut f = FileAt::new(file.clone(), 0, stamp.len);
    let mut shape = (format == FileFormat::Csv).then(|| CsvShape::new(delimiter));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BUF];
    let mut first = true;
    let mut total = 0u64;
    loop {
        if stop.is_cancelled() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "stopping",
            ));
        }
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if first {
            first = false;
            let head = &buf[..n.min(64 * 1024)];
            if let Some(enc) = foreign_bom(head) {
                let how = if enc.contains("without") {
                    ""
                } else {
                    " (by its byte order mark)"
                };
                return Ok(Err(Unreadable(format!(
                    "the file is {enc}{how}; weft reads UTF-8 \
                     (and, for CSV, `encoding: latin-1` or `windows-1252`): convert it to UTF-8"
                ))));
            }
            if head.contains(&0) {
                return Ok(Err(Unreadable(
                    "the file is binary (it contains NUL bytes), not text".into(),
                )));
            }
        }
        total += n as u64;
        hasher.update(&buf[..n]);
        if let Some(sh) = &mut shape {
            sh.feed(&buf[..n]);
        }
    }
    if let Some(why) = stamp.changed(file)? {
        return Ok(Err(Unreadable(why)));
    }
    if total != stamp.len {
        return Ok(Err(Unreadable(format!(
            "the file changed while it was read (it was {} bytes when opened, {total} could be read)",
            stamp.len
        ))));
    }
    let at = FileAt::new(file.clone(), 0, stamp.len);
    let suspect = match shape {
        Some(sh) => match csv_header(at, delimiter, encoding).and_then(|_| sh.finish()) {
            Ok(s) => s,
            Err(u) => return Ok(Err(u)),
        },
        None => {
            let checked = match format {
                FileFormat::JsonArray => super::json_array::check(at, stop)?,
                FileFormat::Xml => super::xml::check(at, stop)?,
                FileFormat::Csv | FileFormat::Jsonl => Ok(()),
            };
            if let Err(u) = checked {
                return Ok(Err(u));
            }
            BTreeSet::new()
        }
    };
    Ok(Ok(Checked {
        hash: hex::encode(hasher.finalize()),
        suspect,
    }))
}

/// More records with text after a closing quote than this: the file is
/// not CSV as configured (another delimiter or quote?).
const MAX_SUSPECT: usize = 10_000;

/// The record structure of a CSV file as the csv parser will see it,
/// followed byte by byte in the hash pass (no values are built; the csv
/// parser still reads them). It mirrors csv-core's rules for the settings
/// used here: `"` quotes, `""` inside quotes is a quote, a quote opens a
/// quoted field only at the start of a field, `\r`, `\n` and `\r\n` end a
/// record, empty lines are skipped. It finds, before any record is
/// emitted, what the parser would accept silently:
/// - a quoted field that never closes: the parser ends it at the end of
///   the file, so the rows after the quote would arrive as one field (with
///   the right field count when the quote is in the last column);
/// - a record over 32 MiB: nothing tells where the next one starts;
/// - text after a closing quote (`"a"b`, read as `ab`): a stray quote that
///   pairs with a later one swallows the lines between into one field.
///
/// The first two send the file to quarantine, the last makes a bad record.
struct CsvShape {
    delimiter: u8,
    state: At,
    line: u64,
    offset: u64,
    /// Offset and line where the current record starts; `None` between
    /// records.
    record: Option<(u64, u64)>,
    /// Where the next record starts as the csv parser tells it (its
    /// `Position`): right after the first byte ending the previous record,
    /// empty lines after it included.
    next: (u64, u64),
    /// Records started, the header included.
    records: u64,
    too_long: Option<(u64, u64)>,
    suspect: BTreeSet<u64>,
    /// Offsets and lines where records start (tests compare them with csv's).
    #[cfg(test)]
    starts: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    FieldStart,
    Unquoted,
    Quoted,
    /// A `"` inside quotes: the closing one, or the first of `""`.
    ClosingQuote,
}

impl CsvShape {
    fn new(delimiter: u8) -> CsvShape {
        CsvShape {
            delimiter,
            state: At::FieldStart,
            line: 1,
            offset: 0,
            record: None,
            next: (0, 1),
            records: 0,
            too_long: None,
            suspect: BTreeSet::new(),
            #[cfg(test)]
            starts: Vec::new(),
        }
    }

    /// Follow `buf`: runs of bytes that cannot change the structure are
    /// skipped with memchr (the quote tracking runs at memory speed), the
    /// rest goes through `byte`.
    fn feed(&mut self, buf: &[u8]) {
        let mut i = 0;
        while i < buf.len() {
            let rest = &buf[i..];
            let k = match self.state {
                // inside quotes only a quote matters
                At::Quoted => {
                    let k = memchr::memchr(b'"', rest).unwrap_or(rest.len());
                    self.line += memchr::memchr_iter(b'\n', &rest[..k]).count() as u64;
                    k
                }
                At::ClosingQuote => 0,
                // outside quotes: a quote (opening a field or not) and the
                // ends of records; after a run of other bytes a field starts
                // if the last one was the delimiter
                At::FieldStart | At::Unquoted => {
                    let k = memchr::memchr3(b'"', b'\n', b'\r', rest).unwrap_or(rest.len());
                    if k > 0 {
                        if self.record.is_none() {
                            self.begin();
                        }
                        self.state = if rest[k - 1] == self.delimiter {
                            At::FieldStart
                        } else {
                            At::Unquoted
                        };
                    }
                    k
                }
            };
            self.advance(k as u64);
            i += k;
            if let Some(&b) = buf.get(i) {
                self.byte(b);
                i += 1;
            }
        }
    }

    fn begin(&mut self) {
        self.records += 1;
        #[cfg(test)]
        self.starts.push(self.next);
        self.record = Some(self.next);
        self.state = At::FieldStart;
    }

    fn advance(&mut self, n: u64) {
        self.offset += n;
        if let Some((start, line)) = self.record
            && self.too_long.is_none()
            && self.offset - start > MAX_RECORD
        {
            self.too_long = Some((line, self.records));
        }
    }

    /// One byte, by csv-core's rules.
    fn byte(&mut self, b: u8) {
        if self.record.is_none() {
            if b == b'\r' || b == b'\n' {
                // between records: an empty line
                self.line += u64::from(b == b'\n');
                self.advance(1);
                return;
            }
            self.begin();
        }
        self.state = match (self.state, b) {
            (At::Quoted, b'"') => At::ClosingQuote,
            (At::Quoted, _) => At::Quoted,
            (At::ClosingQuote, b'"') => At::Quoted,
            (At::FieldStart, b'"') => At::Quoted,
            (_, b'\r' | b'\n') => {
                self.record = None;
                self.next = (self.offset + 1, self.line + u64::from(b == b'\n'));
                At::FieldStart
            }
            (_, d) if d == self.delimiter => At::FieldStart,
            (At::ClosingQuote, _) => {
                if let Some((_, line)) = self.record {
                    self.suspect.insert(line);
                }
                At::Unquoted
            }
            _ => At::Unquoted,
        };
        if b == b'\n' {
            self.line += 1;
        }
        self.advance(1);
    }

    fn finish(self) -> Result<BTreeSet<u64>, Unreadable> {
        // rows: records but the header
        if let Some((line, n)) = self.too_long {
            return Err(Unreadable(format!(
                "line {line}: {RECORD_TOO_LONG}; nothing tells where the next record starts, \
                 so no record of the file was read (rows before it: {})",
                n.saturating_sub(2)
            )));
        }
        if let (Some((_, line)), At::Quoted) = (self.record, self.state) {
            return Err(Unreadable(format!(
                "line {line}: a quoted field that starts in this record is never closed \
                 (the file ends inside the quotes), so the lines after it would become one \
                 field; no record of the file was read (rows before it: {})",
                self.records.saturating_sub(2)
            )));
        }
        if self.suspect.len() > MAX_SUSPECT {
            return Err(Unreadable(format!(
                "more than {MAX_SUSPECT} records have text after a closing quote: the file is \
                 not CSV as configured (another `delimiter`?)"
            )));
        }
        Ok(self.suspect)
    }
}

fn csv_reader<R: Read>(r: R, delimiter: u8) -> csv::Reader<R> {
    csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .flexible(true)
        .buffer_capacity(BUF)
        .from_reader(r)
}

/// Text of a CSV field in `encoding`; `Err`: invalid UTF-8 (only UTF-8
/// can be invalid: every byte is a character in the other two).
fn decode(
    encoding: TextEncoding,
    b: &[u8],
) -> Result<std::borrow::Cow<'_, str>, std::str::Utf8Error> {
    match encoding {
        TextEncoding::Utf8 => std::str::from_utf8(b).map(std::borrow::Cow::Borrowed),
        TextEncoding::Latin1 => Ok(encoding_rs::mem::decode_latin1(b)),
        TextEncoding::Windows1252 => Ok(encoding_rs::WINDOWS_1252.decode_without_bom_handling(b).0),
    }
}

const ENCODING_HINT: &str =
    "if the file is Latin-1 or Windows-1252, set `encoding: latin-1` or `encoding: windows-1252`";

/// Read and check the header row.
fn csv_header<R: Read>(
    r: R,
    delimiter: u8,
    encoding: TextEncoding,
) -> Result<(csv::Reader<R>, Vec<String>), Unreadable> {
    let mut rdr = csv_reader(r, delimiter);
    let header = match rdr.byte_headers() {
        Ok(h) => h.clone(),
        Err(e) => return Err(Unreadable(format!("cannot read the CSV header row: {e}"))),
    };
    let mut names: Vec<String> = Vec::with_capacity(header.len());
    for (i, field) in header.iter().enumerate() {
        match decode(encoding, field) {
            Ok(s) => names.push(s.trim().to_owned()),
            Err(e) => {
                return Err(Unreadable(format!(
                    "CSV header row, column {}: not valid UTF-8 ({e}); {ENCODING_HINT}",
                    i + 1
                )));
            }
        }
    }
    if names.is_empty() || (names.len() == 1 && names[0].is_empty()) {
        return Err(Unreadable("no CSV header row (the file is empty)".into()));
    }
    if let Some(i) = names.iter().position(|n| n.is_empty()) {
        return Err(Unreadable(format!(
            "CSV header row: column {} has no name",
            i + 1
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for n in &names {
        if !seen.insert(n.as_str()) {
            return Err(Unreadable(format!(
                "CSV header row: column `{n}` appears twice"
            )));
        }
    }
    if names.iter().all(|n| n.parse::<f64>().is_ok()) {
        return Err(Unreadable(
            "no CSV header row: the first row holds only numbers".into(),
        ));
    }
    Ok((rdr, names))
}

/// Start the reader thread from `start`.
pub(super) fn spawn_reader(
    plan: Arc<Plan>,
    start: Pos,
    tx: mpsc::Sender<Result<Parsed, ReadError>>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("weft-file-reader".into())
        .spawn(move || {
            let res = match plan.format {
                FileFormat::Jsonl => read_jsonl(&plan, start, &tx),
                FileFormat::Csv => read_csv(&plan, start, &tx),
                FileFormat::JsonArray => super::json_array::read(&plan, start, &tx),
                FileFormat::Xml => super::xml::read(&plan, start, &tx),
            };
            if let Err(e) = res {
                let _ = tx.blocking_send(Err(e));
            }
        })
        .map(|_| ())
}

/// The channel is closed: the source stopped listening.
pub(super) struct Stopped;

pub(super) fn send(tx: &mpsc::Sender<Result<Parsed, ReadError>>, p: Parsed) -> Result<(), Stopped> {
    tx.blocking_send(Ok(p)).map_err(|_| Stopped)
}

impl Plan {
    /// A reader of the file from `offset` (buffered by the caller).
    pub(super) fn at(&self, offset: u64) -> FileAt {
        FileAt::new(self.file.clone(), offset, self.len)
    }

    fn location(&self, line: u64) -> String {
        format!("file {} line {line}", self.name)
    }

    fn good(&self, line: u64, data: serde_json::Value) -> Record {
        // the location is written only for a record that turns out bad
        self.good_with(line, || self.location(line), data)
    }

    /// A record numbered `n` (its line, or its ordinal) found at `location`.
    pub(super) fn good_at(&self, n: u64, location: &str, data: serde_json::Value) -> Record {
        self.good_with(n, || location.to_owned(), data)
    }

    fn good_with(&self, n: u64, location: impl Fn() -> String, data: serde_json::Value) -> Record {
        // the default id is the event's only without an `id_field`, or when
        // it fails
        let default_id = || format!("{}:{n}", self.short);
        let mut event = Event::new(
            if self.id_field.is_some() {
                String::new()
            } else {
                default_id()
            },
            self.source.clone(),
            self.event_type.clone(),
            Some(self.correlation_id.clone()),
            data,
        );
        if let Some(prog) = &self.id_field {
            let id = prog
                .eval_with(
                    &event.data,
                    || {
                        // `$event.id` is the default id until this gives one
                        let mut a = event.attributes();
                        a["id"] = default_id().into();
                        a
                    },
                    &[],
                )
                .map_err(|e| e.to_string())
                .and_then(|v| match v {
                    serde_json::Value::String(s) if !s.is_empty() => Ok(s),
                    serde_json::Value::Number(n) => Ok(n.to_string()),
                    other => Err(format!(
                        "id_field `{}` gave {other}, expected a non-empty string or a number",
                        prog.code()
                    )),
                });
            match id {
                Ok(id) => event.id = id,
                Err(e) => {
                    let location = location();
                    return Record::Bad(BadRecord {
                        id: default_id(),
                        raw: truncate(event.data.to_string()),
                        error: format!("{location}: {e}"),
                        location,
                        correlation_id: event.correlationid,
                    });
                }
            }
        }
        Record::Good(event)
    }

    fn bad(&self, line: u64, raw: &[u8], error: String) -> Record {
        self.bad_at(line, &self.location(line), raw, error)
    }

    /// A record numbered `n` found at `location` that cannot be read.
    pub(super) fn bad_at(&self, n: u64, location: &str, raw: &[u8], error: String) -> Record {
        Record::Bad(BadRecord {
            id: format!("{}:{n}", self.short),
            location: location.to_owned(),
            raw: truncate(String::from_utf8_lossy(raw).into_owned()),
            error: format!("{location}: {error}"),
            correlation_id: self.correlation_id.clone(),
        })
    }
}

/// Keep DLQ entries bounded: at most 64 KiB of raw text.
fn truncate(mut s: String) -> String {
    const MAX: usize = 64 * 1024;
    if s.len() > MAX {
        let mut cut = MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

fn read_jsonl(
    plan: &Plan,
    start: Pos,
    tx: &mpsc::Sender<Result<Parsed, ReadError>>,
) -> Result<(), ReadError> {
    let mut rdr = BufReader::with_capacity(BUF, plan.at(start.offset));
    let mut pos = start;
    let mut line = Vec::with_capacity(4096);
    let mut records = Vec::with_capacity(plan.batch_size);
    loop {
        line.clear();
        let (n, complete) =
            read_line(&mut rdr, &mut line, MAX_LINE).map_err(|e| io_error(plan, e))?;
        if n == 0 {
            let _ = send(
                tx,
                Parsed {
                    records,
                    pos,
                    done: true,
                },
            );
            return Ok(());
        }
        let first = pos.offset == 0;
        pos.offset += n as u64;
        pos.line += 1;
        let mut text = trim_ascii(&line);
        if first {
            // a UTF-8 byte order mark, as the other formats accept it
            text = text.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(text);
        }
        if !complete {
            records.push(plan.bad(
                pos.line,
                text,
                format!("line longer than {} MiB, not read", MAX_LINE >> 20),
            ));
        } else if json_too_deep(text) {
            records.push(plan.bad(pos.line, text, TOO_DEEP.into()));
        } else if !text.is_empty() {
            records.push(match serde_json::from_slice::<serde_json::Value>(text) {
                Ok(v) => plan.good(pos.line, v),
                Err(e) => plan.bad(pos.line, text, e.to_string()),
            });
        }
        if records.len() >= plan.batch_size {
            let done = rdr.fill_buf().map_err(|e| io_error(plan, e))?.is_empty();
            let full = std::mem::replace(&mut records, Vec::with_capacity(plan.batch_size));
            if send(
                tx,
                Parsed {
                    records: full,
                    pos,
                    done,
                },
            )
            .is_err()
                || done
            {
                return Ok(());
            }
        }
    }
}

/// Longest JSON line read; the rest of a longer line is skipped.
const MAX_LINE: usize = 32 << 20;

/// Read one line (with its `\n`) into `buf`, keeping at most `max` bytes.
/// Returns the bytes consumed from the file and whether the whole line fit.
fn read_line<R: BufRead>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<(usize, bool)> {
    let n = Read::by_ref(r).take(max as u64).read_until(b'\n', buf)?;
    if n < max || buf.last() == Some(&b'\n') {
        return Ok((n, true));
    }
    // too long: skip the rest of the line
    let mut consumed = n;
    loop {
        let (used, found) = {
            let avail = match r.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if avail.is_empty() {
                return Ok((consumed, false));
            }
            match avail.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (avail.len(), false),
            }
        };
        r.consume(used);
        consumed += used;
        if found {
            return Ok((consumed, false));
        }
    }
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    b.trim_ascii()
}

pub(super) fn io_error(plan: &Plan, e: impl std::fmt::Display) -> ReadError {
    ReadError::Io(format!("reading {}: {e}", plan.name))
}

/// Deepest nesting of a record: a value inside 127 nested arrays or
/// objects is at level 128. serde_json refuses deeper text (its recursion
/// limit), and a record's JSON is parsed again downstream (store, mapping),
/// so a deeper record is refused here, whole, as a bad record with this
/// reason, rather than crash the process (a deep tree overflows the stack
/// when dropped) or turn into an error or `null` later.
pub(super) const MAX_DEPTH: usize = 128;
/// Arrays and objects allowed inside one another.
pub(super) const MAX_CONTAINERS: usize = MAX_DEPTH - 1;
pub(super) const TOO_DEEP: &str = "nested deeper than 128 levels (the limit), not read";

/// Whether JSON text nests more than `MAX_CONTAINERS` arrays and objects
/// (brackets inside strings do not count). Bytes only, no tree is built.
pub(super) fn json_too_deep(text: &[u8]) -> bool {
    // fewer brackets than the limit, the usual case: a count the compiler
    // vectorizes, not the scan
    if text.iter().filter(|&&b| b == b'[' || b == b'{').count() <= MAX_CONTAINERS {
        return false;
    }
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in text {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_CONTAINERS {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Longest CSV record, JSON array element or XML record read (an unclosed
/// quote would otherwise swallow the rest of the file).
pub(super) const MAX_RECORD: u64 = 32 << 20;
const RECORD_TOO_LONG: &str = "a CSV record longer than 32 MiB (an unclosed quote?)";

/// A reader that refuses to go on once `max` bytes were read since the
/// last `reset` (called after each record).
struct Capped<R> {
    inner: R,
    since: std::cell::Cell<u64>,
    max: u64,
}

impl<R> Capped<R> {
    fn reset(&self) {
        self.since.set(0);
    }
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.since.get() > self.max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                RECORD_TOO_LONG,
            ));
        }
        let n = self.inner.read(buf)?;
        self.since.set(self.since.get() + n as u64);
        Ok(n)
    }
}

impl<R: Seek> Seek for Capped<R> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.reset();
        self.inner.seek(pos)
    }
}

fn read_csv(
    plan: &Plan,
    start: Pos,
    tx: &mpsc::Sender<Result<Parsed, ReadError>>,
) -> Result<(), ReadError> {
    let capped = Capped {
        inner: plan.at(0),
        since: std::cell::Cell::new(0),
        // the check pass measured every record exactly; this cap, counted
        // in buffer reads, is only a guard, loose enough never to refuse
        // what the check accepted
        max: MAX_RECORD + 2 * BUF as u64,
    };
    let (mut rdr, names) = csv_header(capped, plan.delimiter, plan.encoding)
        .map_err(|e| ReadError::Unreadable(e.0))?;
    let after_header = rdr.position().clone();
    if start.offset > after_header.byte() {
        let mut p = csv::Position::new();
        p.set_byte(start.offset).set_line(start.line + 1);
        rdr.seek(p).map_err(|e| io_error(plan, e))?;
    }
    let mut pos = Pos {
        offset: rdr.position().byte(),
        line: rdr.position().line().saturating_sub(1),
        record: 0,
    };
    let mut rec = csv::ByteRecord::new();
    let mut records = Vec::with_capacity(plan.batch_size);
    loop {
        rdr.get_ref().reset();
        let more = match rdr.read_byte_record(&mut rec) {
            Ok(more) => more,
            Err(e) => match e.kind() {
                csv::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => {
                    // the check pass refuses such a file; should it appear
                    // anyway, the rows parsed before it still go out first
                    let line = e.position().map_or(pos.line + 1, |p| p.line());
                    let _ = send(
                        tx,
                        Parsed {
                            records: std::mem::take(&mut records),
                            pos,
                            done: false,
                        },
                    );
                    return Err(ReadError::Unreadable(format!(
                        "line {line}: {RECORD_TOO_LONG}; the records before it were read"
                    )));
                }
                csv::ErrorKind::Io(_) => return Err(io_error(plan, e)),
                _ => {
                    // a row the parser refuses: a bad record, then go on
                    let line = e.position().map_or(pos.line + 1, |p| p.line());
                    records.push(plan.bad(line, &[], e.to_string()));
                    continue;
                }
            },
        };
        if !more {
            let _ = send(
                tx,
                Parsed {
                    records,
                    pos,
                    done: true,
                },
            );
            return Ok(());
        }
        let line = rec.position().map_or(pos.line + 1, |p| p.line());
        // the next record starts here; lines before it are consumed
        pos.offset = rdr.position().byte();
        pos.line = rdr.position().line().saturating_sub(1);
        if plan.suspect.contains(&line) {
            records.push(plan.bad(line, &csv_raw(plan, &rec), SUSPECT.into()));
        } else {
            records.push(csv_row(plan, &names, &rec, line));
        }
        if records.len() >= plan.batch_size {
            let done = rdr.is_done();
            let full = std::mem::replace(&mut records, Vec::with_capacity(plan.batch_size));
            if send(
                tx,
                Parsed {
                    records: full,
                    pos,
                    done,
                },
            )
            .is_err()
                || done
            {
                return Ok(());
            }
        }
    }
}

const SUSPECT: &str = "text after the closing quote of a quoted field (`\"a\"b`); if a quote in \
     this record was never meant to close, it swallowed the lines up to the next quote: not read";

/// The fields of a record joined by the delimiter, for the DLQ entry.
fn csv_raw(plan: &Plan, rec: &csv::ByteRecord) -> Vec<u8> {
    let fields: Vec<&[u8]> = rec.iter().collect();
    fields.join(&plan.delimiter)
}

fn csv_row(plan: &Plan, names: &[String], rec: &csv::ByteRecord, line: u64) -> Record {
    let raw = || csv_raw(plan, rec);
    if rec.len() != names.len() {
        return plan.bad(
            line,
            &raw(),
            format!(
                "expected {} fields (as in the header), found {}",
                names.len(),
                rec.len()
            ),
        );
    }
    let mut obj = serde_json::Map::with_capacity(names.len());
    for (i, (name, field)) in names.iter().zip(rec.iter()).enumerate() {
        match decode(plan.encoding, field) {
            Ok(s) => {
                obj.insert(name.clone(), serde_json::Value::String(s.into_owned()));
            }
            Err(e) => {
                return plan.bad(
                    line,
                    &raw(),
                    format!(
                        "field {} (`{name}`) is not valid UTF-8 ({e}); {ENCODING_HINT}",
                        i + 1
                    ),
                );
            }
        }
    }
    plan.good(line, serde_json::Value::Object(obj))
}

#[cfg(test)]
mod tests {
    use super::{Capped, CsvShape, read_line};

    /// The quote tracker agrees with the csv parser on where every record
    /// starts, over random text made of the characters that matter.
    #[test]
    fn csv_shape_finds_the_records_the_csv_parser_finds() {
        let alphabet = b"a,\"\n\r;";
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 40) as usize;
            let mut text = Vec::with_capacity(len);
            let mut x = seed;
            for _ in 0..len {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                text.push(alphabet[(x >> 33) as usize % alphabet.len()]);
            }
            // fed in pieces: the state crosses the ends of buffers
            let mut sh = CsvShape::new(b',');
            let mut rest = &text[..];
            while !rest.is_empty() {
                let n = ((x >> 7) as usize % 5 + 1).min(rest.len());
                x = x.rotate_left(5);
                sh.feed(&rest[..n]);
                rest = &rest[n..];
            }
            let mut whole = CsvShape::new(b',');
            whole.feed(&text);
            assert_eq!(
                (&sh.starts, sh.line, &sh.suspect, sh.state),
                (&whole.starts, whole.line, &whole.suspect, whole.state)
            );
            let mut rdr = csv::ReaderBuilder::new()
                .has_headers(false)
                .flexible(true)
                .from_reader(&text[..]);
            let mut rec = csv::ByteRecord::new();
            let mut starts = Vec::new();
            while rdr.read_byte_record(&mut rec).unwrap() {
                let p = rec.position().unwrap();
                starts.push((p.byte(), p.line()));
            }
            assert_eq!(sh.starts, starts, "{:?}", String::from_utf8_lossy(&text));
        }
    }

    #[test]
    fn csv_shape_flags_text_after_a_closing_quote_and_unclosed_quotes() {
        let mut sh = CsvShape::new(b',');
        sh.feed(b"a,b\n1,\"x\"\"y\"\n2,\"p\"q\n3,\"m\nn\"\n4,\"open\n5,x\n");
        let e = sh.finish().unwrap_err().0;
        assert!(e.starts_with("line 6: a quoted field"), "{e}");
        let mut sh = CsvShape::new(b',');
        sh.feed(b"a,b\n1,\"x\"\"y\"\n2,\"p\"q\n3,\"m\nn\"\n");
        assert_eq!(sh.finish().unwrap(), [3].into());
    }

    #[test]
    fn csv_record_that_never_ends_is_refused() {
        let mut data = b"a,b\n1,2\n3,\"unclosed\n".to_vec();
        data.extend(std::iter::repeat_n(b'x', 10_000));
        /// Hands out 64 bytes a read, like a file much larger than the buffer.
        struct Chunky(std::io::Cursor<Vec<u8>>);
        impl std::io::Read for Chunky {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = buf.len().min(64);
                self.0.read(&mut buf[..n])
            }
        }
        let capped = Capped {
            inner: Chunky(std::io::Cursor::new(data)),
            since: std::cell::Cell::new(0),
            max: 100,
        };
        let (mut rdr, names) =
            super::csv_header(capped, b',', weft_core::config::TextEncoding::Utf8).unwrap();
        assert_eq!(names, vec!["a", "b"]);
        let mut rec = csv::ByteRecord::new();
        rdr.get_ref().reset();
        assert!(rdr.read_byte_record(&mut rec).unwrap());
        rdr.get_ref().reset();
        let err = rdr.read_byte_record(&mut rec).unwrap_err();
        match err.kind() {
            csv::ErrorKind::Io(e) => assert_eq!(e.kind(), std::io::ErrorKind::InvalidData),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn read_line_caps_long_lines_and_counts_every_byte() {
        let data = b"short\nthis line is far too long\nend";
        let mut r = std::io::BufReader::with_capacity(4, &data[..]);
        let mut buf = Vec::new();
        assert_eq!(read_line(&mut r, &mut buf, 10).unwrap(), (6, true));
        assert_eq!(buf, b"short\n");
        buf.clear();
        assert_eq!(read_line(&mut r, &mut buf, 10).unwrap(), (26, false));
        assert_eq!(buf, b"this line ");
        buf.clear();
        assert_eq!(read_line(&mut r, &mut buf, 10).unwrap(), (3, true));
        assert_eq!(buf, b"end");
        buf.clear();
        assert_eq!(read_line(&mut r, &mut buf, 10).unwrap(), (0, true));
    }
}
