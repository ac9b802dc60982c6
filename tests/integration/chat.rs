//! The conversation shared by `edgelm chat` and `edgelm serve`: a turn prefills only what the
//! cache lacks and replies as if the whole conversation were prefilled at once; a conversation
//! that outgrows the cache drops its oldest exchanges whole; a refused turn changes nothing.

use crate::common;

use std::io::Write;
use std::process::{Output, Stdio};

use edgelm::constraint::Format;
use edgelm::conversation::{Conversation, TooLong};
use edgelm::convert::Quant;
use edgelm::engine::Engine;
use edgelm::generate::{generate, Event, Flow, GenerateOptions, Generation, StopReason};
use edgelm::kv_cache::KvType;
use edgelm::model::{CacheOptions, LoadOptions};
use edgelm::sampler::SamplerConfig;
use edgelm::template::Message;

fn greedy(engine: &Engine, max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampler: SamplerConfig::default(),
        stop: vec![],
        eos_ids: engine.eos_ids(),
        ignore_eos: false,
    }
}

/// One whole turn: prepare, then reply.
fn turn(chat: &mut Conversation, user: &str, opts: &GenerateOptions) -> Generation {
    let turn = chat.prepare(user, opts.max_tokens).unwrap();
    chat.reply(turn, opts, |_| Flow::Continue).unwrap()
}

/// What a fresh state generates for `messages` prefilled at once.
fn from_scratch(engine: &Engine, messages: &[Message], opts: &GenerateOptions) -> Generation {
    let ids = engine.encode_chat(messages).unwrap();
    let mut state = engine.model.new_state();
    generate(&mut state, &engine.tokenizer, &ids, opts, |_, _| {
        Flow::Continue
    })
    .unwrap()
}

#[test]
fn second_turn_prefills_only_its_tokens_and_equals_a_full_prefill() {
    let engine = Engine::load(&common::default_bundle(Quant::Int8), &Default::default()).unwrap();
    assert!(
        engine.model.has_ring_cache(),
        "our converter's graph is fused"
    );
    let opts = greedy(&engine, 40);
    let state = engine
        .model
        .new_state_with(CacheOptions::default())
        .unwrap();
    let mut chat = Conversation::new(&engine, state, None);
    let first = turn(&mut chat, "What is the capital of France?", &opts);
    assert_eq!(first.reason, StopReason::Eos, "{:?}", chat.messages());
    let cached = chat.state().len();
    assert_eq!(cached, first.prompt_tokens + first.generated_tokens - 1);

    let prepared = chat.prepare("And of Italy?", opts.max_tokens).unwrap();
    assert_eq!(prepared.dropped_exchanges(), 0);
    let own = engine
        .tokenizer
        .encode(
            "<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n",
            false,
        )
        .unwrap();
    assert_eq!(prepared.prefill_tokens(), own.len());
    let second = chat.reply(prepared, &opts, |_| Flow::Continue).unwrap();
    assert_eq!(second.prompt_tokens, own.len());

    // The same conversation prefilled at once.
    let messages = &chat.messages()[..chat.messages().len() - 1];
    assert_eq!(
        engine.encode_chat(messages).unwrap().len(),
        cached + own.len()
    );
    let once = from_scratch(&engine, messages, &opts);
    assert_eq!(second.ids, once.ids);
    assert!(!second.ids.is_empty());
}

/// The tiny Llama, with SmolLM2's chat template.
fn tiny() -> Engine {
    let opts = LoadOptions {
        threads: 1,
        ..Default::default()
    };
    Engine::load(&crate::serve::chat_bundle(), &opts).unwrap()
}

/// A conversation on the tiny Llama with a cache of its whole context (256 slots) and
/// [`SYSTEM`]. With replies of at most 8 tokens a turn takes about 85 slots, so the third
/// does not fit with the first two.
fn tiny_chat(engine: &Engine) -> Conversation<'_> {
    let cache = CacheOptions {
        ctx: 256,
        kv: KvType::default(),
        keep: 4,
    };
    let state = engine.model.new_state_with(cache).unwrap();
    Conversation::new(engine, state, Some(SYSTEM.into()))
}

