//! Where things are in a spec or preset file: a tree of keys and values with byte spans, built
//! from TOML (through toml's `DeTable`, which keeps spans) or JSON (through a small scanner of
//! our own: serde_json keeps no spans), so that errors found after deserialisation still point
//! at a file, line and column.
//!
//! Lookups go both ways: a dotted field path to the position of its key (semantic errors), and a
//! byte offset to the dotted path around it (serde errors, which carry a position but no path).

use std::collections::HashSet;
use std::fmt;
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One step of a field path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// A field path, displayed as `services.web.command[2]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FieldPath(pub(crate) Vec<Seg>);

impl FieldPath {
    pub(crate) fn new(keys: &[&str]) -> Self {
        FieldPath(keys.iter().map(|k| Seg::Key((*k).to_owned())).collect())
    }

    pub(crate) fn key(mut self, k: &str) -> Self {
        self.0.push(Seg::Key(k.to_owned()));
        self
    }

    pub(crate) fn index(mut self, i: usize) -> Self {
        self.0.push(Seg::Index(i));
        self
    }

    /// Appends a dotted sub-path such as `slicer.average_size` (from a `PolicyError`).
    pub(crate) fn dotted(mut self, sub: &str) -> Self {
        self.0.extend(
            sub.split('.')
                .filter(|s| !s.is_empty())
                .map(|s| Seg::Key(s.to_owned())),
        );
        self
    }

    /// Parses the display form back (`a.b[2].c`). Keys containing dots cannot round-trip; a
    /// lookup then stops at the longest prefix that exists, which is good enough for a line.
    pub(crate) fn parse(s: &str) -> Self {
        let mut segs = Vec::new();
        for part in s.split('.').filter(|p| !p.is_empty()) {
            let (key, mut rest) = match part.find('[') {
                Some(i) => (&part[..i], &part[i..]),
                None => (part, ""),
            };
            if !key.is_empty() {
                segs.push(Seg::Key(key.to_owned()));
            }
            while let Some(r) = rest.strip_prefix('[') {
                let Some(end) = r.find(']') else { break };
                match r[..end].parse() {
                    Ok(i) => segs.push(Seg::Index(i)),
                    Err(_) => segs.push(Seg::Key(r[..end].to_owned())),
                }
                rest = &r[end + 1..];
            }
        }
        FieldPath(segs)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A value in the file and where it is.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) span: Range<usize>,
    pub(crate) kind: Kind,
}

#[derive(Debug, Clone)]
pub(crate) enum Kind {
    Table(Vec<Entry>),
    Array(Vec<Node>),
    Scalar,
}

/// A key of a table, where the key is, and its value.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) key: String,
    pub(crate) key_span: Range<usize>,
    pub(crate) value: Node,
}

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    pub(crate) line: usize,
    pub(crate) column: usize,
}

/// A file's text, its name for messages, and (when it parsed) its tree.
#[derive(Clone)]
pub(crate) struct Source {
    pub(crate) origin: String,
    text: String,
    root: Option<Node>,
}

impl Source {
    pub(crate) fn new(origin: &str, text: &str, root: Option<Node>) -> Self {
        Source {
            origin: origin.to_owned(),
            text: text.to_owned(),
            root,
        }
    }

    /// The line and column (in characters) of a byte offset.
    pub(crate) fn position(&self, offset: usize) -> Position {
        position_in(&self.text, offset)
    }

    /// The byte offset of a 1-based line and a 1-based byte column, as serde_json reports them
    /// (its column is the last byte it consumed; 0 means the line's newline itself).
    pub(crate) fn offset_of(&self, line: usize, column: usize) -> usize {
        let mut start = 0;
        for _ in 1..line {
            match self.text[start..].find('\n') {
                Some(i) => start += i + 1,
                None => break,
            }
        }
        if column == 0 {
            start.saturating_sub(1)
        } else {
            (start + column - 1).min(self.text.len())
        }
    }

    /// The text of a span, when it is one.
    pub(crate) fn text_at(&self, span: Range<usize>) -> Option<&str> {
        self.text.get(span)
    }

