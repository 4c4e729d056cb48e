//! Splits generated text into what OpenAI's chat API returns separately: reasoning
//! (`<think>...</think>` of thinking models, to `reasoning_content`), tool calls (`<tool_call>`
//! blocks, to `tool_calls`) and the rest (`content`).
//!
//! It works on streamed pieces: text that could still be the start of a tag is held back until the
//! next piece decides, so a tag split across tokens is never shown to the client. Tool calls come
//! in Qwen3's (Hermes) JSON form, `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`,
//! and Qwen3.5's XML form, `<tool_call>\n<function=NAME>\n<parameter=P>\nVALUE\n</parameter>\n
//! </function>\n</tool_call>`. A block that parses as neither is returned as content, as written.
use serde_json::{Map, Value};

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
const TOOL_OPEN: &str = "<tool_call>";
const TOOL_CLOSE: &str = "</tool_call>";

/// One parsed tool call.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    /// The function's name.
    pub name: String,
    /// Its arguments as a JSON text (OpenAI sends arguments as a string).
    pub arguments: String,
}

/// What one piece of generated text adds to each field.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Delta {
    /// Text for `reasoning_content`.
    pub reasoning: String,
    /// Text for `content`.
    pub content: String,
    /// Tool calls completed by this piece.
    pub tool_calls: Vec<ToolCall>,
}

impl Delta {
    /// Whether it adds nothing.
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty() && self.tool_calls.is_empty()
    }

    fn append(&mut self, other: Delta) {
        self.reasoning.push_str(&other.reasoning);
        self.content.push_str(&other.content);
        self.tool_calls.extend(other.tool_calls);
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Reasoning,
    Content,
    ToolCall,
}

/// The streaming splitter.
#[derive(Clone, Debug)]
pub struct OutputParser {
    mode: Mode,
    pending: String,
    parse_reasoning: bool,
    parse_tools: bool,
    /// Nothing has been emitted yet: a leading `<think>` opens reasoning.
    at_start: bool,
    /// Drop whitespace before the first content after `</think>`.
    trim_content_start: bool,
}

impl OutputParser {
    /// `parse_reasoning`: the model thinks in `<think>` tags; `in_reasoning`: the prompt already
    /// opened one (the template's generation prompt ends in `<think>`). `parse_tools`: tools were
    /// offered, so `<tool_call>` blocks are parsed.
    pub fn new(parse_reasoning: bool, in_reasoning: bool, parse_tools: bool) -> OutputParser {
        OutputParser {
            mode: if parse_reasoning && in_reasoning {
                Mode::Reasoning
            } else {
                Mode::Content
            },
            pending: String::new(),
            parse_reasoning,
            parse_tools,
            at_start: true,
            trim_content_start: false,
        }
    }

    /// Feeds a piece of generated text.
    pub fn push(&mut self, text: &str) -> Delta {
        self.pending.push_str(text);
        let mut out = Delta::default();
        loop {
            match self.mode {
                Mode::Reasoning => {
                    if let Some(pos) = self.pending.find(THINK_CLOSE) {
                        out.reasoning.push_str(&self.pending[..pos]);
                        self.pending.drain(..pos + THINK_CLOSE.len());
                        self.mode = Mode::Content;
                        self.trim_content_start = true;
                        self.at_start = false;
                        continue;
                    }
                    let keep = partial_suffix(&self.pending, THINK_CLOSE);
                    let cut = self.pending.len() - keep;
                    out.reasoning.push_str(&self.pending[..cut]);
                    self.pending.drain(..cut);
                    break;
                }
                Mode::Content => {
                    if self.trim_content_start {
                        let trimmed = self.pending.trim_start().len();
                        self.pending.drain(..self.pending.len() - trimmed);
                        if self.pending.is_empty() {
                            break;
                        }
                        self.trim_content_start = false;
                    }
                    if self.at_start && self.parse_reasoning {
                        if self.pending.starts_with(THINK_OPEN) {
                            self.pending.drain(..THINK_OPEN.len());
                            self.mode = Mode::Reasoning;
                            self.at_start = false;
                            continue;
                        }
                        if THINK_OPEN.starts_with(self.pending.as_str()) {
                            break; // could still become `<think>`
                        }
                    }
                    if self.pending.is_empty() {
                        break;
                    }
                    self.at_start = false;
                    if !self.parse_tools {
                        out.content.push_str(&self.pending);
                        self.pending.clear();
                        break;
                    }
                    if let Some(pos) = self.pending.find(TOOL_OPEN) {
                        out.content.push_str(&self.pending[..pos]);
                        self.pending.drain(..pos + TOOL_OPEN.len());
                        self.mode = Mode::ToolCall;
                        continue;
                    }
                    let keep = partial_suffix(&self.pending, TOOL_OPEN);
                    let cut = self.pending.len() - keep;
                    out.content.push_str(&self.pending[..cut]);
                    self.pending.drain(..cut);
                    break;
                }
                Mode::ToolCall => {
                    let Some(pos) = self.pending.find(TOOL_CLOSE) else {
                        break;
                    };
                    let block = self.pending[..pos].to_owned();
                    self.pending.drain(..pos + TOOL_CLOSE.len());
                    match parse_tool_call(&block) {
                        Some(call) => out.tool_calls.push(call),
                        None => out
                            .content
                            .push_str(&format!("{TOOL_OPEN}{block}{TOOL_CLOSE}")),
                    }
                    self.mode = Mode::Content;
                }
            }
        }
        out
    }