/// The replies of [`tiny_chat`] to `questions`, greedy, at most `max_tokens` each.
pub(crate) fn tiny_replies(questions: &[&str], max_tokens: usize) -> Vec<String> {
    let engine = tiny();
    let opts = greedy(&engine, max_tokens);
    let mut chat = tiny_chat(&engine);
    let mut replies = vec![];
    for user in questions {
        let prepared = chat.prepare(user, max_tokens).unwrap();
        let mut reply = String::new();
        chat.reply(prepared, &opts, |event| {
            if let Event::Token(_, text) | Event::Tail(text) = event {
                reply.push_str(text);
            }
            Flow::Continue
        })
        .unwrap();
        replies.push(reply);
    }
    replies
}

pub(crate) const SYSTEM: &str = "Be brief.";
pub(crate) const QUESTIONS: [&str; 3] = ["Hi!", "What now?", "Why?"];

fn with_system(messages: &[Message]) -> Vec<Message> {
    let mut all = vec![Message::new("system", SYSTEM)];
    all.extend_from_slice(messages);
    all
}

#[test]
fn a_conversation_outgrowing_the_cache_drops_its_oldest_exchanges_whole() {
    let engine = tiny();
    let opts = greedy(&engine, 8);
    let mut chat = tiny_chat(&engine);
    // Each turn until the last fits with every earlier one, and replies as a full prefill.
    for user in &QUESTIONS[..2] {
        let before = chat.messages().to_vec();
        let prepared = chat.prepare(user, opts.max_tokens).unwrap();
        assert_eq!(prepared.dropped_exchanges(), 0, "{user}");
        let gen = chat.reply(prepared, &opts, |_| Flow::Continue).unwrap();
        let mut asked = before;
        asked.push(Message::new("user", *user));
        assert_eq!(
            gen.ids,
            from_scratch(&engine, &with_system(&asked), &opts).ids
        );
        assert_eq!(chat.messages()[..asked.len()], asked[..]);
    }
    assert_eq!(chat.messages().len(), 4);

    // The third does not fit with the first exchange: that one goes, whole.
    let before = chat.messages().to_vec();
    let user = QUESTIONS[2];
    let prepared = chat.prepare(user, opts.max_tokens).unwrap();
    assert_eq!(prepared.dropped_exchanges(), 1);
    let mut kept = before[2..].to_vec();
    kept.push(Message::new("user", user));
    let whole = engine.encode_chat(&with_system(&kept)).unwrap();
    assert!(whole.len() + 8 <= 256);
    let mut untrimmed = with_system(&before);
    untrimmed.push(Message::new("user", user));
    assert!(engine.encode_chat(&untrimmed).unwrap().len() + 8 > 256);
    // The front changed, so nothing cached is reused.
    assert_eq!(prepared.prefill_tokens(), whole.len());
    let gen = chat.reply(prepared, &opts, |_| Flow::Continue).unwrap();
    assert_eq!(gen.prompt_tokens, whole.len());
    assert_eq!(
        gen.ids,
        from_scratch(&engine, &with_system(&kept), &opts).ids
    );
    assert_eq!(chat.messages()[..kept.len()], kept[..]);
    assert_eq!(chat.messages().len(), kept.len() + 1);
    assert_eq!(chat.messages()[kept.len()].role, "assistant");
}

#[test]
fn a_refused_turn_leaves_the_conversation_and_its_cache_as_they_were() {
    let engine = tiny();
    let opts = greedy(&engine, 8);
    let mut chat = tiny_chat(&engine);
    turn(&mut chat, QUESTIONS[0], &opts);
    let (messages, cached) = (chat.messages().to_vec(), chat.state().len());

    let long = "blah ".repeat(60);
    let err = chat.prepare(&long, opts.max_tokens).unwrap_err();
    let alone = engine
        .encode_chat(&with_system(&[Message::new("user", long.as_str())]))
        .unwrap();
    assert_eq!(
        err.downcast_ref::<TooLong>(),
        Some(&TooLong {
            needed: alone.len(),
            ctx: 256,
            reserve: 8
        })
    );
    assert_eq!(
        err.to_string(),
        format!(
            "the message needs {} tokens; the context holds 256 with 8 kept for the reply",
            alone.len()
        )
    );
    assert_eq!(chat.messages(), messages);
    assert_eq!(chat.state().len(), cached);

    // A turn prepared before a change is refused, and changes nothing either.
    let stale = chat.prepare(QUESTIONS[1], opts.max_tokens).unwrap();
    chat.set_system(Some(SYSTEM.into()));
    let err = chat.reply(stale, &opts, |_| Flow::Continue).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the conversation changed since this turn was prepared"
    );
    assert_eq!(chat.messages(), messages);

    // The conversation goes on as if nothing had been asked.
    let gen = turn(&mut chat, QUESTIONS[1], &opts);
    let mut asked = messages;
    asked.push(Message::new("user", QUESTIONS[1]));
    assert_eq!(
        gen.ids,
        from_scratch(&engine, &with_system(&asked), &opts).ids
    );
}