    /// TOML only, for keys that are not in the tree (a duplicate): the path of the key ending
    /// at `end`, read from the text: the last `[table]` header above plus the dotted key at the
    /// start of the line. `None` when the line is not a plain `key = value` or header.
    pub(crate) fn dotted_key_at(&self, end: usize) -> Option<FieldPath> {
        let text = self.text.get(..end)?;
        let line_start = text.rfind('\n').map(|i| i + 1).unwrap_or(0);
        let key_text = text[line_start..].trim();
        let plain = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '"' | ' '))
        };
        let split = |s: &str| -> Vec<Seg> {
            s.split('.')
                .map(|k| Seg::Key(k.trim().trim_matches('"').to_owned()))
                .collect()
        };
        if let Some(header) = key_text.strip_prefix('[') {
            let header = header.trim_start_matches('[');
            return plain(header).then(|| FieldPath(split(header)));
        }
        if !plain(key_text) {
            return None;
        }
        // The table this line belongs to: the closest header above it.
        let mut path = Vec::new();
        for line in text[..line_start].lines().rev() {
            let l = line.trim();
            if let Some(h) = l.strip_prefix('[') {
                let h = h.trim_start_matches('[');
                let h = h.split(']').next().unwrap_or("");
                if !plain(h) {
                    return None;
                }
                path = split(h);
                break;
            }
        }
        path.extend(split(key_text));
        Some(FieldPath(path))
    }

    /// Whether the file has exactly this field (not just part of its path).
    pub(crate) fn has(&self, path: &FieldPath) -> bool {
        let Some(mut node) = self.root.as_ref() else {
            return false;
        };
        for seg in &path.0 {
            let next = match (seg, &node.kind) {
                (Seg::Key(k), Kind::Table(entries)) => {
                    entries.iter().find(|e| &e.key == k).map(|e| &e.value)
                }
                (Seg::Index(i), Kind::Array(items)) => items.get(*i),
                _ => None,
            };
            match next {
                Some(n) => node = n,
                None => return false,
            }
        }
        true
    }

    /// Where the field is: the start of its key, or of the deepest part of the path that exists
    /// (a missing key is reported at the table that should hold it). `None` when not even the
    /// first key exists.
    pub(crate) fn locate(&self, path: &FieldPath) -> Option<Position> {
        let root = self.root.as_ref()?;
        let mut node = root;
        let mut found = None;
        for seg in &path.0 {
            let next = match (seg, &node.kind) {
                (Seg::Key(k), Kind::Table(entries)) => entries
                    .iter()
                    .find(|e| &e.key == k)
                    .map(|e| (e.key_span.start, &e.value)),
                (Seg::Index(i), Kind::Array(items)) => items.get(*i).map(|n| (n.span.start, n)),
                _ => None,
            };
            match next {
                Some((at, n)) => {
                    found = Some(at);
                    node = n;
                }
                None => break,
            }
        }
        found.map(|at| self.position(at))
    }

    /// The deepest field whose key or value covers the byte offset (empty when none does).
    pub(crate) fn path_at(&self, offset: usize) -> FieldPath {
        let mut best = Vec::new();
        if let Some(root) = &self.root {
            let mut cur = Vec::new();
            deepest(root, offset, &mut cur, &mut best);
        }
        FieldPath(best)
    }
}

fn deepest(node: &Node, offset: usize, cur: &mut Vec<Seg>, best: &mut Vec<Seg>) {
    // Tables from TOML `[headers]` do not nest their spans inside their parent's, so every
    // child is searched rather than only those whose span covers the offset.
    match &node.kind {
        Kind::Table(entries) => {
            for e in entries {
                cur.push(Seg::Key(e.key.clone()));
                if (e.key_span.contains(&offset) || e.value.span.contains(&offset))
                    && cur.len() > best.len()
                {
                    *best = cur.clone();
                }
                deepest(&e.value, offset, cur, best);
                cur.pop();
            }
        }
        Kind::Array(items) => {
            for (i, n) in items.iter().enumerate() {
                cur.push(Seg::Index(i));
                if n.span.contains(&offset) && cur.len() > best.len() {
                    *best = cur.clone();
                }
                deepest(n, offset, cur, best);
                cur.pop();
            }
        }
        Kind::Scalar => {}
    }
}

pub(crate) fn position_in(text: &str, offset: usize) -> Position {
    let offset = offset.min(text.len());
    // Step back to a char boundary so slicing cannot panic on a span inside a multibyte char.
    let mut at = offset;
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    Position {
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
    }
}

// ---------------------------------------------------------------------------------------------
// TOML
// ---------------------------------------------------------------------------------------------

