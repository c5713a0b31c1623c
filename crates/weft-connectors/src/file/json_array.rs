//! JSON arrays: a file holding one array `[ {...}, {...} ]` whose elements
//! are the records, read element by element.
//!
//! A scanner that knows only strings, escapes and brackets finds where each
//! element starts and ends; only that element's bytes are kept and parsed
//! with serde_json. (serde_json's `StreamDeserializer` cannot step over the
//! commas, nor go on after a bad element.) So an element that is not valid
//! JSON but is well delimited (`{"a": tru}`, `{'a': 1}`) becomes a bad
//! record and reading goes on with the next one. Brackets that do not
//! match, text outside the array, or a file that ends inside it leave no
//! way to tell where the next element starts: the check pass, run before
//! any record is emitted, refuses such a file and it goes to quarantine.
//!
//! Positions: the checkpoint's offset is the byte after an element (before
//! its comma); the record ordinal (1-based) is the record id.

use std::io::{BufRead, BufReader};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::read::{
    BUF, FileAt, MAX_CONTAINERS, MAX_RECORD, Parsed, Plan, Pos, ReadError, TOO_DEEP, Unreadable,
    io_error, send,
};

/// Where the scanner stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the opening `[`.
    Start,
    /// After `[` or `,`: an element (or, after `[`, the closing `]`) is next.
    Element { first: bool },
    /// After an element: `,` or `]` is next.
    After,
    /// After the closing `]`.
    End,
}

/// The array's structure is broken; nothing after this point can be read.
#[derive(Debug)]
struct Broken(String);

/// One element: where it starts and (up to `MAX_RECORD`) its bytes.
struct Element {
    offset: u64,
    line: u64,
    too_long: bool,
    /// More than `MAX_CONTAINERS` arrays and objects inside one another.
    too_deep: bool,
}

struct Scanner<R> {
    r: R,
    /// Offset of the next unread byte.
    offset: u64,
    /// Line of the next unread byte, from 1.
    line: u64,
    state: State,
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn shown(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("`{}`", b as char)
    } else {
        format!("byte 0x{b:02x}")
    }
}

impl<R: BufRead> Scanner<R> {
    /// Skip whitespace; the next byte, not consumed, or `None` at the end.
    fn skip_ws(&mut self) -> std::io::Result<Option<u8>> {
        loop {
            let avail = self.r.fill_buf()?;
            if avail.is_empty() {
                return Ok(None);
            }
            let n = avail.iter().take_while(|&&b| is_ws(b)).count();
            let lines = avail[..n].iter().filter(|&&b| b == b'\n').count();
            let next = avail.get(n).copied();
            self.r.consume(n);
            self.offset += n as u64;
            self.line += lines as u64;
            if let Some(b) = next {
                return Ok(Some(b));
            }
        }
    }

    fn bump(&mut self) {
        self.r.consume(1);
        self.offset += 1;
    }

    fn at(&self) -> String {
        format!("line {}, byte {}", self.line, self.offset)
    }

    /// The next element, its bytes appended to `buf` when `keep`; `None`
    /// after the closing `]`.
    fn next(
        &mut self,
        buf: &mut Vec<u8>,
        keep: bool,
    ) -> std::io::Result<Result<Option<Element>, Broken>> {
        loop {
            match self.state {
                State::End => return Ok(Ok(None)),
                State::Start => {
                    // a UTF-8 byte order mark may come first
                    if self.offset == 0 && self.r.fill_buf()?.starts_with(b"\xEF\xBB\xBF") {
                        self.r.consume(3);
                        self.offset = 3;
                    }
                    match self.skip_ws()? {
                        Some(b'[') => {
                            self.bump();
                            self.state = State::Element { first: true };
                        }
                        Some(b) => {
                            return Ok(Err(Broken(format!(
                                "expected a JSON array (`[`) at the top level, found {} at {} \
                                 (for one JSON value per line use `format: jsonl`)",
                                shown(b),
                                self.at()
                            ))));
                        }
                        None => {
                            return Ok(Err(Broken(
                                "the file is empty, expected a JSON array `[...]`".into(),
                            )));
                        }
                    }
                }
                State::After => match self.skip_ws()? {
                    Some(b',') => {
                        self.bump();
                        self.state = State::Element { first: false };
                    }
                    Some(b']') => {
                        self.bump();
                        return match self.skip_ws()? {
                            None => {
                                self.state = State::End;
                                Ok(Ok(None))
                            }
                            Some(b) => Ok(Err(Broken(format!(
                                "data after the closing `]` of the array: {} at {}",
                                shown(b),
                                self.at()
                            )))),
                        };
                    }
                    Some(b) => {
                        return Ok(Err(Broken(format!(
                            "expected `,` or `]` after an element, found {} at {}",
                            shown(b),
                            self.at()
                        ))));
                    }
                    None => {
                        return Ok(Err(Broken(
                            "the file ends inside the array (no closing `]`)".into(),
                        )));
                    }
                },
                State::Element { first } => match self.skip_ws()? {
                    Some(b']') if first => {
                        self.state = State::After;
                    }
                    Some(b']') => {
                        return Ok(Err(Broken(format!(
                            "`,` before `]` (a trailing comma) at {}",
                            self.at()
                        ))));
                    }
                    Some(b',') => {
                        return Ok(Err(Broken(format!(
                            "an empty element (`,` where an element belongs) at {}",
                            self.at()
                        ))));
                    }
                    Some(_) => {
                        let el = match self.element(buf, keep)? {
                            Ok(el) => el,
                            Err(b) => return Ok(Err(b)),
                        };
                        self.state = State::After;
                        return Ok(Ok(Some(el)));
                    }
                    None => {
                        return Ok(Err(Broken(
                            "the file ends inside the array (no closing `]`)".into(),
                        )));
                    }
                },
            }
        }
    }