/// `edgelm chat` runs the same conversation: its replies are the library's, and it says
/// when it drops an exchange.
#[test]
fn chat_command_trims_like_the_library() {
    let mut expected: String = tiny_replies(&QUESTIONS, 8)
        .iter()
        .map(|reply| format!("> {reply}\n"))
        .collect();
    expected.push_str("> \n");

    let out = chat_command(
        &["--ctx", "256", "--keep", "4", "--system", SYSTEM],
        &QUESTIONS,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        ["[conversation too long: dropped the oldest 1 exchange(s)]"]
    );
}

/// `edgelm chat` on the tiny Llama with SmolLM2's template, one thread, at most 8 tokens per
/// reply, with `args`; the lines of `input` typed in, then end of input.
pub(crate) fn chat_command(args: &[&str], input: &[&str]) -> Output {
    let mut child = common::edgelm_command()
        .args(["chat", "-m"])
        .arg(crate::serve::chat_bundle())
        .args(["-t", "1", "-n", "8"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for line in input {
        writeln!(stdin, "{line}").unwrap();
    }
    drop(stdin);
    child.wait_with_output().unwrap()
}

/// A reply that completes its format ends without an end-of-turn token; the next turn
/// renders it with the template's marker and replies as a fresh prefill of the whole
/// conversation does.
#[test]
fn a_turn_after_a_reply_that_completed_its_format_equals_a_full_prefill() {
    let engine = tiny();
    let opts = greedy(&engine, 8);
    let mut chat = tiny_chat(&engine);
    let yn = Format::grammar("start: \"yes\" | \"no\"\n", "yes/no").unwrap();
    let constraint = engine.compile(&yn).unwrap();
    let mut matcher = constraint.matcher();
    let prepared = chat.prepare("Is it on?", 8).unwrap();
    let gen = chat
        .reply_constrained(prepared, &opts, Some(&mut matcher), |_| Flow::Continue)
        .unwrap();
    assert_eq!(gen.reason, StopReason::Grammar);
    let answer = chat.messages()[1].content.clone();
    assert!(answer == "yes" || answer == "no", "{answer:?}");
    assert!(!gen.ids.iter().any(|id| engine.eos_ids().contains(id)));

    let second = turn(&mut chat, "Why?", &opts);
    let whole = with_system(&[
        Message::new("user", "Is it on?"),
        Message::new("assistant", answer.as_str()),
        Message::new("user", "Why?"),
    ]);
    assert_eq!(second.ids, from_scratch(&engine, &whole, &opts).ids);
}

/// `edgelm chat --grammar FILE`: every reply follows the grammar.
#[test]
fn chat_command_follows_a_grammar() {
    let yn = common::scratch("chat_grammar", "yn").join("yn.lark");
    std::fs::write(&yn, "start: \"yes\" | \"no\"\n").unwrap();
    let yn = yn.display().to_string();
    let out = chat_command(
        &["--ctx", "256", "--temp", "0.8", "--grammar", &yn],
        &QUESTIONS,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let replies: Vec<&str> = stdout.lines().collect();
    assert_eq!(replies.len(), QUESTIONS.len() + 1, "{stdout:?}");
    for reply in &replies[..QUESTIONS.len()] {
        assert!(*reply == "> yes" || *reply == "> no", "{stdout:?}");
    }
    assert_eq!(replies[QUESTIONS.len()], "> ");
}
