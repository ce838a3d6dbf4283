//! YAML with positions: parses `routes.yaml` into a tree that remembers where every key and
//! value stood, interpolates `${VAR}` / `${VAR:-default}` in scalars, refuses duplicate keys,
//! and turns the tree into a `serde_json::Value` for typed deserialisation. Positions are kept
//! in an index by key path, so any later error (serde's or the semantic pass's) can name
//! `file:line:column`. Nothing outside `config/` reads YAML.

use std::collections::{HashMap, HashSet};

use serde_json::Value;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

impl From<Marker> for Pos {
    fn from(m: Marker) -> Self {
        // yaml-rust2 lines are 1-based, columns 0-based.
        Pos {
            line: m.line(),
            col: m.col() + 1,
        }
    }
}

/// One step of a key path: a mapping key or a sequence index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Seg {
    Key(String),
    Index(usize),
}

pub type Path = Vec<Seg>;

pub fn path_string(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => {
                out.push('[');
                out.push_str(&i.to_string());
                out.push(']');
            }
        }
    }
    out
}

#[derive(Debug, Clone)]
enum Kind {
    Scalar { text: String, plain: bool },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Debug, Clone)]
struct Node {
    pos: Pos,
    kind: Kind,
}

/// Where each value (and each mapping key) of the document stood, and which scalars took
/// their text from the environment.
#[derive(Debug, Default)]
pub struct Positions {
    values: HashMap<Path, Pos>,
    keys: HashMap<Path, Pos>,
    interpolated: HashSet<Path>,
    /// The values that hold text from the environment, as they read after interpolation.
    env_texts: Vec<String>,
}

impl Positions {
    /// The position of the value at `path`, or of its closest ancestor that has one.
    pub fn value(&self, path: &[Seg]) -> Pos {
        let mut p = path;
        loop {
            if let Some(pos) = self.values.get(p) {
                return *pos;
            }
            if p.is_empty() {
                return Pos { line: 1, col: 1 };
            }
            p = &p[..p.len() - 1];
        }
    }

    /// The position of the key that names `path` (falls back to the value's position).
    pub fn key(&self, path: &[Seg]) -> Pos {
        self.keys
            .get(path)
            .copied()
            .unwrap_or_else(|| self.value(path))
    }

    /// Whether the scalar at `path` came (at least partly) from `${VAR}` interpolation.
    pub fn was_interpolated(&self, path: &[Seg]) -> bool {
        self.interpolated.contains(path)
    }

    /// Whether any scalar at `path` or under it came from `${VAR}` interpolation.
    pub fn interpolated_under(&self, path: &[Seg]) -> bool {
        self.interpolated.iter().any(|p| p.starts_with(path))
    }

    /// `message` with any value that holds text from the environment (4 characters or
    /// more) said as such: a secret put in the wrong field is not printed by the check
    /// that refuses it.
    pub fn without_env_values(&self, message: String) -> String {
        let mut out = message;
        for t in self.env_texts.iter().filter(|t| t.len() >= 4) {
            if out.contains(t.as_str()) {
                out = out
                    .replace(&format!("`{t}`"), "(the value from the environment)")
                    .replace(t.as_str(), "(the value from the environment)");
            }
        }
        out
    }
}

/// An error found while reading YAML, before any typing.
#[derive(Debug, Clone)]
pub struct YamlError {
    pub pos: Pos,
    pub message: String,
}

/// Values that aliases may copy out in one document, all aliases together: far more than
/// any config's shared blocks, far less than the few hundred bytes of nested aliases that
/// would otherwise expand to gigabytes (a "billion laughs" file, saved by mistake or not,
/// would take the serving gateway's memory at its reload).
const ALIAS_VALUES_MAX: usize = 100_000;
/// And the text they may copy out: one long string aliased many times is as large.
const ALIAS_BYTES_MAX: usize = 16 << 20;

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
    root: Option<Node>,
    documents: usize,
    /// Values and bytes of text copied out by aliases so far, and where the alias that went
    /// past a bound stood.
    aliased: Size,
    too_many: Option<Pos>,
}