/// The tree of a TOML document. Recovers what it can from a broken one, so that even a syntax
/// error may get a field path.
pub(crate) fn toml_tree(text: &str) -> Node {
    let (root, _errors) = DeTable::parse_recoverable(text);
    toml_table(root.get_ref(), root.span())
}

fn toml_table(t: &DeTable<'_>, span: Range<usize>) -> Node {
    let entries = t
        .iter()
        .map(|(k, v)| Entry {
            key: k.get_ref().to_string(),
            key_span: k.span(),
            value: toml_node(v),
        })
        .collect();
    Node {
        span,
        kind: Kind::Table(entries),
    }
}

fn toml_node(v: &Spanned<DeValue<'_>>) -> Node {
    match v.get_ref() {
        DeValue::Table(t) => toml_table(t, v.span()),
        DeValue::Array(a) => Node {
            span: v.span(),
            kind: Kind::Array(a.iter().map(toml_node).collect()),
        },
        _ => Node {
            span: v.span(),
            kind: Kind::Scalar,
        },
    }
}

// ---------------------------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------------------------

/// Why the JSON scanner gave up.
#[derive(Debug)]
pub(crate) enum JsonScan {
    /// A key repeated in one object: serde_json keeps the last one silently for maps, so this is
    /// where duplicates are caught.
    Duplicate { path: FieldPath, offset: usize },
    /// Not JSON; serde_json reports these itself, with a position.
    Invalid,
}

/// The tree of a JSON document.
pub(crate) fn json_tree(text: &str) -> Result<Node, JsonScan> {
    let mut s = JsonScanner {
        text,
        b: text.as_bytes(),
        i: 0,
        path: Vec::new(),
        depth: 0,
    };
    let root = s.value()?;
    s.ws();
    if s.i != s.b.len() {
        return Err(JsonScan::Invalid);
    }
    Ok(root)
}

struct JsonScanner<'a> {
    text: &'a str,
    b: &'a [u8],
    i: usize,
    path: Vec<Seg>,
    depth: usize,
}

/// Deeper than this is not a spec; also keeps recursion bounded on hostile input.
const MAX_DEPTH: usize = 128;

