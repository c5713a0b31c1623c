//! XML: the elements at `record_path` (`/orders/order`) are the records,
//! streamed with quick-xml; the document is never held in memory.
//!
//! Each record element becomes a JSON value: attributes as `@name` keys,
//! child elements as keys (a name seen more than once becomes an array, in
//! document order), and text as `#text` beside attributes or children, or
//! as the element's value itself when it holds only text (an empty element
//! is `""`). Attribute values and text arrive with entities and character
//! references resolved, CDATA as text. Names are written as in the
//! document (with their prefix, if any). Comments and processing
//! instructions are skipped.
//!
//! A check pass, before any record is emitted, refuses a file that is not
//! well-formed (mismatched or unclosed tags, bad attributes, text outside
//! the root, invalid UTF-8) with the reason and the byte position; it goes
//! to quarantine. Files must be UTF-8 (or ASCII): an XML declaration naming
//! another encoding is refused with a clear reason. A record that is well
//! formed but cannot be turned into a value (an entity defined in a DTD,
//! which is never loaded) becomes a bad record, and reading goes on.
//!
//! Positions: the checkpoint's offset is the byte after a record element;
//! on resume the reader starts there with the record's parent elements as
//! the open ones. The record ordinal (1-based) is the record id.

use std::collections::BTreeMap;
use std::io::BufReader;
use std::os::unix::fs::FileExt;

use quick_xml::XmlVersion;
use quick_xml::events::{BytesStart, Event};
use quick_xml::reader::Reader;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::read::{
    BUF, FileAt, MAX_CONTAINERS, MAX_DEPTH, MAX_RECORD, Parsed, Plan, Pos, ReadError, TOO_DEEP,
    Unreadable, io_error, send,
};

/// Whether the open elements `stack` are at `path` (`*` matches any name;
/// a name without a prefix matches the local name).
fn matches(path: &[String], stack: &[String]) -> bool {
    path.len() == stack.len()
        && path.iter().zip(stack).all(|(p, s)| {
            p == "*"
                || p == s
                || (!p.contains(':') && s.rsplit_once(':').is_some_and(|(_, local)| local == p))
        })
}

fn name_of(e: &BytesStart<'_>) -> String {
    e.name().as_ref().to_owned()
}