/// What a node holds: its values (itself included) and the bytes of its scalars' text.
#[derive(Default, Clone, Copy)]
struct Size {
    values: usize,
    bytes: usize,
}

impl Size {
    fn over(self) -> bool {
        self.values > ALIAS_VALUES_MAX || self.bytes > ALIAS_BYTES_MAX
    }

    fn add(&mut self, other: Size) {
        self.values = self.values.saturating_add(other.values);
        self.bytes = self.bytes.saturating_add(other.bytes);
    }
}

/// `node`'s size, counted until it is past a bound.
fn size_of(node: &Node) -> Size {
    match &node.kind {
        Kind::Scalar { text, .. } => Size {
            values: 1,
            bytes: text.len(),
        },
        Kind::Seq(items) => {
            let mut n = Size {
                values: 1,
                bytes: 0,
            };
            for i in items {
                if n.over() {
                    break;
                }
                n.add(size_of(i));
            }
            n
        }
        Kind::Map(entries) => {
            let mut n = Size {
                values: 1,
                bytes: 0,
            };
            for (k, v) in entries {
                if n.over() {
                    break;
                }
                n.add(size_of(k));
                n.add(size_of(v));
            }
            n
        }
    }
}

enum Frame {
    Seq(Pos, usize, Vec<Node>),
    Map(Pos, usize, Vec<(Node, Node)>, Option<Node>),
}

impl Builder {
    fn push_node(&mut self, node: Node) {
        match self.stack.last_mut() {
            Some(Frame::Seq(_, _, items)) => items.push(node),
            Some(Frame::Map(_, _, entries, pending)) => match pending.take() {
                None => *pending = Some(node),
                Some(key) => entries.push((key, node)),
            },
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::DocumentStart => self.documents += 1,
            Event::Scalar(text, style, anchor, _tag) => {
                let node = Node {
                    pos: mark.into(),
                    kind: Kind::Scalar {
                        text,
                        plain: style == TScalarStyle::Plain,
                    },
                };
                if anchor > 0 {
                    self.anchors.insert(anchor, node.clone());
                }
                self.push_node(node);
            }
            Event::Alias(id) => {
                let empty = Node {
                    pos: mark.into(),
                    kind: Kind::Scalar {
                        text: String::new(),
                        plain: true,
                    },
                };
                let node = match self.anchors.get(&id) {
                    Some(n) if self.too_many.is_none() => {
                        self.aliased.add(size_of(n));
                        if self.aliased.over() {
                            self.too_many = Some(mark.into());
                            empty
                        } else {
                            n.clone()
                        }
                    }
                    _ => empty,
                };
                self.push_node(node);
            }
            Event::SequenceStart(anchor, _) => {
                self.stack.push(Frame::Seq(mark.into(), anchor, Vec::new()))
            }
            Event::MappingStart(anchor, _) => {
                self.stack
                    .push(Frame::Map(mark.into(), anchor, Vec::new(), None))
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match self.stack.pop() {
                    Some(Frame::Seq(pos, anchor, items)) => (
                        Node {
                            pos,
                            kind: Kind::Seq(items),
                        },
                        anchor,
                    ),
                    Some(Frame::Map(pos, anchor, entries, _)) => (
                        Node {
                            pos,
                            kind: Kind::Map(entries),
                        },
                        anchor,
                    ),
                    None => return,
                };
                if anchor > 0 {
                    self.anchors.insert(anchor, node.clone());
                }
                self.push_node(node);
            }
            _ => {}
        }
    }
}

/// Where `${VAR}` values come from. Tests pass a map; `serve` and `check` pass the process env.
pub trait EnvSource {
    fn get(&self, name: &str) -> Option<String>;
}

impl<F: Fn(&str) -> Option<String>> EnvSource for F {
    fn get(&self, name: &str) -> Option<String> {
        self(name)
    }
}

