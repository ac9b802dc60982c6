//! The tokenizer.json that `edgelm convert` builds from the GGUF's metadata encodes a mixed
//! corpus to exactly the ids of the reference (transformers' tokenizer for the same GGUF)
//! and decodes back to the same text.

use crate::common;

use edgelm::convert::Quant;
use edgelm::tokenizer::Tokenizer;

#[test]
fn converted_tokenizer_matches_reference_ids_and_round_trips() {
    let bundle = common::default_bundle(Quant::Int8);
    let tok = Tokenizer::from_file(&bundle.join("tokenizer.json")).unwrap();
    let corpus =
        std::fs::read_to_string(common::root().join("tests/fixtures/tokenizer_corpus.txt"))
            .unwrap();
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::root().join("tests/fixtures/tokenizer_corpus_ids.json"))
            .unwrap(),
    )
    .unwrap();
    let want: Vec<u32> = serde_json::from_value(fixture["ids"].clone()).unwrap();
    let got = tok.encode(&corpus, true).unwrap();
    assert_eq!(got.len(), want.len());
    let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "ids differ from the reference");
    assert_eq!(tok.decode(&got, false).unwrap(), corpus);
}

#[test]
fn converted_tokenizer_config_carries_the_chat_template_and_specials() {
    let bundle = common::default_bundle(Quant::Int8);
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(bundle.join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert!(cfg["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
    assert_eq!(cfg["eos_token"], "<|im_end|>");
    let gen: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(bundle.join("generation_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(gen["eos_token_id"], serde_json::json!([2]));
    assert_eq!(gen["bos_token_id"], 1);
}
