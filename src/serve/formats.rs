//! The formats a session can select with `SET format NAME`. No path crosses the wire: the
//! server is started with named files (`--grammar NAME=FILE`, `--json-schema NAME=FILE`),
//! compiled once before the first request, and a client picks a name. `json` (any JSON
//! object) is always there, compiled at its first use.

use anyhow::{bail, Result};

use crate::constraint::{Constraint, Format, FormatSource};
use crate::engine::Engine;
use crate::protocol::is_format_name;

/// Names a client can never give to a file: `SET format` reads them as built-ins.
const RESERVED: [&str; 2] = ["off", "json"];

/// A format file named on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedFormat {
    /// What `SET format` calls it.
    pub name: String,
    /// The file.
    pub source: FormatSource,
}

impl NamedFormat {
    /// Parses the `NAME=FILE` argument of `flag` (`--grammar` or `--json-schema`).
    pub fn parse(
        flag: &str,
        arg: &str,
        source: fn(std::path::PathBuf) -> FormatSource,
    ) -> Result<NamedFormat> {
        let Some((name, file)) = arg.split_once('=') else {
            bail!("{flag} {arg:?}: expected NAME=FILE");
        };
        if !is_format_name(name) {
            bail!(
                "{flag} {arg:?}: a name is 1 to 32 letters, digits, '_' or '-' (it is typed in \
                 SET format NAME)"
            );
        }
        if RESERVED.iter().any(|r| r.eq_ignore_ascii_case(name)) {
            bail!("{flag} {arg:?}: \"{name}\" is a built-in format; choose another name");
        }
        if file.is_empty() {
            bail!("{flag} {arg:?}: no file after '='");
        }
        Ok(NamedFormat {
            name: name.to_string(),
            source: source(file.into()),
        })
    }
}

/// Format files read from disk, not yet compiled: reading comes before the model loads, so
/// a mistake in a file is reported at once.
pub(super) fn load(list: &[NamedFormat]) -> Result<Vec<(String, Format)>> {
    let mut out: Vec<(String, Format)> = Vec::with_capacity(list.len());
    for f in list {
        if out.iter().any(|(n, _)| n.eq_ignore_ascii_case(&f.name)) {
            bail!("two formats are named \"{}\"", f.name);
        }
        out.push((f.name.clone(), f.source.load()?));
    }
    Ok(out)
}

/// The compiled formats of a server, shared by its sessions.
pub(super) struct Formats {
    named: Vec<(String, Constraint)>, // sorted by name
    json: Option<Constraint>,         // compiled at first use
}

impl Formats {
    /// Compiles every loaded format; an error names the file and, for grammars, the line
    /// and column.
    pub(super) fn compile(engine: &Engine, loaded: Vec<(String, Format)>) -> Result<Formats> {
        let mut named = Vec::with_capacity(loaded.len());
        for (name, format) in loaded {
            let constraint = engine.compile(&format)?;
            for w in constraint.warnings() {
                log::warn!("{}: {w}", constraint.origin());
            }
            named.push((name, constraint));
        }
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Formats { named, json: None })
    }

    /// Every name `SET format` takes, as `HELP` lists them.
    pub(super) fn names(&self) -> Vec<&str> {
        let mut names = vec!["off", "json"];
        names.extend(self.named.iter().map(|(n, _)| n.as_str()));
        names
    }

    /// The canonical spelling of `name` when it is a format (compiling `json` the first
    /// time); `Ok(None)` when no format has that name.
    pub(super) fn resolve(&mut self, engine: &Engine, name: &str) -> Result<Option<String>> {
        if name.eq_ignore_ascii_case("json") {
            if self.json.is_none() {
                self.json = Some(engine.compile(&Format::json())?);
            }
            return Ok(Some("json".to_string()));
        }
        Ok(self
            .named
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(n, _)| n.clone()))
    }

    /// The compiled format of a name [`Formats::resolve`] returned.
    pub(super) fn get(&self, name: &str) -> Option<&Constraint> {
        if name == "json" {
            return self.json.as_ref();
        }
        self.named.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }

    /// What `SET format` accepts, for its error message.
    pub(super) fn expected(&self) -> String {
        let names = self.names();
        match names.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
            _ => names.join(""),
        }
    }
}