/// Parses YAML text into a JSON value plus the positions of everything in it. Every error
/// found (syntax aside, which stops the parse) is returned, not only the first.
pub fn parse(text: &str, env: &dyn EnvSource) -> Result<(Value, Positions), Vec<YamlError>> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut builder, true) {
        let m = *e.marker();
        return Err(vec![YamlError {
            pos: m.into(),
            message: format!("YAML syntax error: {}", e.info()),
        }]);
    }
    if let Some(pos) = builder.too_many {
        return Err(vec![YamlError {
            pos,
            message: format!(
                "the aliases (`*name`) copy out more than {ALIAS_VALUES_MAX} values or {} \
                 MiB of text: write the shared blocks out, or nest fewer aliases in one another",
                ALIAS_BYTES_MAX >> 20
            ),
        }]);
    }
    if builder.documents > 1 {
        return Err(vec![YamlError {
            pos: Pos { line: 1, col: 1 },
            message: "expected one YAML document, found several".into(),
        }]);
    }
    let mut positions = Positions::default();
    let mut errors = Vec::new();
    let value = match builder.root {
        // An empty file is an empty config.
        None => Value::Object(Default::default()),
        Some(root) => {
            let mut path = Vec::new();
            to_value(&root, &mut path, &mut positions, env, &mut errors)
        }
    };
    if errors.is_empty() {
        Ok((value, positions))
    } else {
        Err(errors)
    }
}

fn to_value(
    node: &Node,
    path: &mut Path,
    positions: &mut Positions,
    env: &dyn EnvSource,
    errors: &mut Vec<YamlError>,
) -> Value {
    positions.values.insert(path.clone(), node.pos);
    match &node.kind {
        Kind::Scalar { text, plain } => {
            let text = if text.contains('$') {
                match interpolate(text, env) {
                    Ok((t, from_env)) => {
                        if from_env {
                            positions.interpolated.insert(path.clone());
                            positions.env_texts.push(t.clone());
                        }
                        t
                    }
                    Err(msg) => {
                        errors.push(YamlError {
                            pos: node.pos,
                            message: msg,
                        });
                        String::new()
                    }
                }
            } else {
                text.clone()
            };
            if *plain {
                resolve_plain(text)
            } else {
                Value::String(text)
            }
        }
        Kind::Seq(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                path.push(Seg::Index(i));
                out.push(to_value(item, path, positions, env, errors));
                path.pop();
            }
            Value::Array(out)
        }
        Kind::Map(entries) => {
            let mut out = serde_json::Map::new();
            let mut seen: HashMap<String, Pos> = HashMap::new();
            for (k, v) in entries {
                let key = match &k.kind {
                    Kind::Scalar { text, .. } => text.clone(),
                    _ => {
                        errors.push(YamlError {
                            pos: k.pos,
                            message: "a mapping key must be a plain string".into(),
                        });
                        continue;
                    }
                };
                if let Some(first) = seen.get(&key) {
                    errors.push(YamlError {
                        pos: k.pos,
                        message: format!(
                            "duplicate key `{key}` (first defined at line {} column {})",
                            first.line, first.col
                        ),
                    });
                    continue;
                }
                seen.insert(key.clone(), k.pos);
                path.push(Seg::Key(key.clone()));
                positions.keys.insert(path.clone(), k.pos);
                let value = to_value(v, path, positions, env, errors);
                path.pop();
                out.insert(key, value);
            }
            Value::Object(out)
        }
    }
}

