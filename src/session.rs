//! Session files: a KV ring (tokens, slots, keys, values), its position and, for a
//! conversation, its transcript, so a board can resume after a reboot without re-prefilling.
//!
//! Layout, little-endian: magic `EDGELMS\0`, version `u32`, twelve `u64`s (layers, kv_heads,
//! head_dim, vocab_size, max_positions, capacity, n_keep, kv type 0=f32/1=f16, used slots,
//! oldest slot, tokens written, next position), the token of each slot (capacity × `u32`), the
//! stamp of each slot (capacity × `u64`); a `u64` count of sliding-window rings and for each
//! its capacity, used slots, oldest slot and tokens written (`u64`s), tokens and stamps as
//! above (no sinks); per layer a `u64` byte count and the keys then values of the used
//! slots of its own ring; then what the cache holds, a `u64`: 0 for a raw completion (nothing
//! follows), 1 for a conversation, followed by its system prompt (`u64` 0 for the template's
//! own, or 1 and a string), a `u64` message count and each message's role and content
//! (strings), and a `u64` count and the ids the cache holds (`u32` each, in order); last an
//! FNV-1a 64 checksum of everything before it. A string is a `u64` byte count and UTF-8.
//!
//! Version 1 files (all of them raw completions: nothing after the layers) are read as raw
//! completions; version 1 and 2 files have no sliding-window rings (and no count of them).

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

use crate::conversation::Transcript;
use crate::kv_cache::{KvType, LayoutParts, RingLayout};
use crate::model::{CacheOptions, Model, State};
use crate::template::Message;

/// First bytes of a session file.
pub const MAGIC: &[u8; 8] = b"EDGELMS\0";
/// The format version this build writes.
pub const VERSION: u32 = 3;
/// The oldest version this build reads.
pub const OLDEST_VERSION: u32 = 1;

/// What a session file restores.
#[derive(Debug)]
pub struct Saved {
    /// The model state: cache contents and position.
    pub state: State,
    /// The conversation the cache holds; `None` for a raw completion.
    pub chat: Option<Transcript>,
}

impl Saved {
    /// The conversation this session (read from `path`) holds, and its state; a raw
    /// completion is an error that says what continues it.
    pub fn into_conversation(self, path: &Path) -> Result<(State, Transcript)> {
        match self.chat {
            Some(chat) => Ok((self.state, chat)),
            None => bail!(
                "session {path:?} holds a raw completion, not a conversation: continue it with \
                 edgelm run without --chat"
            ),
        }
    }