    /// Releases what is held back at the end of generation. An unclosed tool call block counts if
    /// its body parses (a model may stop right before `</tool_call>`).
    pub fn finish(&mut self) -> Delta {
        let mut out = Delta::default();
        let rest = std::mem::take(&mut self.pending);
        match self.mode {
            Mode::Reasoning => out.reasoning = rest,
            Mode::Content => {
                if !self.trim_content_start {
                    out.content = rest;
                }
            }
            Mode::ToolCall => match parse_tool_call(&rest) {
                Some(call) => out.tool_calls.push(call),
                None => out.content = format!("{TOOL_OPEN}{rest}"),
            },
        }
        self.mode = Mode::Content;
        out
    }

    /// Parses a whole output at once.
    pub fn parse_all(mut self, text: &str) -> Delta {
        let mut d = self.push(text);
        d.append(self.finish());
        d
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `tag`.
fn partial_suffix(text: &str, tag: &str) -> usize {
    (1..tag.len())
        .rev()
        .find(|&n| text.ends_with(&tag[..n]))
        .unwrap_or(0)
}

/// A tool call block's body, in either of the formats above.
pub fn parse_tool_call(block: &str) -> Option<ToolCall> {
    let body = block.trim();
    if body.starts_with('{') {
        let v: Value = serde_json::from_str(body).ok()?;
        let name = v.get("name")?.as_str()?.to_owned();
        let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
            None | Some(Value::Null) => "{}".to_owned(),
            Some(Value::String(s)) => s.clone(),
            Some(a) => a.to_string(),
        };
        return Some(ToolCall { name, arguments });
    }
    let rest = body.strip_prefix("<function=")?;
    let (name, mut rest) = rest.split_once('>')?;
    let mut args = Map::new();
    while let Some(start) = rest.find("<parameter=") {
        let after = &rest[start + "<parameter=".len()..];
        let (param, after) = after.split_once('>')?;
        let end = after.find("</parameter>")?;
        let raw = after[..end].trim_matches('\n');
        let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()));
        args.insert(param.to_owned(), value);
        rest = &after[end + "</parameter>".len()..];
    }
    if !rest.trim().starts_with("</function>") {
        return None;
    }
    Some(ToolCall {
        name: name.trim().to_owned(),
        arguments: Value::Object(args).to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `text` one character at a time, so every tag is split in every possible place.
    fn streamed(mut p: OutputParser, text: &str) -> Delta {
        let mut all = Delta::default();
        for c in text.chars() {
            all.append(p.push(&c.to_string()));
        }
        all.append(p.finish());
        all
    }

    #[test]
    fn reasoning_then_content() {
        let text = "<think>\nLet me see.\n</think>\n\nThe answer is 4.";
        for d in [
            OutputParser::new(true, false, false).parse_all(text),
            streamed(OutputParser::new(true, false, false), text),
        ] {
            assert_eq!(d.reasoning, "\nLet me see.\n");
            assert_eq!(d.content, "The answer is 4.");
        }
        // The prompt opened the think block (Qwen3.5's template).
        let d = streamed(OutputParser::new(true, true, false), "hmm</think>ok");
        assert_eq!((d.reasoning.as_str(), d.content.as_str()), ("hmm", "ok"));
        // Not a thinking model: tags are content.
        let d = streamed(OutputParser::new(false, false, false), text);
        assert_eq!(d.content, text);
    }

    #[test]
    fn hermes_tool_calls() {
        let text = "Checking.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>";
        let d = streamed(OutputParser::new(true, false, true), text);
        assert_eq!(d.content.trim(), "Checking.");
        assert_eq!(
            d.tool_calls,
            vec![
                ToolCall {
                    name: "get_weather".into(),
                    arguments: "{\"city\":\"Paris\"}".into()
                },
                ToolCall {
                    name: "now".into(),
                    arguments: "{}".into()
                }
            ]
        );
    }

    #[test]
    fn xml_tool_calls_and_broken_blocks() {
        let text = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>";
        let d = streamed(OutputParser::new(false, false, true), text);
        assert_eq!(d.tool_calls[0].name, "get_weather");
        assert_eq!(d.tool_calls[0].arguments, "{\"city\":\"Paris\",\"days\":3}");
        let broken = "a <tool_call>{not json}</tool_call> b";
        let d = streamed(OutputParser::new(false, false, true), broken);
        assert_eq!(d.content, broken);
        assert!(d.tool_calls.is_empty());
        // Unclosed but complete: counted. Unclosed and incomplete: content.
        let d = streamed(
            OutputParser::new(false, false, true),
            "<tool_call>{\"name\": \"f\"}",
        );
        assert_eq!(d.tool_calls.len(), 1);
        let d = streamed(OutputParser::new(false, false, true), "<tool_call>{\"na");
        assert_eq!(d.content, "<tool_call>{\"na");
    }

    #[test]
    fn held_back_prefix_is_released_at_the_end() {
        let d = streamed(OutputParser::new(true, false, true), "x <tool_ca");
        assert_eq!(d.content, "x <tool_ca");
        let d = streamed(OutputParser::new(true, false, true), "<thi");
        assert_eq!(d.content, "<thi");
    }
}