    /// Scan one element from its first byte to its last.
    fn element(
        &mut self,
        buf: &mut Vec<u8>,
        keep: bool,
    ) -> std::io::Result<Result<Element, Broken>> {
        let start = Element {
            offset: self.offset,
            line: self.line,
            too_long: false,
            too_deep: false,
        };
        let mut el = start;
        // closing brackets expected, innermost last
        let mut stack: Vec<u8> = Vec::new();
        let mut in_string = false;
        let mut escaped = false;
        let mut started = false;
        // a bare scalar (number, true, ...) ends before a delimiter
        let mut bare = false;
        loop {
            let avail = self.r.fill_buf()?;
            if avail.is_empty() && bare {
                // a number or literal ends at the end of the file (then `]` is missing)
                return Ok(Ok(el));
            }
            if avail.is_empty() {
                return Ok(Err(Broken(format!(
                    "the file ends inside the element that starts at line {}, byte {}",
                    el.line, el.offset
                ))));
            }
            let mut i = 0;
            let mut done = false;
            let mut lines = 0u64;
            let mut mismatch = None;
            while i < avail.len() {
                let b = avail[i];
                if !started {
                    started = true;
                    match b {
                        b'{' => stack.push(b'}'),
                        b'[' => stack.push(b']'),
                        b'"' => in_string = true,
                        _ => bare = true,
                    }
                    el.too_deep |= stack.len() > MAX_CONTAINERS;
                    i += 1;
                    continue;
                }
                if bare {
                    if is_ws(b) || matches!(b, b',' | b']' | b'}' | b'[' | b'{' | b'"') {
                        done = true;
                        break;
                    }
                } else if in_string {
                    if escaped {
                        escaped = false;
                    } else if b == b'\\' {
                        escaped = true;
                    } else if b == b'"' {
                        in_string = false;
                        if stack.is_empty() {
                            i += 1;
                            done = true;
                            break;
                        }
                    }
                } else {
                    match b {
                        b'"' => in_string = true,
                        b'{' | b'[' => {
                            stack.push(if b == b'{' { b'}' } else { b']' });
                            el.too_deep |= stack.len() > MAX_CONTAINERS;
                        }
                        b'}' | b']' => {
                            if stack.pop() != Some(b) {
                                mismatch = Some(b);
                                break;
                            }
                            if stack.is_empty() {
                                i += 1;
                                done = true;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                if b == b'\n' {
                    lines += 1;
                }
                i += 1;
            }
            let used = i;
            let len = self.offset + used as u64 - el.offset;
            if keep && !el.too_long {
                if len > MAX_RECORD {
                    el.too_long = true;
                    buf.clear();
                } else {
                    buf.extend_from_slice(&avail[..used]);
                }
            }
            self.r.consume(used);
            self.offset += used as u64;
            self.line += lines;
            if let Some(b) = mismatch {
                return Ok(Err(Broken(format!(
                    "unbalanced brackets: {} at {} in the element that starts at line {}, byte {}",
                    shown(b),
                    self.at(),
                    el.line,
                    el.offset
                ))));
            }
            if done {
                return Ok(Ok(el));
            }
        }
    }
}

/// Check that the file is one well-formed array (its elements' content is
/// checked when they are read).
pub(super) fn check(
    f: FileAt,
    stop: &CancellationToken,
) -> std::io::Result<Result<(), Unreadable>> {
    let mut sc = Scanner {
        r: BufReader::with_capacity(BUF, f),
        offset: 0,
        line: 1,
        state: State::Start,
    };
    let mut buf = Vec::new();
    let mut n = 0u64;
    loop {
        match sc.next(&mut buf, false)? {
            Ok(Some(_)) => {
                n += 1;
                if n.is_multiple_of(10_000) && stop.is_cancelled() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::Interrupted,
                        "stopping",
                    ));
                }
            }
            Ok(None) => return Ok(Ok(())),
            Err(Broken(why)) => {
                return Ok(Err(Unreadable(format!(
                    "malformed JSON array after {n} elements: {why}"
                ))));
            }
        }
    }
}

/// Parse one element's bytes; a serde_json error is told in file lines.
fn parse(bytes: &[u8], first_line: u64) -> Result<serde_json::Value, String> {
    serde_json::from_slice(bytes).map_err(|e| {
        let text = e.to_string();
        let what = match text.rfind(" at line ") {
            Some(i) => &text[..i],
            None => text.as_str(),
        };
        format!(
            "not valid JSON: {what} at line {}, column {}",
            first_line + e.line() as u64 - 1,
            e.column()
        )
    })
}

pub(super) fn read(
    plan: &Plan,
    start: Pos,
    tx: &mpsc::Sender<Result<Parsed, ReadError>>,
) -> Result<(), ReadError> {
    let mut sc = Scanner {
        r: BufReader::with_capacity(BUF, plan.at(start.offset)),
        offset: start.offset,
        line: start.line.max(1),
        state: if start.offset == 0 {
            State::Start
        } else {
            State::After
        },
    };
    let mut pos = start;
    let mut records = Vec::with_capacity(plan.batch_size);
    let mut buf = Vec::with_capacity(4096);
    loop {
        buf.clear();
        let el = match sc.next(&mut buf, true).map_err(|e| io_error(plan, e))? {
            Ok(Some(el)) => el,
            Ok(None) => {
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
            Err(Broken(why)) => {
                return Err(ReadError::Unreadable(format!(
                    "malformed JSON array after element {}: {why}; the elements before it were read",
                    pos.record
                )));
            }
        };
        pos.record += 1;
        pos.offset = sc.offset;
        pos.line = sc.line;
        let location = format!(
            "file {} element {} (line {}, byte {})",
            plan.name, pos.record, el.line, el.offset
        );
        records.push(if el.too_long {
            plan.bad_at(
                pos.record,
                &location,
                &[],
                format!("element longer than {} MiB, not read", MAX_RECORD >> 20),
            )
        } else if el.too_deep {
            plan.bad_at(pos.record, &location, &buf, TOO_DEEP.into())
        } else {
            match parse(&buf, el.line) {
                Ok(v) => plan.good_at(pos.record, &location, v),
                Err(e) => plan.bad_at(pos.record, &location, &buf, e),
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(text: &str) -> (Vec<String>, Option<String>) {
        let mut sc = Scanner {
            // a tiny buffer: elements cross buffer boundaries
            r: BufReader::with_capacity(3, text.as_bytes()),
            offset: 0,
            line: 1,
            state: State::Start,
        };
        let mut out = Vec::new();
        loop {
            let mut buf = Vec::new();
            match sc.next(&mut buf, true).unwrap() {
                Ok(Some(_)) => out.push(String::from_utf8(buf).unwrap()),
                Ok(None) => return (out, None),
                Err(Broken(why)) => return (out, Some(why)),
            }
        }
    }

    #[test]
    fn elements_are_delimited_by_structure() {
        let (els, err) = scan(
            "\u{feff}[ {\"a\": \"x,]}\\\"\"}, [1, [2]],\n 3.5e2, \"s\\\\\", true ,null, {'bad': tru} ]\n",
        );
        assert_eq!(err, None);
        assert_eq!(
            els,
            vec![
                "{\"a\": \"x,]}\\\"\"}",
                "[1, [2]]",
                "3.5e2",
                "\"s\\\\\"",
                "true",
                "null",
                "{'bad': tru}"
            ]
        );
        assert_eq!(scan("[]").0.len(), 0);
        assert_eq!(scan(" [ ] ").1, None);
    }

    #[test]
    fn broken_structure_is_reported() {
        for (text, want) in [
            ("{\"a\":1}", "expected a JSON array"),
            ("", "empty"),
            ("[{\"a\":1]", "unbalanced"),
            ("[1,2", "no closing"),
            ("[1 2]", "expected `,` or `]`"),
            ("[1,]", "trailing comma"),
            ("[1,,2]", "empty element"),
            ("[1] x", "after the closing"),
            ("[{\"a\":\"open}]", "ends inside the element"),
        ] {
            let (_, err) = scan(text);
            let err = err.unwrap_or_default();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn parse_errors_are_told_in_file_lines() {
        let e = parse(b"{\n\"a\": tru}", 10).unwrap_err();
        assert!(e.contains("at line 11"), "{e}");
    }
}
