//! Python's `str()` of template values, and the jinja2 filters and tests whose Python
//! behaviour minijinja's built-ins do not share.
//!
//! jinja2 prints a value with `str()`: containers as Python literals (`['a', 'b']`,
//! `{'role': 'user'}`), `None`, `True`, floats as `repr()` does (`1e+20`). Its `round` rounds
//! half to even as Python's `round()` does, and its `sequence` test holds for strings and
//! dicts too. String methods are minijinja-contrib's pycompat ones plus `rsplit`.

use std::fmt::Write as _;

use minijinja::value::ValueKind;
use minijinja::{Error, ErrorKind, Output, State, Value};

use super::json::python_float_repr;

/// Python methods on values: `str.rsplit`, then minijinja-contrib's pycompat set.
pub fn unknown_method(
    state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    if let (Some(s), "rsplit") = (value.as_str(), method) {
        return rsplit(s, args);
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// `str.rsplit(sep=None, maxsplit=-1)`: at most `maxsplit` splits, counted from the right;
/// without `sep`, on runs of whitespace, ignoring it at both ends.
fn rsplit(s: &str, args: &[Value]) -> Result<Value, Error> {
    let bad = || {
        Error::new(
            ErrorKind::InvalidOperation,
            "rsplit takes (sep=None, maxsplit=-1)",
        )
    };
    let sep = match args.first() {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(v.as_str().filter(|s| !s.is_empty()).ok_or_else(bad)?),
    };
    let max = match args.get(1) {
        None => -1,
        Some(v) => i64::try_from(v.clone()).map_err(|_| bad())?,
    };
    if args.len() > 2 {
        return Err(bad());
    }
    let limit = usize::try_from(max).ok();
    let mut parts: Vec<&str> = match sep {
        Some(sep) => match limit {
            Some(n) => s.rsplitn(n + 1, sep).collect(),
            None => s.rsplit(sep).collect(),
        },
        None => {
            let mut parts = Vec::new();
            let mut rest = s.trim_end();
            while !rest.is_empty() {
                if limit.is_some_and(|n| parts.len() == n) {
                    parts.push(rest);
                    break;
                }
                match rest.rfind(char::is_whitespace) {
                    Some(at) => {
                        let ws = rest[at..].chars().next().map_or(1, char::len_utf8);
                        parts.push(&rest[at + ws..]);
                        rest = rest[..at].trim_end();
                    }
                    None => {
                        parts.push(rest);
                        rest = "";
                    }
                }
            }
            parts
        }
    };
    parts.reverse();
    Ok(Value::from_iter(parts.into_iter().map(Value::from)))
}

/// Prints `{{ value }}` as jinja2 does; an undefined value prints nothing.
pub fn formatter(out: &mut Output, _state: &State, value: &Value) -> Result<(), Error> {
    if value.is_undefined() {
        return Ok(());
    }
    out.write_str(&python_str(value))
        .map_err(|e| Error::new(ErrorKind::WriteFailure, "writing the output").with_source(e))
}

/// The `string` filter: Python's `str()`.
pub fn string(value: &Value) -> Value {
    if value.as_str().is_some() {
        return value.clone();
    }
    Value::from(python_str(value))
}

/// The `round` filter: `method` "common" (Python's `round()`, ties to even), "ceil" or
/// "floor", to `precision` decimals. An integer rounded the common way stays an integer.
pub fn round(value: &Value, precision: Option<i32>, method: Option<&str>) -> Result<Value, Error> {
    let precision = precision.unwrap_or(0);
    let method = method.unwrap_or("common");
    if value.is_integer() && method == "common" {
        return Ok(value.clone());
    }
    let x = f64::try_from(value.clone())?;
    let scale = 10f64.powi(precision);
    let rounded = match method {
        // Rust formats the exact binary value, rounding ties to even: Python's `round()`.
        "common" if precision >= 0 => format!("{x:.prec$}", prec = precision as usize)
            .parse::<f64>()
            .unwrap_or(x),
        "common" => (x * scale).round_ties_even() / scale,
        "ceil" => (x * scale).ceil() / scale,
        "floor" => (x * scale).floor() / scale,
        other => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("round: method must be common, ceil or floor, not {other:?}"),
            ))
        }
    };
    Ok(Value::from(rounded))
}