impl JsonScanner<'_> {
    fn ws(&mut self) {
        while matches!(self.b.get(self.i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn value(&mut self) -> Result<Node, JsonScan> {
        self.ws();
        let start = self.i;
        match self.b.get(self.i) {
            Some(b'{') => self.nested(|s| s.object(start)),
            Some(b'[') => self.nested(|s| s.array(start)),
            Some(b'"') => {
                let span = self.string()?;
                Ok(Node {
                    span,
                    kind: Kind::Scalar,
                })
            }
            Some(_) => {
                while matches!(self.b.get(self.i), Some(c) if c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'))
                {
                    self.i += 1;
                }
                if self.i == start {
                    return Err(JsonScan::Invalid);
                }
                Ok(Node {
                    span: start..self.i,
                    kind: Kind::Scalar,
                })
            }
            None => Err(JsonScan::Invalid),
        }
    }

    fn nested(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<Node, JsonScan>,
    ) -> Result<Node, JsonScan> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(JsonScan::Invalid);
        }
        let r = f(self);
        self.depth -= 1;
        r
    }

    /// At a `"`: skips the string, returns its span including the quotes.
    fn string(&mut self) -> Result<Range<usize>, JsonScan> {
        let start = self.i;
        self.i += 1;
        loop {
            match self.b.get(self.i) {
                Some(b'\\') => self.i += 2,
                Some(b'"') => {
                    self.i += 1;
                    return Ok(start..self.i);
                }
                Some(_) => self.i += 1,
                None => return Err(JsonScan::Invalid),
            }
        }
    }

    fn object(&mut self, start: usize) -> Result<Node, JsonScan> {
        self.i += 1;
        let mut entries: Vec<Entry> = Vec::new();
        let mut seen = HashSet::new();
        self.ws();
        if self.b.get(self.i) == Some(&b'}') {
            self.i += 1;
            return Ok(Node {
                span: start..self.i,
                kind: Kind::Table(entries),
            });
        }
        loop {
            self.ws();
            if self.b.get(self.i) != Some(&b'"') {
                return Err(JsonScan::Invalid);
            }
            let key_span = self.string()?;
            // serde_json decodes the escapes; the slice is at ASCII quotes, so it is valid UTF-8.
            let key: String = serde_json::from_str(&self.text[key_span.clone()])
                .map_err(|_| JsonScan::Invalid)?;
            if !seen.insert(key.clone()) {
                let mut path = self.path.clone();
                path.push(Seg::Key(key));
                return Err(JsonScan::Duplicate {
                    path: FieldPath(path),
                    offset: key_span.start,
                });
            }
            self.ws();
            if self.b.get(self.i) != Some(&b':') {
                return Err(JsonScan::Invalid);
            }
            self.i += 1;
            self.path.push(Seg::Key(key.clone()));
            let value = self.value()?;
            self.path.pop();
            entries.push(Entry {
                key,
                key_span,
                value,
            });
            self.ws();
            match self.b.get(self.i) {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(Node {
                        span: start..self.i,
                        kind: Kind::Table(entries),
                    });
                }
                _ => return Err(JsonScan::Invalid),
            }
        }
    }

    fn array(&mut self, start: usize) -> Result<Node, JsonScan> {
        self.i += 1;
        let mut items = Vec::new();
        self.ws();
        if self.b.get(self.i) == Some(&b']') {
            self.i += 1;
            return Ok(Node {
                span: start..self.i,
                kind: Kind::Array(items),
            });
        }
        loop {
            self.path.push(Seg::Index(items.len()));
            let v = self.value()?;
            self.path.pop();
            items.push(v);
            self.ws();
            match self.b.get(self.i) {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return Ok(Node {
                        span: start..self.i,
                        kind: Kind::Array(items),
                    });
                }
                _ => return Err(JsonScan::Invalid),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(line: usize, column: usize) -> Option<Position> {
        Some(Position { line, column })
    }

    #[test]
    fn toml_paths_point_at_keys_in_header_tables() {
        let text = "name = \"x\"\n\n[services.web]\ncommand = [\"a\", \"b\"]\n[services.web.egresses.store]\nservice = \"store\"\n";
        let src = Source::new("x.toml", text, Some(toml_tree(text)));
        assert_eq!(src.locate(&FieldPath::new(&["name"])), pos(1, 1));
        assert_eq!(
            src.locate(&FieldPath::new(&["services", "web", "command"])),
            pos(4, 1)
        );
        assert_eq!(
            src.locate(&FieldPath::new(&["services", "web", "command"]).index(1)),
            pos(4, 17)
        );
        assert_eq!(
            src.locate(&FieldPath::new(&[
                "services", "web", "egresses", "store", "service"
            ])),
            pos(6, 1)
        );
        // A missing key falls back to the deepest part that exists.
        assert_eq!(
            src.locate(&FieldPath::new(&[
                "services", "web", "egresses", "store", "ingress"
            ])),
            pos(5, 24)
        );
        let at = text.find("\"store\"").unwrap_or(0);
        assert_eq!(
            src.path_at(at).to_string(),
            "services.web.egresses.store.service"
        );
    }

    #[test]
    fn json_tree_spans_keys_and_catches_duplicates() {
        let text = "{\n  \"name\": \"x\",\n  \"services\": {\"web\": {\"command\": [\"a\", \"b\\\"c\"]}}\n}";
        let root = json_tree(text).expect("valid json");
        let src = Source::new("x.json", text, Some(root));
        assert_eq!(src.locate(&FieldPath::new(&["name"])), pos(2, 3));
        assert_eq!(
            src.locate(&FieldPath::new(&["services", "web", "command"]).index(1)),
            pos(3, 41)
        );
        let dup = json_tree("{\"a\": {\"b\": 1,\n \"b\": 2}}");
        match dup {
            Err(JsonScan::Duplicate { path, offset }) => {
                assert_eq!(path.to_string(), "a.b");
                assert_eq!(offset, 16);
            }
            other => panic!("expected a duplicate, got {other:?}"),
        }
        assert!(matches!(json_tree("{\"a\": }"), Err(JsonScan::Invalid)));
        assert!(matches!(
            json_tree(&"[".repeat(1000)),
            Err(JsonScan::Invalid)
        ));
    }

    #[test]
    fn field_paths_round_trip() {
        for s in ["a", "a.b", "services.web.command[2]", "x[0][1].y"] {
            assert_eq!(FieldPath::parse(s).to_string(), s);
        }
    }

    #[test]
    fn positions_count_characters() {
        assert_eq!(position_in("ab\ncé d", 7), Position { line: 2, column: 4 });
        assert_eq!(position_in("", 10), Position { line: 1, column: 1 });
    }
}