    /// The state of this session (read from `path`) as a raw completion; a conversation is
    /// an error that says what continues it.
    pub fn into_raw(self, path: &Path) -> Result<State> {
        match self.chat {
            None => Ok(self.state),
            Some(_) => bail!(
                "session {path:?} holds a conversation: continue it with edgelm chat or run --chat"
            ),
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Writes `state` (of `model`) and `chat`, the conversation it holds (`None` for a raw
/// completion), to `path`, replacing it atomically.
pub fn save(model: &Model, state: &State, chat: Option<&Transcript>, path: &Path) -> Result<()> {
    let config = model.config();
    let parts = state
        .ring()
        .context("cannot save a session: this model has no ring KV cache")?
        .to_parts();
    let local: Vec<LayoutParts> = state
        .local_rings()
        .iter()
        .map(|r| r.layout.to_parts())
        .collect();
    // Each layer's used slots, in its own ring.
    let used: Vec<usize> = (0..config.num_hidden_layers)
        .map(|l| {
            let ring = state.local_rings().iter().zip(&local);
            let mut own = ring.filter(|(r, _)| r.layers.contains(&l));
            own.next().map_or(parts.used, |(_, p)| p.used)
        })
        .collect();
    // Storage exists from the first forward on; before it the ring is empty.
    let layers = match state.layer_kv() {
        Some(layers) => layers
            .iter()
            .zip(&used)
            .map(|(kv, &used)| kv.export(used))
            .collect(),
        None if parts.used == 0 => vec![Vec::new(); config.num_hidden_layers],
        None => bail!("cannot save a session: the cache has no storage"),
    };
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend(VERSION.to_le_bytes());
    let kv_type = match state.kv_type() {
        KvType::F32 => 0,
        KvType::F16 => 1,
    };
    for v in [
        config.num_hidden_layers as u64,
        config.num_key_value_heads as u64,
        config.head_dim as u64,
        config.vocab_size as u64,
        config.max_position_embeddings as u64,
        parts.capacity as u64,
        parts.n_keep as u64,
        kv_type,
        parts.used as u64,
        parts.oldest as u64,
        parts.written,
        state.position() as u64,
    ] {
        out.extend(v.to_le_bytes());
    }
    parts
        .tokens
        .iter()
        .for_each(|t| out.extend(t.to_le_bytes()));
    parts
        .stamps
        .iter()
        .for_each(|s| out.extend(s.to_le_bytes()));
    out.extend((local.len() as u64).to_le_bytes());
    for p in &local {
        for v in [p.capacity as u64, p.used as u64, p.oldest as u64, p.written] {
            out.extend(v.to_le_bytes());
        }
        p.tokens.iter().for_each(|t| out.extend(t.to_le_bytes()));
        p.stamps.iter().for_each(|s| out.extend(s.to_le_bytes()));
    }
    for bytes in layers {
        out.extend((bytes.len() as u64).to_le_bytes());
        out.extend(bytes);
    }
    match chat {
        None => out.extend(0u64.to_le_bytes()),
        Some(t) => {
            out.extend(1u64.to_le_bytes());
            match &t.system {
                None => out.extend(0u64.to_le_bytes()),
                Some(system) => {
                    out.extend(1u64.to_le_bytes());
                    put_str(&mut out, system);
                }
            }
            out.extend((t.messages.len() as u64).to_le_bytes());
            for m in &t.messages {
                put_str(&mut out, &m.role);
                put_str(&mut out, &m.content);
            }
            out.extend((t.cached.len() as u64).to_le_bytes());
            t.cached.iter().for_each(|id| out.extend(id.to_le_bytes()));
        }
    }
    out.extend(fnv1a(&out).to_le_bytes());
    write_atomically(path, &out)?;
    log::info!(
        "saved session {path:?}: {} tokens, {} bytes",
        parts.used,
        out.len()
    );
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// Replaces `path` by `bytes` so that a full disk, a signal or a power cut leaves either the
/// old file or the new one: write a temporary file beside it, flush it to the device, rename
/// it over `path`, then flush the directory. A failed write removes the temporary file.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("writing session {path:?}: not a file name"))?;
    // Appended, not a replaced extension: `x.tmp` must not be its own temporary file.
    let mut tmp_name = name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let written = (|| -> std::io::Result<()> {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing session {tmp:?}"));
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing session {path:?}"));
    }
    // The rename is durable once the directory is; not every filesystem can sync one.
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads a session saved by [`save`] for `model` into a fresh state.
pub fn load(model: &Model, path: &Path) -> Result<Saved> {
    let bytes = fs::read(path).with_context(|| format!("reading session {path:?}"))?;
    parse(model, &bytes).with_context(|| format!("session file {path:?}"))
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .context("truncated")?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]))
    }

    fn usize(&mut self) -> Result<usize> {
        usize::try_from(self.u64()?).context("a count does not fit in memory")
    }

    fn string(&mut self) -> Result<String> {
        let n = self.usize()?;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).context("a text is not UTF-8")
    }

    /// A conversation's transcript (after its tag).
    fn transcript(&mut self) -> Result<Transcript> {
        let system = match self.u64()? {
            0 => None,
            1 => Some(self.string()?),
            other => bail!("unknown system prompt tag {other}"),
        };
        // Counts are checked by reading, not trusted for allocation.
        let mut messages = Vec::new();
        for _ in 0..self.u64()? {
            let role = self.string()?;
            messages.push(Message::new(role, self.string()?));
        }
        let n = self.usize()?;
        let ids = self.take(n.checked_mul(4).context("truncated")?)?;
        let cached = ids
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(Transcript {
            system,
            messages,
            cached,
        })
    }
}

fn parse(model: &Model, bytes: &[u8]) -> Result<Saved> {
    ensure!(
        bytes.len() >= MAGIC.len() + 4 && &bytes[..MAGIC.len()] == MAGIC,
        "not an edgelm session file"
    );
    let mut r = Reader { bytes, at: 8 };
    let version = r.u32()?;
    ensure!(
        (OLDEST_VERSION..=VERSION).contains(&version),
        "format version {version}; this edgelm reads versions {OLDEST_VERSION} to {VERSION}"
    );
    ensure!(bytes.len() >= 12 + 8, "truncated");
    let (body, sum) = bytes.split_at(bytes.len() - 8);
    let stored = u64::from_le_bytes(sum.try_into().context("truncated")?);
    ensure!(
        fnv1a(body) == stored,
        "checksum mismatch (corrupted or truncated)"
    );
    let mut r = Reader {
        bytes: body,
        at: 12,
    };

    let config = model.config();
    let expected = [
        ("layers", config.num_hidden_layers),
        ("key/value heads", config.num_key_value_heads),
        ("head width", config.head_dim),
        ("vocabulary", config.vocab_size),
        ("context", config.max_position_embeddings),
    ];
    for (what, want) in expected {
        let got = r.usize()?;
        ensure!(
            got == want,
            "saved with a different model ({what} {got}, this model has {want})"
        );
    }
    let capacity = r.usize()?;
    let n_keep = r.usize()?;
    ensure!(
        capacity > 0 && capacity <= config.max_position_embeddings,
        "cache of {capacity} slots does not fit the model's context"
    );
    let kv = match r.u64()? {
        0 => KvType::F32,
        1 => KvType::F16,
        other => bail!("unknown cache type {other}"),
    };
    let used = r.usize()?;
    let oldest = r.usize()?;
    let written = r.u64()?;
    let next_pos = r.usize()?;
    let tokens = (0..capacity).map(|_| r.u32()).collect::<Result<Vec<_>>>()?;
    let stamps = (0..capacity).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
    ensure!(
        tokens[..used.min(capacity)]
            .iter()
            .all(|&t| (t as usize) < config.vocab_size),
        "a token is outside the vocabulary"
    );
    let layout = RingLayout::from_parts(LayoutParts {
        capacity,
        n_keep,
        tokens,
        stamps,
        used,
        oldest,
        written,
    })?;
    let rings = match version {
        1 | 2 => 0,
        _ => r.usize()?,
    };
    ensure!(
        rings <= config.num_hidden_layers,
        "{rings} sliding-window rings for {} layers",
        config.num_hidden_layers
    );
    let mut local = Vec::with_capacity(rings);
    for _ in 0..rings {
        let capacity = r.usize()?;
        ensure!(
            capacity > 0 && capacity <= config.max_position_embeddings,
            "sliding-window ring of {capacity} slots does not fit the model's context"
        );
        let (used, oldest, written) = (r.usize()?, r.usize()?, r.u64()?);
        let tokens = (0..capacity).map(|_| r.u32()).collect::<Result<Vec<_>>>()?;
        let stamps = (0..capacity).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
        ensure!(
            tokens[..used.min(capacity)]
                .iter()
                .all(|&t| (t as usize) < config.vocab_size),
            "a token is outside the vocabulary"
        );
        local.push(RingLayout::from_parts(LayoutParts {
            capacity,
            n_keep: 0,
            tokens,
            stamps,
            used,
            oldest,
            written,
        })?);
    }
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for _ in 0..config.num_hidden_layers {
        let n = r.usize()?;
        layers.push(r.take(n)?.to_vec());
    }
    let chat = match version {
        1 => None,
        _ => match r.u64()? {
            0 => None,
            1 => Some(r.transcript()?),
            other => bail!("unknown contents tag {other}"),
        },
    };
    ensure!(
        r.at == body.len(),
        "{} unexpected trailing bytes",
        body.len() - r.at
    );
    let mut state = model.new_state_with(CacheOptions {
        ctx: capacity,
        kv,
        keep: n_keep,
    })?;
    state.restore(layout, local, next_pos, &layers)?;
    Ok(Saved { state, chat })
}
