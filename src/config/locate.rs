//! Turns byte offsets from the TOML parser into the line number and dotted key that error
//! messages name, so a message points at the exact place to fix.

use std::ops::Range;

use toml::de::{DeTable, DeValue};

/// 1-based line of a byte offset (an offset past the end counts as the last line).
pub fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

/// The key path (`net.timeout`, `node[1].address`) of the key or value at `offset`, found by
/// re-parsing the document (with error recovery, so this also works for syntax errors), or, when
/// the parser kept nothing there, by reading the line's `key =` and the `[table]` above it.
pub fn key_at(text: &str, offset: usize) -> Option<String> {
    let (root, _) = DeTable::parse_recoverable(text);
    let mut path = Vec::new();
    if search(root.get_ref(), offset, &mut path) {
        return Some(render(&path));
    }
    key_from_text(text, offset)
}

enum Segment {
    Key(String),
    Index(usize),
}

fn render(path: &[Segment]) -> String {
    let mut out = String::new();
    for segment in path {
        match segment {
            Segment::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Segment::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// The end is inclusive so that "unterminated string" at the end of a value still hits it.
fn hits(span: Range<usize>, offset: usize) -> bool {
    span.start <= offset && offset <= span.end
}

/// Depth first, so the innermost key wins; spans of sibling entries do not overlap.
fn search(table: &DeTable<'_>, offset: usize, path: &mut Vec<Segment>) -> bool {
    for (key, value) in table.iter() {
        path.push(Segment::Key(key.get_ref().to_string()));
        if search_value(value.get_ref(), offset, path) {
            return true;
        }
        if hits(key.span(), offset) || hits(value.span(), offset) {
            return true;
        }
        path.pop();
    }
    false
}

fn search_value(value: &DeValue<'_>, offset: usize, path: &mut Vec<Segment>) -> bool {
    match value {
        DeValue::Table(table) => search(table, offset, path),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(Segment::Index(i));
                if search_value(item.get_ref(), offset, path) || hits(item.span(), offset) {
                    return true;
                }
                path.pop();
            }
            false
        }
        _ => false,
    }
}

/// Best effort for errors the recovering parser dropped (a duplicate key, for instance).
fn key_from_text(text: &str, offset: usize) -> Option<String> {
    let line_no = line_of(text, offset);
    let lines: Vec<&str> = text.lines().collect();
    let line = lines.get(line_no - 1)?.trim();
    if let Some(header) = table_header(line) {
        return Some(header.to_string());
    }
    let key = line.split_once('=')?.0.trim();
    if key.is_empty() || key.starts_with('#') {
        return None;
    }
    // Find the table this line belongs to and, for `[[array]]` tables, which element it is.
    let above = &lines[..line_no - 1];
    let Some((at, header)) =
        above.iter().enumerate().rev().find_map(|(i, l)| Some((i, table_header(l.trim())?)))
    else {
        return Some(key.to_string());
    };
    if above[at].trim().starts_with("[[") {
        let index = above[..at].iter().filter(|l| table_header(l.trim()) == Some(header)).count();
        Some(format!("{header}[{index}].{key}"))
    } else {
        Some(format!("{header}.{key}"))
    }
}

/// "net" for `[net]` and "node" for `[[node]]` (comments after the header allowed).
fn table_header(line: &str) -> Option<&str> {
    let line = line.split('#').next()?.trim_end();
    let inner = line.strip_prefix("[[").and_then(|l| l.strip_suffix("]]"));
    let inner = inner.or_else(|| line.strip_prefix('[').and_then(|l| l.strip_suffix(']')))?;
    Some(inner.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let text = "a = 1\nb = 2\n";
        assert_eq!(line_of(text, 0), 1);
        assert_eq!(line_of(text, 6), 2);
        assert_eq!(line_of(text, 999), 3);
    }

    #[test]
    fn keys() {
        let text =
            "resource = \"r\"\n[net]\ntimeout = \"6s\"\n[[node]]\nname = \"a\"\n[[node]]\nname = \"b\"\n";
        assert_eq!(key_at(text, text.find("\"r\"").unwrap()).as_deref(), Some("resource"));
        assert_eq!(key_at(text, text.find("\"6s\"").unwrap()).as_deref(), Some("net.timeout"));
        assert_eq!(key_at(text, text.find("\"b\"").unwrap()).as_deref(), Some("node[1].name"));
        assert_eq!(key_at(text, text.find("[[node]]").unwrap()).as_deref(), Some("node[0]"));
    }

    #[test]
    fn keys_from_text() {
        let text = "[[node]]\nname = \"a\"\n[[node]]\nname = \"b\"\nname = \"c\"\n";
        assert_eq!(key_at(text, text.rfind("name").unwrap()).as_deref(), Some("node[1].name"));
        let text = "[net]\ntimeout = 1\ntimeout = 2\n";
        assert_eq!(key_at(text, text.rfind("timeout").unwrap()).as_deref(), Some("net.timeout"));
    }
}
