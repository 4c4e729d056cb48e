//! The Python behaviour chat templates rely on, for minijinja.
//!
//! Hugging Face renders chat templates with Jinja2 inside Python (`_compile_jinja_template` in transformers'
//! `utils/chat_template_utils.py`), so templates are written against Python semantics: `{{ true }}` prints `True`,
//! string methods such as `.startswith()` and `.split()` exist, `tojson` is HF's own `json.dumps` wrapper that keeps
//! non-ASCII text and accepts `indent`/`separators`/`sort_keys`, and the globals `raise_exception` and
//! `strftime_now` are defined. [`configure`] installs the same behaviour on a minijinja [`Environment`]:
//!
//! - an output formatter that prints `None`, `True`/`False`, floats, lists and dicts as Python's `str()` does;
//! - `tojson` and `string` filters with Python's output, and `length` of an undefined value is 0;
//! - string/dict/list methods: minijinja-contrib's `pycompat` plus `find`/`rfind` with character (not byte)
//!   offsets, `rsplit`, `removeprefix`, `removesuffix`, and argument-less `strip`s that use Python's whitespace;
//! - `raise_exception(message)`, whose error [`raised_message`] recognises, and `strftime_now(format)`.
//!
//! What stays different: `~` concatenation and the `join` filter print booleans and `none` the minijinja way
//! (`true`, `none`), and `strftime_now` uses UTC where Python uses the machine's local time zone.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Output, State};

use super::strftime::strftime_utc;

/// Installs the Python-compatible formatter, filters, methods and globals on `env`.
pub(crate) fn configure(env: &mut Environment<'static>) {
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_formatter(python_formatter);
    env.set_unknown_method_callback(python_methods);
    env.add_filter("tojson", tojson_filter);
    env.add_filter("string", |value: &Value| py_str(value));
    // Jinja2's Undefined has length 0; minijinja refuses to measure it.
    for name in ["length", "count"] {
        env.add_filter(name, |value: &Value| -> Result<usize, Error> {
            if value.is_undefined() {
                Ok(0)
            } else {
                minijinja::filters::length(value)
            }
        });
    }
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", |format: &str| {
        let unix_seconds = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        strftime_utc(format, unix_seconds)
    });
}

/// Carries the message of `raise_exception(...)` through minijinja's error as its source.
#[derive(Debug)]
struct RaisedByTemplate(String);

impl std::fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedByTemplate {}

fn raise_exception(message: &Value) -> Result<Value, Error> {
    let message = py_str(message);
    Err(Error::new(ErrorKind::InvalidOperation, message.clone())
        .with_source(RaisedByTemplate(message)))
}

/// The message given to `raise_exception` if that is what stopped the render.
pub(crate) fn raised_message(error: &Error) -> Option<String> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(raised) = e.downcast_ref::<RaisedByTemplate>() {
            return Some(raised.0.clone());
        }
        current = e.source();
    }
    None
}

fn python_formatter(out: &mut Output, state: &State, value: &Value) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None | ValueKind::Bool | ValueKind::Seq | ValueKind::Map => {
            out.write_str(&py_str(value))?;
            Ok(())
        }
        ValueKind::Number if !value.is_integer() => {
            out.write_str(&py_str(value))?;
            Ok(())
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// Python's `str(value)`.
pub(crate) fn py_str(value: &Value) -> String {
    match value.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::String => value.as_str().unwrap_or_default().to_owned(),
        _ => py_repr(value),
    }
}

/// Python's `repr(value)`: what `str()` gives for containers, and how their items are written.
fn py_repr(value: &Value) -> String {
    let mut out = String::new();
    write_py_repr(&mut out, value);
    out
}

fn write_py_repr(out: &mut String, value: &Value) {
    match value.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => match float_of(value) {
            Some(f) => out.push_str(&py_float_repr(f)),
            None => out.push_str(&value.to_string()),
        },
        ValueKind::String => write_py_str_repr(out, value.as_str().unwrap_or_default()),
        ValueKind::Seq => {
            out.push('[');
            if let Ok(items) = value.try_iter() {
                for (i, item) in items.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_py_repr(out, &item);
                }
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            if let Ok(keys) = value.try_iter() {
                for (i, key) in keys.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_py_repr(out, &key);
                    out.push_str(": ");
                    write_py_repr(out, &value.get_item(&key).unwrap_or_default());
                }
            }
            out.push('}');
        }
        _ => out.push_str(&value.to_string()),
    }
}

