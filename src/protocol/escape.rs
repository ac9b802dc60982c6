//! Text on one line: `TOK` text, `ERR` messages, `EVT` details and stop strings are escaped
//! so that no control byte or line end reaches the wire, and unescaped back exactly.

use core::fmt;

/// Writes `text` so it fits on one line: `\` → `\\`, LF → `\n`, CR → `\r`, other control
/// bytes (C0 and DEL) → `\xHH`; everything else, non-ASCII included, as is.
pub fn escape_into(text: &str, out: &mut impl fmt::Write) -> fmt::Result {
    escape(text, false, out)
}

/// The value of `stop` as `GET` shows it: `off`, or each stop string escaped with its spaces
/// as `\x20`, so that `SET stop` with it gives the same strings back.
pub fn write_stop_list(out: &mut impl fmt::Write, stops: &[String]) -> fmt::Result {
    if stops.is_empty() {
        return out.write_str("off");
    }
    for (i, stop) in stops.iter().enumerate() {
        if i > 0 {
            out.write_char(' ')?;
        }
        match stop.chars().next() {
            // A lone `off` would read back as "no stop strings".
            Some(first) if stops.len() == 1 && stop.eq_ignore_ascii_case("off") => {
                write!(out, "\\x{:02X}", first as u32)?;
                escape(&stop[first.len_utf8()..], true, out)?;
            }
            _ => escape(stop, true, out)?,
        }
    }
    Ok(())
}

/// [`escape_into`], also writing spaces as `\x20` when `space` is set.
fn escape(text: &str, space: bool, out: &mut impl fmt::Write) -> fmt::Result {
    let mut start = 0;
    for (at, c) in text.char_indices() {
        let esc: Option<&str> = match c {
            '\\' => Some("\\\\"),
            '\n' => Some("\\n"),
            '\r' => Some("\\r"),
            ' ' if space => None,
            c if (c as u32) < 0x20 || c as u32 == 0x7f => None,
            _ => continue,
        };
        out.write_str(&text[start..at])?;
        match esc {
            Some(e) => out.write_str(e)?,
            None => write!(out, "\\x{:02X}", c as u32)?,
        }
        start = at + c.len_utf8();
    }
    out.write_str(&text[start..])
}

/// The inverse of [`escape_into`]; `\xHH` is limited to ASCII so the result stays UTF-8.
pub fn unescape_into(text: &str, out: &mut impl fmt::Write) -> Result<(), UnescapeError> {
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.write_char(c).map_err(|_| UnescapeError)?;
            continue;
        }
        let c = match chars.next() {
            Some('\\') => '\\',
            Some('n') => '\n',
            Some('r') => '\r',
            Some('t') => '\t',
            Some('x') => {
                let hi = chars.next().and_then(|c| c.to_digit(16));
                let lo = chars.next().and_then(|c| c.to_digit(16));
                match (hi, lo) {
                    (Some(hi), Some(lo)) if hi < 8 => char::from((hi * 16 + lo) as u8),
                    _ => return Err(UnescapeError),
                }
            }
            _ => return Err(UnescapeError),
        };
        out.write_char(c).map_err(|_| UnescapeError)?;
    }
    Ok(())
}

/// An escape sequence that [`unescape_into`] does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad escape sequence (use \\\\, \\n, \\r, \\t or \\xHH below \\x80)")]
pub struct UnescapeError;