/// The `sequence` test: anything with a length and items, strings and dicts included.
pub fn is_sequence(value: &Value) -> bool {
    matches!(
        value.kind(),
        ValueKind::String | ValueKind::Seq | ValueKind::Map | ValueKind::Iterable
    )
}

/// Python's `str()`: a string as it is, anything else as [`python_repr`].
pub fn python_str(value: &Value) -> String {
    match value.as_str() {
        Some(s) => s.to_string(),
        None => python_repr(value),
    }
}

/// Python's `repr()` of a template value.
pub fn python_repr(value: &Value) -> String {
    let mut out = String::new();
    write_repr(&mut out, value);
    out
}

fn write_repr(out: &mut String, value: &Value) {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number if value.is_integer() => {
            let _ = write!(out, "{value}");
        }
        ValueKind::Number => match f64::try_from(value.clone()) {
            Ok(f) if f.is_nan() => out.push_str("nan"),
            Ok(f) if f.is_infinite() => out.push_str(if f > 0.0 { "inf" } else { "-inf" }),
            Ok(f) => out.push_str(&python_float_repr(f)),
            Err(_) => {
                let _ = write!(out, "{value}");
            }
        },
        ValueKind::String => write_str_repr(out, value.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            if let Ok(items) = value.try_iter() {
                for (i, item) in items.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_repr(out, &item);
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
                    write_repr(out, &key);
                    out.push_str(": ");
                    write_repr(out, &value.get_item(&key).unwrap_or_default());
                }
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{value}");
        }
    }
}

/// Python's string `repr()`: single quotes unless the text has one and no double quote.
fn write_str_repr(out: &mut String, s: &str) {
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
            c if c.is_control() => {
                let _ = match u32::from(c) {
                    n @ 0..=0xFF => write!(out, "\\x{n:02x}"),
                    n => write!(out, "\\u{n:04x}"),
                };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repr_is_pythons() {
        // Expected strings: Python 3's repr() of the same values.
        let v = Value::from_serialize(serde_json::json!({
            "a": ["x", "it's", "say \"hi\"", "both ' \"", "tab\tnl\n\u{1}é"],
            "b": [1, 2.5, 1e20, true, null],
        }));
        assert_eq!(
            python_repr(&v),
            r#"{'a': ['x', "it's", 'say "hi"', 'both \' "', 'tab\tnl\n\x01é'], 'b': [1, 2.5, 1e+20, True, None]}"#
        );
        assert_eq!(python_str(&Value::from("plain")), "plain");
        assert_eq!(python_str(&Value::from(())), "None");
    }

    #[test]
    fn rsplit_is_pythons() {
        // Expected lists: Python's str.rsplit with the same arguments.
        let split = |s: &str, args: &[Value]| python_repr(&rsplit(s, args).unwrap());
        let none = Value::from(());
        assert_eq!(split("a b  c", &[]), "['a', 'b', 'c']");
        assert_eq!(
            split("  a b  c  ", &[none.clone(), Value::from(1)]),
            "['  a b', 'c']"
        );
        assert_eq!(split("a,b,,c", &[Value::from(",")]), "['a', 'b', '', 'c']");
        assert_eq!(
            split("a,b,c", &[Value::from(","), Value::from(1)]),
            "['a,b', 'c']"
        );
        assert_eq!(split("   ", &[]), "[]");
        assert!(rsplit("a", &[Value::from("")]).is_err());
    }

    #[test]
    fn round_is_pythons() {
        // Python: round(2.5), round(3.5), round(2.675, 2), round(-0.5), round(7, 0).
        let r = |x: f64, p: Option<i32>| round(&Value::from(x), p, None).unwrap().to_string();
        assert_eq!(r(2.5, None), "2.0");
        assert_eq!(r(3.5, None), "4.0");
        assert_eq!(r(2.675, Some(2)), "2.67");
        assert_eq!(r(-0.5, None), "-0.0");
        assert_eq!(round(&Value::from(7), None, None).unwrap(), Value::from(7));
        let ceil = round(&Value::from(2.01), Some(1), Some("ceil")).unwrap();
        assert_eq!(ceil.to_string(), "2.1");
        assert!(round(&Value::from(1.0), None, Some("up")).is_err());
    }
}