/// YAML 1.2 core schema resolution for plain scalars.
fn resolve_plain(text: String) -> Value {
    match text.as_str() {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    let looks_numeric = text
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'))
        && text.bytes().any(|b| b.is_ascii_digit());
    if looks_numeric {
        if let Ok(i) = text.parse::<i64>() {
            return Value::Number(i.into());
        }
        if let Ok(u) = text.parse::<u64>() {
            return Value::Number(u.into());
        }
        if let Some(n) = text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
        {
            return Value::Number(n);
        }
    }
    Value::String(text)
}

/// Replaces `${VAR}` and `${VAR:-default}`; `$${` stands for a literal `${`. Also says
/// whether any of the text came from a variable that is set (a default does not count: a
/// secret written as a default is still written in the file).
fn interpolate(text: &str, env: &dyn EnvSource) -> Result<(String, bool), String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut from_env = false;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        if let Some(r) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = r;
            continue;
        }
        if !after.starts_with("${") {
            out.push('$');
            rest = &after[1..];
            continue;
        }
        let Some(end) = after.find('}') else {
            return Err(format!("unclosed `${{` in `{text}`"));
        };
        let inner = &after[2..end];
        let (name, default) = match inner.find(":-") {
            Some(j) => (&inner[..j], Some(&inner[j + 2..])),
            None => (inner, None),
        };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("`${{{inner}}}` is not a valid variable reference"));
        }
        // Shell semantics: `:-` takes the default when the variable is unset or empty.
        let value = match (env.get(name), default) {
            (Some(v), None) => {
                from_env = true;
                v
            }
            (Some(v), Some(_)) if !v.is_empty() => {
                from_env = true;
                v
            }
            (_, Some(d)) => d.to_string(),
            (None, None) => return Err(format!("environment variable `{name}` is not set")),
        };
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok((out, from_env))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "SET" => Some("value".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn positions_and_interpolation() {
        let text = "a:\n  b: ${SET}\n  c: [1, x]\n  d: ${NOPE:-dflt}\n  e: ${EMPTY:-d2}\n  f: $${LITERAL}\n";
        let (v, pos) = parse(text, &env).unwrap();
        assert_eq!(v["a"]["b"], "value");
        assert_eq!(v["a"]["c"][0], 1);
        assert_eq!(v["a"]["d"], "dflt");
        assert_eq!(v["a"]["e"], "d2");
        assert_eq!(v["a"]["f"], "${LITERAL}");
        let d = vec![Seg::Key("a".into()), Seg::Key("d".into())];
        assert!(
            !pos.was_interpolated(&d),
            "a default is not from the environment"
        );
        let p = vec![Seg::Key("a".into()), Seg::Key("b".into())];
        assert_eq!(pos.value(&p), Pos { line: 2, col: 6 });
        assert_eq!(pos.key(&p), Pos { line: 2, col: 3 });
        assert!(pos.was_interpolated(&p));
        let p = vec![Seg::Key("a".into()), Seg::Key("c".into()), Seg::Index(1)];
        assert_eq!(pos.value(&p), Pos { line: 3, col: 10 });
    }

    #[test]
    fn unset_variables_and_duplicates_are_all_reported() {
        let text = "a: ${MISSING}\nb: 1\nb: 2\nc: ${ALSO_MISSING}\n";
        let errs = parse(text, &env).unwrap_err();
        let msgs: Vec<_> = errs
            .iter()
            .map(|e| (e.pos.line, e.pos.col, e.message.clone()))
            .collect();
        assert_eq!(msgs.len(), 3, "{msgs:?}");
        assert_eq!(msgs[0].0, 1);
        assert!(msgs[0].2.contains("MISSING"));
        assert_eq!((msgs[1].0, msgs[1].1), (3, 1));
        assert!(msgs[1].2.contains("duplicate key `b`"));
        assert!(msgs[2].2.contains("ALSO_MISSING"));
    }

    #[test]
    fn quoted_scalars_stay_strings() {
        let (v, _) = parse("a: \"123\"\nb: 123\nc: '2024-10-21'\nd: 2024-10-21\n", &env).unwrap();
        assert_eq!(v["a"], "123");
        assert_eq!(v["b"], 123);
        assert_eq!(v["c"], "2024-10-21");
        assert_eq!(v["d"], "2024-10-21");
    }
}
