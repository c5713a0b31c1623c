//! Where each value of the document is written: document path → line and
//! column, so that every problem `validate` finds by path (a `0` where a
//! count is expected, a bad identifier, a key not among the columns) is
//! reported with the file's line and column too, without every raw field
//! being a `Spanned`.
//!
//! The text is parsed a second time into a tree of spans only (cheap: a
//! config is small). A scalar is located at its value; a mapping or a
//! sequence at its key, which is where a reader looks for "the webhook
//! source". Paths are written as `validate` writes them:
//! `systems.crm.source.webhook.max_body_bytes`, `flows.f.to[1]`.

use std::collections::HashMap;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{Location, Spanned};

use super::Issue;

/// Line and column of the values of one document.
#[derive(Debug, Default)]
pub struct Locations(HashMap<String, (u64, u64)>);

impl Locations {
    /// The locations of `text`'s values; empty when it does not parse
    /// (the parse error is reported by the real parse).
    pub fn of(text: &str) -> Self {
        let mut map = HashMap::new();
        if let Ok(root) = serde_saphyr::from_str::<Spanned<Node>>(text) {
            walk(&mut map, String::new(), None, &root);
        }
        Locations(map)
    }

    /// Line and column of `path`, or of its nearest written ancestor.
    pub fn find(&self, path: &str) -> Option<(u64, u64)> {
        let mut p = path;
        loop {
            if let Some(&at) = self.0.get(p) {
                return Some(at);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }

    /// Give `issue` the position of its path when it has none.
    pub fn place(&self, issue: &mut Issue) {
        if issue.line.is_none()
            && let Some((line, column)) = self.find(&issue.path)
        {
            issue.line = Some(line);
            issue.column = Some(column);
        }
    }
}

fn known(l: Location) -> Option<(u64, u64)> {
    (l.line() > 0 && l.column() > 0).then(|| (l.line(), l.column()))
}

fn walk(
    map: &mut HashMap<String, (u64, u64)>,
    path: String,
    key: Option<Location>,
    node: &Spanned<Node>,
) {
    let here = match (&node.value, key) {
        (Node::Leaf, _) | (_, None) => known(node.referenced),
        (_, Some(k)) => known(k).or_else(|| known(node.referenced)),
    };
    match &node.value {
        Node::Map(entries) => {
            for (k, v) in entries {
                let child = if path.is_empty() {
                    k.value.value.clone()
                } else {
                    format!("{path}.{}", k.value.value)
                };
                walk(map, child, Some(k.referenced), v);
            }
        }
        Node::Seq(items) => {
            for (i, v) in items.iter().enumerate() {
                walk(map, format!("{path}[{i}]"), None, v);
            }
        }
        Node::Leaf => {}
    }
    if let Some(at) = here {
        map.entry(path).or_insert(at);
    }
}

/// The shape of a YAML document, every node with its span.
enum Node {
    Map(Vec<(Spanned<Key>, Spanned<Node>)>),
    Seq(Vec<Spanned<Node>>),
    Leaf,
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

macro_rules! leaves {
    ($($f:ident: $t:ty),*) => {
        $(fn $f<E: de::Error>(self, _: $t) -> Result<Node, E> { Ok(Node::Leaf) })*
    };
}

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any YAML value")
    }
    leaves!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_i128: i128, visit_u128: u128,
        visit_f64: f64, visit_str: &str, visit_bytes: &[u8]);
    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_none<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(v) = seq.next_element()? {
            items.push(v);
        }
        Ok(Node::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(k) = m.next_key()? {
            entries.push((k, m.next_value()?));
        }
        Ok(Node::Map(entries))
    }
}

/// A mapping key of any scalar type, as text.
struct Key {
    value: String,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        macro_rules! shown {
            ($($f:ident: $t:ty),*) => {
                $(fn $f<E: de::Error>(self, v: $t) -> Result<Key, E> { Ok(Key { value: v.to_string() }) })*
            };
        }
        impl<'de> Visitor<'de> for V {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a mapping key")
            }
            shown!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64, visit_str: &str);
            fn visit_unit<E: de::Error>(self) -> Result<Key, E> {
                Ok(Key {
                    value: "null".into(),
                })
            }
            fn visit_none<E: de::Error>(self) -> Result<Key, E> {
                self.visit_unit()
            }
            // a complex key: never a path `validate` names
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Key, A::Error> {
                while m.next_entry::<de::IgnoredAny, de::IgnoredAny>()?.is_some() {}
                Ok(Key { value: "?".into() })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Key, A::Error> {
                while s.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(Key { value: "?".into() })
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_of_scalars_containers_and_sequences() {
        let text = "a:\n  b: 1\n  c: [x, {d: yes}]\nflows:\n  f:\n    to:\n      - one\n      - system: two\n";
        let l = Locations::of(text);
        assert_eq!(l.find("a.b"), Some((2, 6)));
        assert_eq!(l.find("a"), Some((1, 1)));
        assert_eq!(l.find("a.c[0]"), Some((3, 7)));
        assert_eq!(l.find("a.c[1].d"), Some((3, 14)));
        assert_eq!(l.find("flows.f.to[0]"), Some((7, 9)));
        assert_eq!(l.find("flows.f.to[1].system"), Some((8, 17)));
        // not written: the nearest ancestor
        assert_eq!(l.find("a.b.nope"), Some((2, 6)));
        assert_eq!(l.find("flows.f.delivery.max_attempts"), Some((5, 3)));
        assert_eq!(l.find("nope"), None);
        assert_eq!(Locations::of("a: [").find("a"), None);
    }
}
