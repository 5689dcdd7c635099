//! A YAML document tree that remembers where every node came from, so errors found
//! long after parsing (a bad regex, an unknown field, a port out of range) still
//! point at `file:line:column`.

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

impl From<Marker> for Pos {
    fn from(m: Marker) -> Self {
        Pos {
            line: m.line(),
            col: m.col() + 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    /// A scalar and whether it was quoted (a quoted `80` is a string, not a number).
    Scalar {
        text: String,
        quoted: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Value,
    pub pos: Pos,
}

impl Node {
    pub fn kind(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Scalar { .. } => "scalar",
            Value::Seq(_) => "list",
            Value::Map(_) => "mapping",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Parses every document in `text`. Anchors and aliases are refused: a policy that
/// depends on them is hard to review, and alias expansion is a memory bomb.
pub fn parse_documents(text: &str) -> Result<Vec<Node>, SyntaxError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut builder, true) {
        let info = e.to_string();
        // yaml-rust2 appends " at byte B line L column C"; the position is reported separately.
        let message = info.split(" at byte ").next().unwrap_or(&info).to_string();
        return Err(SyntaxError {
            pos: (*e.marker()).into(),
            message,
        });
    }
    if let Some(err) = builder.error {
        return Err(err);
    }
    Ok(builder.docs)
}

#[derive(Default)]
struct Builder {
    docs: Vec<Node>,
    stack: Vec<Partial>,
    error: Option<SyntaxError>,
}

enum Partial {
    Seq(Pos, Vec<Node>),
    Map(Pos, Vec<(Node, Node)>, Option<Node>),
}

impl Builder {
    fn push(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => self.docs.push(node),
            Some(Partial::Seq(_, items)) => items.push(node),
            Some(Partial::Map(_, entries, pending)) => match pending.take() {
                None => *pending = Some(node),
                Some(key) => entries.push((key, node)),
            },
        }
    }

    fn fail(&mut self, pos: Pos, message: &str) {
        if self.error.is_none() {
            self.error = Some(SyntaxError {
                pos,
                message: message.to_string(),
            });
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = Pos::from(mark);
        match ev {
            Event::Scalar(text, style, anchor, _tag) => {
                if anchor != 0 {
                    self.fail(pos, "YAML anchors are not supported in policies");
                }
                let quoted = style != TScalarStyle::Plain;
                let value =
                    if !quoted && matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL") {
                        Value::Null
                    } else {
                        Value::Scalar { text, quoted }
                    };
                self.push(Node { value, pos });
            }
            Event::SequenceStart(anchor, _) => {
                if anchor != 0 {
                    self.fail(pos, "YAML anchors are not supported in policies");
                }
                self.stack.push(Partial::Seq(pos, Vec::new()));
            }
            Event::MappingStart(anchor, _) => {
                if anchor != 0 {
                    self.fail(pos, "YAML anchors are not supported in policies");
                }
                self.stack.push(Partial::Map(pos, Vec::new(), None));
            }
            Event::SequenceEnd => {
                if let Some(Partial::Seq(p, items)) = self.stack.pop() {
                    self.push(Node {
                        value: Value::Seq(items),
                        pos: p,
                    });
                }
            }
            Event::MappingEnd => {
                if let Some(Partial::Map(p, entries, _)) = self.stack.pop() {
                    // yaml-rust2 marks a block mapping where its first value starts;
                    // the first key is where a reader sees the mapping begin.
                    let pos = entries.first().map_or(p, |(k, _)| k.pos.min(p));
                    self.push(Node {
                        value: Value::Map(entries),
                        pos,
                    });
                }
            }
            Event::Alias(_) => self.fail(pos, "YAML aliases are not supported in policies"),
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let docs = parse_documents("a: 1\nb:\n  - x\n  - 'y'\n---\nc: d\n").unwrap();
        assert_eq!(docs.len(), 2);
        let Value::Map(entries) = &docs[0].value else {
            panic!()
        };
        assert_eq!(entries[0].0.pos, Pos { line: 1, col: 1 });
        assert_eq!(entries[0].1.pos, Pos { line: 1, col: 4 });
        let Value::Seq(items) = &entries[1].1.value else {
            panic!()
        };
        assert_eq!(items[1].pos, Pos { line: 4, col: 5 });
        assert!(matches!(
            &items[1].value,
            Value::Scalar { quoted: true, .. }
        ));
    }

    #[test]
    fn syntax_errors_have_positions() {
        let err = parse_documents("a: [1, 2\nb: c\n").unwrap_err();
        assert!(err.pos.line >= 1);
        assert!(!err.message.contains("at byte"));
    }

    #[test]
    fn aliases_are_refused() {
        let err = parse_documents("a: &x 1\nb: *x\n").unwrap_err();
        assert!(err.message.contains("anchors"), "{}", err.message);
    }
}