/// A float's value, `None` for integers (minijinja keeps the two apart, as Python does).
fn float_of(value: &Value) -> Option<f64> {
    if value.kind() != ValueKind::Number || value.is_integer() {
        return None;
    }
    f64::try_from(value.clone()).ok()
}

/// Python's `repr(str)`: single quotes unless the text has a `'` and no `"`, escapes for backslash, quote, control
/// characters and the non-printable characters we can recognise without Unicode tables.
fn write_py_str_repr(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if is_py_printable(c) => out.push(c),
            c if (c as u32) < 0x100 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if (c as u32) < 0x10000 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\U{:08x}", c as u32);
            }
        }
    }
    out.push(quote);
}

/// An approximation of Python's `str.isprintable` for one character: control characters, separators other than
/// the ASCII space, the common format characters and private-use code points are not printable.
fn is_py_printable(c: char) -> bool {
    if c == ' ' {
        return true;
    }
    if c.is_control() || c.is_whitespace() {
        return false;
    }
    !matches!(c as u32,
        0xAD | 0x600..=0x605 | 0x61C | 0x6DD | 0x70F | 0x180E | 0x200B..=0x200F | 0x202A..=0x202E
        | 0x2060..=0x206F | 0xFEFF | 0xFFF9..=0xFFFB | 0xE000..=0xF8FF | 0xF0000..=0x10FFFF)
}

/// Python's `repr(float)`: the shortest digits that round-trip, in positional notation when the decimal exponent is
/// in -5..16 and in scientific notation (`1e+16`, `1e-05`) otherwise; always with a `.0` if integral.
pub(crate) fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    // Rust's `{:e}` prints the shortest round-trip digits as `d.ddde-N`; Python's choice of notation is reapplied.
    let sci = format!("{f:e}");
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let n = digits.len() as i32;
    if (-4..16).contains(&exponent) {
        let point = exponent + 1; // digits before the decimal point
        if point <= 0 {
            format!("{sign}0.{}{digits}", "0".repeat((-point) as usize))
        } else if point >= n {
            format!("{sign}{digits}{}.0", "0".repeat((point - n) as usize))
        } else {
            let (int, frac) = digits.split_at(point as usize);
            format!("{sign}{int}.{frac}")
        }
    } else {
        let (first, rest) = digits.split_at(1);
        let exp_sign = if exponent < 0 { '-' } else { '+' };
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        format!("{sign}{first}{frac}e{exp_sign}{:02}", exponent.abs())
    }
}

// ---------------------------------------------------------------------------------------------------------------
// tojson

/// Options of Python's `json.dumps` that HF's `tojson` exposes.
struct JsonOptions {
    ensure_ascii: bool,
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
}

/// HF's `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, i.e. `json.dumps` with those
/// arguments (no HTML escaping, unlike Jinja's own `tojson`).
fn tojson_filter(args: &[Value]) -> Result<Value, Error> {
    const NAMES: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    let (value, rest) = args
        .split_first()
        .ok_or_else(|| Error::from(ErrorKind::MissingArgument))?;
    let (positional, kwargs) = match rest.split_last() {
        Some((last, init)) if last.is_kwargs() => (init, Some(last)),
        _ => (rest, None),
    };
    if positional.len() > NAMES.len() {
        return Err(Error::from(ErrorKind::TooManyArguments));
    }
    let mut given: [Option<Value>; 4] = Default::default();
    for (slot, arg) in given.iter_mut().zip(positional) {
        *slot = Some(arg.clone());
    }
    if let Some(kwargs) = kwargs {
        for key in kwargs.try_iter()? {
            let name = key.as_str().unwrap_or_default();
            let index = NAMES.iter().position(|n| *n == name).ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson() got an unexpected keyword argument '{name}'"),
                )
            })?;
            given[index] = Some(kwargs.get_item(&key)?);
        }
    }
    let [ensure_ascii, indent, separators, sort_keys] = given;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_owned(),
            None => {
                let n = v.as_i64().ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson indent must be an int or a string",
                    )
                })?;
                " ".repeat(n.max(0) as usize)
            }
        }),
    };
    let (item_separator, key_separator) = match separators {
        Some(v) if !v.is_none() && !v.is_undefined() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [item, key] => match (item.as_str(), key.as_str()) {
                    (Some(item), Some(key)) => (item.to_owned(), key.to_owned()),
                    _ => {
                        return Err(Error::new(
                            ErrorKind::InvalidOperation,
                            "tojson separators must be two strings",
                        ))
                    }
                },
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson separators must be a pair (item_separator, key_separator)",
                    ))
                }
            }
        }
        // json.dumps drops the space after ',' when indenting, as the newline takes its place
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let options = JsonOptions {
        ensure_ascii: ensure_ascii.is_some_and(|v| v.is_true()),
        indent,
        item_separator,
        key_separator,
        sort_keys: sort_keys.is_some_and(|v| v.is_true()),
    };
    let mut out = String::new();
    write_json(&mut out, value, &options, 0)?;
    Ok(Value::from(out))
}

