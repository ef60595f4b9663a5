//! Python's `json.dumps` and `repr` for template values.
//!
//! Chat templates that list tools call `tojson`, and transformers defines it
//! as `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
//! sort_keys=False)`: `", "` and `": "` between items, keys in insertion
//! order, non-ASCII text as is. minijinja's own `tojson` writes compact
//! JSON, escapes `<>&'` for HTML and (without `preserve_order`) sorts keys,
//! so the same template would render different text. Likewise a list or
//! dict printed with `{{ }}` reads as Python's `repr` in transformers.

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Error, ErrorKind, Value};

/// The `tojson` filter: `x | tojson`, `x | tojson(indent=2)`, with
/// `ensure_ascii`, `separators` and `sort_keys` as in Python.
pub fn tojson_filter(value: Value, kwargs: Kwargs) -> Result<String, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_string(),
            None => {
                let n = i64::try_from(v.clone()).map_err(|_| {
                    Error::new(ErrorKind::InvalidOperation, "indent must be a number")
                })?;
                " ".repeat(n.clamp(0, 64) as usize)
            }
        }),
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Value>>("separators")? {
        Some(v) if !v.is_none() => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|p| p.as_str().unwrap_or_default().to_string())
                .collect();
            match parts.as_slice() {
                [a, b] => (a.clone(), b.clone()),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "separators must be two strings",
                    ));
                }
            }
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let options = Options {
        indent,
        item_sep,
        key_sep,
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    dump(&value, &options, 0, &mut out)?;
    Ok(out)
}

struct Options {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

/// Python nests no deeper than its recursion limit; neither does this.
const MAX_DEPTH: usize = 256;

fn dump(value: &Value, o: &Options, depth: usize, out: &mut String) -> Result<(), Error> {
    if depth > MAX_DEPTH {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "tojson: the value nests too deeply",
        ));
    }
    if super::jinja::is_py_none(value) {
        out.push_str("null");
        return Ok(());
    }
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&number(value, true)),
        ValueKind::String => json_string(value.as_str().unwrap_or_default(), o.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            container(out, o, depth, '[', ']', items.len(), |i, out| {
                dump(&items[i], o, depth + 1, out)
            })?;
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if o.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            container(out, o, depth, '{', '}', keys.len(), |i, out| {
                let key = &keys[i];
                match key.as_str() {
                    Some(s) => json_string(s, o.ensure_ascii, out),
                    None => json_string(&key_text(key), o.ensure_ascii, out),
                }
                out.push_str(&o.key_sep);
                dump(&value.get_item(key)?, o, depth + 1, out)
            })?;
        }
        ValueKind::Undefined => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: an undefined value is not JSON serializable",
            ));
        }
        _ => json_string(&value.to_string(), o.ensure_ascii, out),
    }
    Ok(())
}

/// `[`/`{`, the items with Python's separators and indentation, `]`/`}`.
fn container(
    out: &mut String,
    o: &Options,
    depth: usize,
    open: char,
    close: char,
    n: usize,
    mut item: impl FnMut(usize, &mut String) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if n == 0 {
        out.push(close);
        return Ok(());
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    };
    for i in 0..n {
        if i > 0 {
            out.push_str(&o.item_sep);
        }
        newline(out, depth + 1);
        item(i, out)?;
    }
    newline(out, depth);
    out.push(close);
    Ok(())
}

/// A dict key that is not a string, as json.dumps converts it.
fn key_text(key: &Value) -> String {
    match key.kind() {
        ValueKind::None => "null".into(),
        ValueKind::Bool => if key.is_true() { "true" } else { "false" }.into(),
        ValueKind::Number => number(key, true),
        _ => key.to_string(),
    }
}

/// A number as Python writes it: integers as they are, floats as `repr`
/// (`1.0`, `1e-07`, `1e+20`); non-finite ones as json.dumps (`NaN`,
/// `Infinity`) or repr (`nan`, `inf`) write them.
fn number(value: &Value, json: bool) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    let Ok(x) = f64::try_from(value.clone()) else {
        return value.to_string();
    };
    if x.is_nan() {
        return if json { "NaN" } else { "nan" }.into();
    }
    if x.is_infinite() {
        let sign = if x < 0.0 { "-" } else { "" };
        return format!("{sign}{}", if json { "Infinity" } else { "inf" });
    }
    python_float(x)
}

/// Python's `repr(float)`: the shortest round-trip digits, in positional
/// notation for exponents -4..16, else `d.ddde±XX`.
fn python_float(x: f64) -> String {
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let sci = format!("{x:e}"); // shortest digits: "1.5e20", "-1e-7"
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let plain = format!("{x}");
        if plain.contains('.') {
            plain
        } else {
            format!("{plain}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

fn json_string(s: &str, ensure_ascii: bool, out: &mut String) {
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
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr` of a value (how `{{ [1, 'a'] }}` prints in jinja2).
pub fn python_repr(value: &Value) -> String {
    let mut out = String::new();
    repr(value, 0, &mut out);
    out
}

fn repr(value: &Value, depth: usize, out: &mut String) {
    if depth > MAX_DEPTH {
        out.push_str("...");
        return;
    }
    if super::jinja::is_py_none(value) {
        out.push_str("None");
        return;
    }
    match value.kind() {
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => out.push_str(&number(value, false)),
        ValueKind::String => repr_string(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            if let Ok(items) = value.try_iter() {
                for (i, item) in items.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    repr(&item, depth + 1, out);
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
                    repr(&key, depth + 1, out);
                    out.push_str(": ");
                    repr(&value.get_item(&key).unwrap_or_default(), depth + 1, out);
                }
            }
            out.push('}');
        }
        ValueKind::Undefined => {}
        _ => out.push_str(&value.to_string()),
    }
}

/// Single quotes unless the text has one and no double quote, as Python.
fn repr_string(s: &str, out: &mut String) {
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
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str) -> String {
        let mut env = minijinja::Environment::new();
        env.add_filter("tojson", tojson_filter);
        env.render_str(template, ()).unwrap()
    }

    #[test]
    fn tojson_is_pythons_json_dumps() {
        // Expected strings are Python 3's json.dumps(..., ensure_ascii=False).
        assert_eq!(
            render(r#"{{ {"b": 1, "a": [1.0, 2.5, none, true, "é<&>'\"\n"]} | tojson }}"#),
            r#"{"b": 1, "a": [1.0, 2.5, null, true, "é<&>'\"\n"]}"#
        );
        assert_eq!(
            render(r#"{{ {"b": {"c": []}, "a": 1} | tojson(indent=2, sort_keys=true) }}"#),
            "{\n  \"a\": 1,\n  \"b\": {\n    \"c\": []\n  }\n}"
        );
        assert_eq!(
            render(r#"{{ ["é", 1e20, 1e-7, 0.1] | tojson(ensure_ascii=true) }}"#),
            r#"["\u00e9", 1e+20, 1e-07, 0.1]"#
        );
    }

    #[test]
    fn repr_is_pythons() {
        assert_eq!(
            python_repr(&Value::from_iter([
                Value::from("it's"),
                Value::from(1.5),
                Value::from(()),
                Value::from("a\nb")
            ])),
            r#"["it's", 1.5, None, 'a\nb']"#
        );
    }
}