/// Check that the file is well-formed XML in UTF-8.
pub(super) fn check(
    f: FileAt,
    stop: &CancellationToken,
) -> std::io::Result<Result<(), Unreadable>> {
    let mut reader = Reader::from_reader(BufReader::with_capacity(BUF, f));
    let mut buf = Vec::new();
    let mut depth = 0usize;
    let mut root = false;
    let mut events = 0u64;
    loop {
        events += 1;
        if events.is_multiple_of(100_000) && stop.is_cancelled() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "stopping",
            ));
        }
        let before = reader.buffer_position();
        let ev = match reader.read_event_into(&mut buf) {
            Ok(ev) => ev,
            Err(quick_xml::Error::Io(e)) => {
                return Err(std::io::Error::new(e.kind(), e.to_string()));
            }
            Err(e) => {
                return Ok(Err(Unreadable(format!(
                    "malformed XML at byte {}: {e}",
                    reader.error_position()
                ))));
            }
        };
        let empty = matches!(ev, Event::Empty(_));
        match ev {
            Event::Decl(d) => {
                if let Some(Ok(enc)) = d.encoding() {
                    let e = enc.to_ascii_lowercase();
                    if !matches!(e.as_str(), "utf-8" | "utf8" | "us-ascii" | "ascii") {
                        return Ok(Err(Unreadable(format!(
                            "the XML declaration names encoding `{enc}`; XML files are read as \
                             UTF-8 only: convert the file to UTF-8"
                        ))));
                    }
                }
            }
            Event::Start(e) | Event::Empty(e) => {
                if depth == 0 && root {
                    return Ok(Err(Unreadable(format!(
                        "a second root element `<{}>` at byte {before}",
                        name_of(&e)
                    ))));
                }
                for a in e.attributes() {
                    if let Err(err) = a {
                        return Ok(Err(Unreadable(format!(
                            "malformed XML at byte {before}: bad attribute in `<{}>`: {err}",
                            name_of(&e)
                        ))));
                    }
                }
                root = true;
                if !empty {
                    depth += 1;
                }
            }
            Event::End(_) => depth = depth.saturating_sub(1),
            Event::Text(t) if depth == 0 && !t.xml10_content().trim().is_empty() => {
                return Ok(Err(Unreadable(format!(
                    "text outside the root element at byte {before}"
                ))));
            }
            Event::CData(_) | Event::GeneralRef(_) if depth == 0 => {
                return Ok(Err(Unreadable(format!(
                    "text outside the root element at byte {before}"
                ))));
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    if depth > 0 {
        return Ok(Err(Unreadable(format!(
            "malformed XML: the file ends with {depth} element(s) still open"
        ))));
    }
    if !root {
        return Ok(Err(Unreadable(
            "no root element (the file holds no XML element)".into(),
        )));
    }
    Ok(Ok(()))
}

/// One element of a record being built.
#[derive(Default)]
struct Frame {
    name: String,
    attrs: Vec<(String, String)>,
    children: BTreeMap<String, Vec<Value>>,
    text: String,
}

impl Frame {
    fn open(e: &BytesStart<'_>) -> Result<Frame, String> {
        let mut attrs = Vec::new();
        for a in e.attributes() {
            let a = a.map_err(|err| format!("bad attribute: {err}"))?;
            let v = a
                .normalized_value(XmlVersion::Implicit1_0)
                .map_err(|err| format!("attribute `{}`: {err}", a.key.as_ref()))?;
            attrs.push((a.key.as_ref().to_owned(), v.into_owned()));
        }
        Ok(Frame {
            name: name_of(e),
            attrs,
            ..Frame::default()
        })
    }

    fn into_value(self) -> Value {
        if self.attrs.is_empty() && self.children.is_empty() {
            return Value::String(self.text);
        }
        let mut m = Map::new();
        for (k, v) in self.attrs {
            m.insert(format!("@{k}"), Value::String(v));
        }
        for (k, mut vs) in self.children {
            let v = if vs.len() == 1 {
                vs.pop().unwrap_or(Value::Null)
            } else {
                Value::Array(vs)
            };
            m.insert(k, v);
        }
        let t = self.text.trim();
        if !t.is_empty() {
            m.insert("#text".into(), Value::String(t.to_owned()));
        }
        Value::Object(m)
    }
}

/// The record being read.
struct Capture {
    /// Open elements of the record, the record element first.
    frames: Vec<Frame>,
    /// Offset of its start tag.
    offset: u64,
    /// Why it cannot become a value (it is still read to its end).
    bad: Option<String>,
    /// Most elements open at once inside it.
    deepest: usize,
}

impl Capture {
    fn fail(&mut self, why: String) {
        if self.bad.is_none() {
            self.bad = Some(why);
        }
        self.frames.clear();
    }
    fn text(&mut self, s: &str) {
        if let Some(f) = self.frames.last_mut() {
            f.text.push_str(s);
        }
    }
}

/// At most 64 KiB of the record's XML, for the DLQ entry.
fn raw_snippet(plan: &Plan, from: u64, to: u64) -> Vec<u8> {
    let len = to.saturating_sub(from).min(64 * 1024);
    let mut out = vec![0u8; len as usize];
    if plan.file.read_exact_at(&mut out, from).is_err() {
        out.clear();
    }
    out
}

pub(super) fn read(
    plan: &Plan,
    start: Pos,
    tx: &mpsc::Sender<Result<Parsed, ReadError>>,
) -> Result<(), ReadError> {
    let path: &[String] = &plan.record_path;
    let mut reader = Reader::from_reader(BufReader::with_capacity(BUF, plan.at(start.offset)));
    // the open elements; on resume, the record's parents (closed later
    // without the reader having seen them open)
    let mut stack: Vec<String> = Vec::new();
    if start.offset > 0 {
        reader.config_mut().allow_unmatched_ends = true;
        stack.extend(path.iter().take(path.len().saturating_sub(1)).cloned());
    }
    let base = start.offset;
    let mut pos = start;
    let mut records = Vec::with_capacity(plan.batch_size);
    let mut buf = Vec::new();
    let mut cap: Option<Capture> = None;
    loop {
        buf.clear();
        let before = base + reader.buffer_position();
        let ev = match reader.read_event_into(&mut buf) {
            Ok(ev) => ev,
            Err(quick_xml::Error::Io(e)) => return Err(io_error(plan, e)),
            Err(e) => {
                return Err(ReadError::Unreadable(format!(
                    "malformed XML at byte {}: {e}; the records before it were read",
                    base + reader.error_position()
                )));
            }
        };
        let mut finished: Option<Result<Value, String>> = None;
        let empty = matches!(ev, Event::Empty(_));
        match ev {
            Event::Start(e) | Event::Empty(e) => {
                stack.push(name_of(&e));
                match &mut cap {
                    // each element is an object or a string: more elements
                    // inside one another than levels can never fit
                    Some(c) if c.bad.is_none() && c.frames.len() >= MAX_DEPTH => {
                        c.fail(TOO_DEEP.into());
                    }
                    Some(c) if c.bad.is_none() => match Frame::open(&e) {
                        Ok(fr) => {
                            c.frames.push(fr);
                            c.deepest = c.deepest.max(c.frames.len());
                        }
                        Err(why) => c.fail(format!("in `<{}>`: {why}", name_of(&e))),
                    },
                    Some(_) => {}
                    None if matches(path, &stack) => {
                        let mut c = Capture {
                            frames: Vec::new(),
                            offset: before,
                            bad: None,
                            deepest: 1,
                        };
                        match Frame::open(&e) {
                            Ok(fr) => c.frames.push(fr),
                            Err(why) => c.fail(format!("in `<{}>`: {why}", name_of(&e))),
                        }
                        cap = Some(c);
                    }
                    None => {}
                }
                if empty {
                    stack.pop();
                    finished = close(&mut cap, &stack, path);
                }
            }
            Event::End(_) => {
                stack.pop();
                finished = close(&mut cap, &stack, path);
            }
            Event::Text(t) => {
                if let Some(c) = cap.as_mut().filter(|c| c.bad.is_none()) {
                    c.text(&t.xml10_content());
                }
            }
            Event::CData(t) => {
                if let Some(c) = cap.as_mut().filter(|c| c.bad.is_none()) {
                    c.text(&t.xml10_content());
                }
            }
            Event::GeneralRef(r) => {
                if let Some(c) = cap.as_mut().filter(|c| c.bad.is_none()) {
                    match r.resolve_char_ref() {
                        Ok(Some(ch)) => c.text(ch.encode_utf8(&mut [0u8; 4])),
                        Ok(None) => match quick_xml::escape::resolve_predefined_entity(&r) {
                            Some(s) => c.text(s),
                            None => c.fail(format!(
                                "unknown entity `&{};` (entities of a DTD are not loaded)",
                                &*r
                            )),
                        },
                        Err(e) => c.fail(format!("bad character reference `&{};`: {e}", &*r)),
                    }
                }
            }
            Event::Eof => {
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
            _ => {}
        }
        if let Some(c) = &mut cap
            && c.bad.is_none()
            && base + reader.buffer_position() - c.offset > MAX_RECORD
        {
            c.fail(format!(
                "record longer than {} MiB, not read",
                MAX_RECORD >> 20
            ));
        }
        let Some(result) = finished else { continue };
        let Some(c) = cap.take() else { continue };
        let end = base + reader.buffer_position();
        pos.record += 1;
        pos.offset = end;
        let location = format!(
            "file {} record {} (byte {})",
            plan.name, pos.record, c.offset
        );
        // repeated children add an array level: measure what may be too deep
        let result = match result {
            Ok(v) if c.deepest * 2 > MAX_CONTAINERS && containers(&v) > MAX_CONTAINERS => {
                Err(TOO_DEEP.to_owned())
            }
            other => other,
        };
        records.push(match result {
            Ok(v) => plan.good_at(pos.record, &location, v),
            Err(why) => plan.bad_at(
                pos.record,
                &location,
                &raw_snippet(plan, c.offset, end),
                why,
            ),
        });
        if records.len() >= plan.batch_size {
            let full = std::mem::replace(&mut records, Vec::with_capacity(plan.batch_size));
            if send(
                tx,
                Parsed {
                    records: full,
                    pos,
                    done: false,
                },
            )
            .is_err()
            {
                return Ok(());
            }
        }
    }
}

/// Arrays and objects inside one another in `v` (a value built here, at
/// most twice `MAX_DEPTH` deep, so the recursion is bounded).
fn containers(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(containers).max().unwrap_or(0),
        Value::Object(m) => 1 + m.values().map(containers).max().unwrap_or(0),
        _ => 0,
    }
}

/// An element of the record closed (`stack` no longer holds it): attach it
/// to its parent, or, when it was the record element, the record's value.
fn close(
    cap: &mut Option<Capture>,
    stack: &[String],
    path: &[String],
) -> Option<Result<Value, String>> {
    let c = cap.as_mut()?;
    // the record element closes when the stack is back at its parent
    let record_done = stack.len() + 1 == path.len();
    if let Some(why) = &c.bad {
        return record_done.then(|| Err(why.clone()));
    }
    let f = c.frames.pop()?;
    let name = f.name.clone();
    let v = f.into_value();
    match c.frames.last_mut() {
        Some(parent) => {
            parent.children.entry(name).or_default().push(v);
            None
        }
        None => Some(Ok(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<String> {
        s.trim_start_matches('/')
            .split('/')
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn path_matching() {
        assert!(matches(&p("/orders/order"), &p("/orders/order")));
        assert!(matches(&p("/*/order"), &p("/shop/order")));
        assert!(matches(&p("/orders/order"), &p("/ns:orders/ns:order")));
        assert!(!matches(&p("/orders/x:order"), &p("/orders/order")));
        assert!(!matches(&p("/orders/order"), &p("/orders/order/line")));
    }

    #[test]
    fn frames_become_values() {
        let mut f = Frame {
            name: "order".into(),
            attrs: vec![("id".into(), "7".into())],
            ..Frame::default()
        };
        f.children
            .insert("line".into(), vec![Value::from("a"), Value::from("b")]);
        f.children.insert("note".into(), vec![Value::from("")]);
        f.text = "\n  mixed \n".into();
        assert_eq!(
            f.into_value(),
            serde_json::json!({"@id": "7", "line": ["a", "b"], "note": "", "#text": "mixed"})
        );
        let leaf = Frame {
            text: " Ada ".into(),
            ..Frame::default()
        };
        assert_eq!(leaf.into_value(), Value::from(" Ada "));
    }
}