fn write_json(
    out: &mut String,
    value: &Value,
    options: &JsonOptions,
    level: usize,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => match float_of(value) {
            Some(f) if f.is_nan() => out.push_str("NaN"),
            Some(f) if f.is_infinite() => {
                out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" })
            }
            Some(f) => out.push_str(&py_float_repr(f)),
            None => out.push_str(&value.to_string()),
        },
        ValueKind::String => write_json_str(
            out,
            value.as_str().unwrap_or_default(),
            options.ensure_ascii,
        ),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_json_container(out, options, level, '[', ']', &items, |out, item, level| {
                write_json(out, item, options, level)
            })?;
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if options.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_json_container(
                out,
                options,
                level,
                '{',
                '}',
                &entries,
                |out, (key, item), level| {
                    write_json_str(out, key, options.ensure_ascii);
                    out.push_str(&options.key_separator);
                    write_json(out, item, options, level)
                },
            )?;
        }
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: object of type {kind} is not JSON serializable"),
            ))
        }
    }
    Ok(())
}

/// Writes `[a, b]` / `{..}` as `json.dumps` lays them out: empty containers stay `[]`/`{}`; with an indent every item
/// goes on its own line, indented one step deeper than the brackets.
fn write_json_container<T>(
    out: &mut String,
    options: &JsonOptions,
    level: usize,
    open: char,
    close: char,
    items: &[T],
    mut write_item: impl FnMut(&mut String, &T, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&options.item_separator);
        }
        if let Some(indent) = &options.indent {
            out.push('\n');
            out.push_str(&indent.repeat(level + 1));
        }
        write_item(out, item, level + 1)?;
    }
    if let Some(indent) = &options.indent {
        out.push('\n');
        out.push_str(&indent.repeat(level));
    }
    out.push(close);
    Ok(())
}

/// `json.dumps` accepts str, int, float, bool and None keys and writes them as strings.
fn json_key(key: &Value) -> Result<String, Error> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_owned(),
        ValueKind::None => "null".to_owned(),
        ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_owned(),
        ValueKind::Number => match float_of(key) {
            Some(f) => py_float_repr(f),
            None => key.to_string(),
        },
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: keys must be str, int, float, bool or None, not {kind}"),
            ))
        }
    })
}

/// A JSON string literal as Python writes it: `\"`, `\\`, `\n`, `\r`, `\t`, `\b`, `\f`, `\u00XX` for other control
/// characters, and with `ensure_ascii` every non-ASCII character as `\uXXXX` (UTF-16 surrogate pairs above U+FFFF).
fn write_json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !c.is_ascii() => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

// ---------------------------------------------------------------------------------------------------------------
// Methods

/// Python `str` methods that minijinja-contrib's `pycompat` lacks or gets subtly wrong, then `pycompat` itself.
fn python_methods(
    state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    if let Some(s) = value.as_str() {
        match method {
            "find" | "rfind" => return find_method(s, method == "rfind", args),
            "rsplit" => return rsplit_method(s, args),
            "removeprefix" => {
                let prefix = one_str_arg(method, args)?;
                return Ok(Value::from(s.strip_prefix(prefix).unwrap_or(s)));
            }
            "removesuffix" => {
                let suffix = one_str_arg(method, args)?;
                return Ok(Value::from(s.strip_suffix(suffix).unwrap_or(s)));
            }
            "strip" | "lstrip" | "rstrip" if args.is_empty() || args[0].is_none() => {
                let out = match method {
                    "strip" => s.trim_matches(is_py_space),
                    "lstrip" => s.trim_start_matches(is_py_space),
                    _ => s.trim_end_matches(is_py_space),
                };
                return Ok(Value::from(out));
            }
            _ => {}
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// Python's `str.isspace` for one character: Rust's White_Space plus the ASCII information separators.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn one_str_arg<'a>(method: &str, args: &'a [Value]) -> Result<&'a str, Error> {
    match args {
        [arg] => arg.as_str().ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidOperation,
                format!("{method}() argument must be str, not {}", arg.kind()),
            )
        }),
        _ => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "{method}() takes exactly one argument ({} given)",
                args.len()
            ),
        )),
    }
}

