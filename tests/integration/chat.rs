//! Multi-turn chat keeps the KV cache: a second turn prefills only its own tokens and gives
//! the same reply as prefilling the whole conversation at once (greedy, real model).

use crate::common;

use edgelm::chat::Conversation;
use edgelm::convert::Quant;
use edgelm::engine::Engine;
use edgelm::generate::{generate, Flow, GenerateOptions, StopReason};
use edgelm::model::CacheOptions;
use edgelm::sampler::SamplerConfig;

#[test]
fn second_turn_prefills_only_its_tokens_and_equals_a_full_prefill() {
    let engine = Engine::load(&common::default_bundle(Quant::Int8), &Default::default()).unwrap();
    assert!(
        engine.model.has_ring_cache(),
        "our converter's graph is fused"
    );
    let opts = GenerateOptions {
        max_tokens: 40,
        sampler: SamplerConfig::default(),
        stop: vec![],
        eos_ids: engine.eos_ids(),
        ignore_eos: false,
    };
    let mut chat = Conversation::new(&engine, CacheOptions::default(), None).unwrap();
    let first = chat
        .turn("What is the capital of France?", &opts, |_| Flow::Continue)
        .unwrap();
    assert_eq!(first.reason, StopReason::Eos, "{:?}", chat.messages());
    let cached = chat.state().len();
    assert_eq!(cached, first.prompt_tokens + first.generated_tokens - 1);

    let second = chat
        .turn("And of Italy?", &opts, |_| Flow::Continue)
        .unwrap();
    let own = engine
        .tokenizer
        .encode(
            "<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n",
            false,
        )
        .unwrap();
    assert_eq!(second.prompt_tokens, own.len());

    // The same conversation prefilled at once.
    let messages = &chat.messages()[..chat.messages().len() - 1];
    let whole = engine.encode_chat(messages).unwrap();
    assert_eq!(whole.len(), cached + own.len());
    let mut state = engine.model.new_state();
    let once = generate(&mut state, &engine.tokenizer, &whole, &opts, |_, _| {
        Flow::Continue
    })
    .unwrap();
    assert_eq!(second.ids, once.ids);
    assert!(!second.ids.is_empty());
}
