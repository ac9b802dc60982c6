//! One conversation: the chat history, the model state holding it, and the rules that
//! `edgelm chat` and `edgelm serve` share.
//!
//! - **Cache reuse by token prefix.** A turn renders the whole history with the chat template
//!   and tokenizes it. When the ids the cache holds are a prefix of that, only the rest is
//!   prefilled; otherwise the cache is cleared and everything is. Ids are compared, not text,
//!   because ids are what the cache holds: a reply that tokenizes differently once rendered,
//!   a template that trims or rewrites earlier turns, or a changed system prompt all show up
//!   as a mismatch.
//! - **Trimming.** A turn must fit the cache with room left for the reply (`max_tokens`, at
//!   most a quarter of the cache). Until it does, the oldest exchanges (a user turn and its
//!   reply) are dropped whole; the caller is told how many before anything is generated. A
//!   message that does not fit even alone is [`TooLong`].
//! - **Errors leave the conversation as it was.** [`Conversation::prepare`] changes nothing;
//!   [`Conversation::reply`] changes the history only once the reply is done (a cancelled
//!   reply counts, with the text streamed so far). A failed reply may lose the cache, which
//!   the next turn rebuilds from the history.
//! - **Wrapping.** A reply longer than the room left wraps the KV ring
//!   ([`Event::Shift`]); the cache then no longer holds a prefix of the history, and the next
//!   turn is prefilled afresh (trimmed to fit).
//!
//! Raw completions (`GEN`, `edgelm run`) are no part of a conversation; [`Conversation::lend_cache`]
//! lets one use the conversation's KV storage, so a session allocates one cache, not two.

use anyhow::{ensure, Result};

use crate::engine::Engine;
use crate::generate::{generate_events, Event, Flow, GenerateOptions, Generation};
use crate::model::State;
use crate::template::Message;

/// A chat with the model, kept between turns.
pub struct Conversation<'e> {
    engine: &'e Engine,
    state: State,
    /// The system prompt; `None` leaves the template's own.
    system: Option<String>,
    /// User and assistant turns, alternating, oldest first (no system message).
    messages: Vec<Message>,
    /// The ids the cache holds, in order; (state.len(),).
    cached: Vec<u32>,
    /// Bumped by every change, so a [`Turn`] prepared before one is refused.
    revision: u64,
}

/// A user turn fitted to the cache by [`Conversation::prepare`], ready for
/// [`Conversation::reply`].
#[derive(Debug)]
pub struct Turn {
    user: String,
    /// The whole prompt: system, the kept history, this turn and the generation prompt.
    ids: Vec<u32>,
    /// Leading ids of `ids` the cache already holds.
    reused: usize,
    /// Oldest messages to drop from the history.
    drop_messages: usize,
    /// Exchanges those messages make up.
    dropped: usize,
    revision: u64,
}

impl Turn {
    /// Exchanges (a user turn and its reply) dropped from the front of the history so that
    /// this turn fits.
    pub fn dropped_exchanges(&self) -> usize {
        self.dropped
    }

    /// Tokens the reply will prefill (the ones the cache does not hold yet).
    pub fn prefill_tokens(&self) -> usize {
        self.ids.len() - self.reused
    }
}

/// A message that does not fit the cache even with every earlier exchange dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the message needs {needed} tokens; the context holds {ctx} with {reserve} kept for the reply"
)]
pub struct TooLong {
    /// Tokens of the system prompt, the message and the generation prompt.
    pub needed: usize,
    /// Slots of the cache.
    pub ctx: usize,
    /// Slots kept free for the reply.
    pub reserve: usize,
}