/// `str.find(sub[, start[, end]])` / `rfind`, returning a character index as Python does.
fn find_method(s: &str, reverse: bool, args: &[Value]) -> Result<Value, Error> {
    let method = if reverse { "rfind" } else { "find" };
    let sub = args.first().and_then(Value::as_str).ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("{method}() needs a string argument"),
        )
    })?;
    let chars: Vec<(usize, char)> = s.char_indices().collect();
    let len = chars.len() as i64;
    let bound = |arg: Option<&Value>, default: i64| -> i64 {
        match arg.and_then(Value::as_i64) {
            Some(i) if i < 0 => (len + i).max(0),
            Some(i) => i.min(len),
            None => default,
        }
    };
    let start = bound(args.get(1), 0);
    let end = bound(args.get(2), len);
    if start > end {
        return Ok(Value::from(-1));
    }
    let byte_at = |i: i64| chars.get(i as usize).map_or(s.len(), |(b, _)| *b);
    let (from, to) = (byte_at(start), byte_at(end));
    let window = &s[from..to];
    let found = if reverse {
        window.rfind(sub)
    } else {
        window.find(sub)
    };
    Ok(Value::from(match found {
        Some(byte) => start + window[..byte].chars().count() as i64,
        None => -1,
    }))
}

/// `str.rsplit(sep=None, maxsplit=-1)`.
fn rsplit_method(s: &str, args: &[Value]) -> Result<Value, Error> {
    let sep = args.first().filter(|v| !v.is_none());
    let maxsplit = args.get(1).and_then(Value::as_i64).unwrap_or(-1);
    let mut parts: Vec<String> = Vec::new();
    match sep {
        Some(sep) => {
            let sep = sep.as_str().ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidOperation,
                    "rsplit() separator must be str or None",
                )
            })?;
            if sep.is_empty() {
                return Err(Error::new(ErrorKind::InvalidOperation, "empty separator"));
            }
            if maxsplit < 0 {
                parts.extend(s.split(sep).map(str::to_owned));
            } else {
                parts.extend(s.rsplitn(maxsplit as usize + 1, sep).map(str::to_owned));
                parts.reverse();
            }
        }
        None => {
            // Runs of whitespace separate words; with a limit, the rest keeps its inner whitespace but not its end.
            let mut rest = s.trim_end_matches(is_py_space);
            let mut splits = 0;
            while !rest.is_empty() && (maxsplit < 0 || splits < maxsplit) {
                match rest.rfind(is_py_space) {
                    Some(pos) => {
                        let space_len = rest[pos..].chars().next().map_or(1, char::len_utf8);
                        parts.push(rest[pos + space_len..].to_owned());
                        rest = rest[..pos].trim_end_matches(is_py_space);
                        splits += 1;
                    }
                    None => break,
                }
            }
            if !rest.is_empty() {
                parts.push(rest.to_owned());
            }
            parts.reverse();
        }
    }
    Ok(Value::from(parts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        let cases = [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (0.5, "0.5"),
            (0.1, "0.1"),
            (1.0 / 3.0, "0.3333333333333333"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (123456789.125, "123456789.125"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (-2.5e300, "-2.5e+300"),
            (5e-324, "5e-324"),
            (f64::INFINITY, "inf"),
        ];
        for (f, want) in cases {
            assert_eq!(py_float_repr(f), want, "{f:e}");
        }
    }

    #[test]
    fn str_repr_matches_python() {
        let cases = [
            ("plain", "'plain'"),
            ("it's", "\"it's\""),
            ("both ' and \"", "'both \\' and \"'"),
            ("tab\tnl\n\\", "'tab\\tnl\\n\\\\'"),
            (
                "\u{1}\u{7f}\u{a0}é🤗\u{200b}",
                "'\\x01\\x7f\\xa0é🤗\\u200b'",
            ),
        ];
        for (s, want) in cases {
            let mut out = String::new();
            write_py_str_repr(&mut out, s);
            assert_eq!(out, want);
        }
    }

    #[test]
    fn raise_exception_is_recognised_through_a_macro() {
        let mut env = Environment::new();
        configure(&mut env);
        let source =
            "{% macro check(x) %}{{ raise_exception('bad: ' ~ x) }}{% endmacro %}{{ check(3) }}";
        env.add_template_owned("t", source).unwrap();
        let err = env.get_template("t").unwrap().render(()).unwrap_err();
        assert_eq!(raised_message(&err).as_deref(), Some("bad: 3"));
        let other = env.render_str("{{ 1 + 'a' }}", ()).unwrap_err();
        assert_eq!(raised_message(&other), None);
    }
}