impl<'e> Conversation<'e> {
    /// An empty conversation on `state` (whatever it holds is replaced at the first turn),
    /// with `system` as its system prompt (`None`: the template's own).
    pub fn new(engine: &'e Engine, state: State, system: Option<String>) -> Conversation<'e> {
        Conversation {
            engine,
            state,
            system,
            messages: vec![],
            cached: vec![],
            revision: 0,
        }
    }

    /// The model state: cache contents, position, capacity.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// User and assistant turns so far, oldest first.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// Replaces the system prompt; the next turn re-prefills from the start.
    pub fn set_system(&mut self, system: Option<String>) {
        self.system = system;
        self.revision += 1;
    }

    /// Forgets every turn and the cache (keeps the system prompt and the cache's storage).
    pub fn reset(&mut self) {
        self.messages.clear();
        self.forget_cache();
    }

    /// The cache, emptied, for a raw completion that is no part of the conversation. The
    /// history is kept and prefilled again at the next turn.
    pub fn lend_cache(&mut self) -> &mut State {
        self.forget_cache();
        &mut self.state
    }

    /// Fits the user's message to the cache: renders the conversation with it, dropping the
    /// oldest exchanges while it would leave less than `max_tokens` (at most a quarter of the
    /// cache) for the reply. Changes nothing.
    pub fn prepare(&self, user: &str, max_tokens: usize) -> Result<Turn> {
        let ctx = self.state.capacity();
        let reserve = max_tokens.min(ctx / 4).max(1);
        let mut from = 0;
        let mut dropped = 0;
        let ids = loop {
            let mut all = Vec::with_capacity(self.messages.len() - from + 2);
            if let Some(system) = &self.system {
                all.push(Message::new("system", system.as_str()));
            }
            all.extend_from_slice(&self.messages[from..]);
            all.push(Message::new("user", user));
            let ids = self.engine.encode_chat(&all)?;
            if ids.len() + reserve <= ctx {
                break ids;
            }
            if from == self.messages.len() {
                return Err(TooLong {
                    needed: ids.len(),
                    ctx,
                    reserve,
                }
                .into());
            }
            from += (self.messages.len() - from).min(2);
            dropped += 1;
        };
        let reused = if !self.cached.is_empty()
            && self.cached.len() < ids.len()
            && ids.starts_with(&self.cached)
        {
            self.cached.len()
        } else {
            0
        };
        Ok(Turn {
            user: user.to_string(),
            ids,
            reused,
            drop_messages: from,
            dropped,
            revision: self.revision,
        })
    }

    /// Generates the reply to `turn` (from [`Conversation::prepare`], with nothing changed
    /// since), prefilling only what the cache lacks. On success the history drops the
    /// exchanges the turn dropped and gains the turn and its reply (the text streamed, also
    /// when cancelled); on error the history is as it was.
    pub fn reply(
        &mut self,
        turn: Turn,
        opts: &GenerateOptions,
        mut on_event: impl FnMut(Event) -> Flow,
    ) -> Result<Generation> {
        ensure!(
            turn.revision == self.revision,
            "the conversation changed since this turn was prepared"
        );
        self.revision += 1;
        if turn.reused == 0 {
            self.forget_cache();
        }
        let mut reply = String::new();
        let mut shifted = false;
        let result = generate_events(
            &mut self.state,
            &self.engine.tokenizer,
            &turn.ids[turn.reused..],
            opts,
            |event| {
                match event {
                    Event::Token(_, text) | Event::Tail(text) => reply.push_str(text),
                    Event::Shift(_) => shifted = true,
                }
                on_event(event)
            },
        );
        let gen = match result {
            Ok(gen) => gen,
            Err(e) => {
                // The state may hold part of this turn.
                self.forget_cache();
                return Err(e);
            }
        };
        // `generate` feeds back every sampled id but the last.
        self.cached = turn.ids;
        self.cached
            .extend_from_slice(&gen.ids[..gen.ids.len().saturating_sub(1)]);
        if shifted {
            // The ring dropped tokens from the middle: what it holds is no prefix of the
            // history any more.
            self.forget_cache();
        }
        debug_assert_eq!(self.cached.len(), self.state.len());
        self.messages.drain(..turn.drop_messages);
        self.messages.push(Message::new("user", turn.user));
        self.messages.push(Message::new("assistant", reply));
        Ok(gen)
    }

    fn forget_cache(&mut self) {
        self.state.reset();
        self.cached.clear();
        self.revision += 1;
    }
}
