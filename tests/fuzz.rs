//! Bounded fuzzing (proptest) of the parsers that read user files: the Alpaca data parser, the
//! config parser with `--set` overrides, and the safetensors reader. Each must return Ok or a clean
//! error for any input: never panic. Case counts keep the whole file under a minute on CI's 2 cores;
//! PROPTEST_CASES raises them for a longer local run.

mod common;

use proptest::prelude::*;
use proxqat::config::Config;
use proxqat::data::alpaca::parse_records;

fn cases(default: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Byte edits applied to a valid text: (position fraction, bytes removed, bytes inserted).
fn mutate(text: &str, edits: &[(f64, usize, Vec<u8>)]) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for (at, remove, insert) in edits {
        let at = ((bytes.len() as f64) * at) as usize;
        let end = (at + remove).min(bytes.len());
        bytes.splice(at..end, insert.iter().copied());
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn edits() -> impl Strategy<Value = Vec<(f64, usize, Vec<u8>)>> {
    prop::collection::vec(
        (
            0.0..1.0f64,
            0usize..12,
            prop::collection::vec(
                prop::sample::select(b"{}[]\",:=.\\\n #0123456789-eE+aZtruefalsnl\xc3\xa9".to_vec()),
                0..6,
            ),
        ),
        1..6,
    )
}

/// Arbitrary JSON (depth-limited) for the data parser.
fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        ".{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::btree_map(
                prop::sample::select(vec!["instruction", "input", "output", "x", ""]).prop_map(String::from),
                inner,
                0..4
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(cases(3000))]

    #[test]
    fn data_parser_never_panics_on_arbitrary_json(value in json()) {
        if let Ok(records) = parse_records(&value.to_string()) {
            // Ok means the shape was right: a non-empty array of objects with string fields.
            let items = value.as_array().expect("only arrays parse");
            prop_assert_eq!(records.len(), items.len());
            prop_assert!(!records.is_empty());
        }
    }

    #[test]
    fn data_parser_never_panics_on_mutated_demo_records(e in edits()) {
        let text = r#"[{"instruction": "Name a color.", "input": "", "output": "Blue."},
                       {"instruction": "Add", "input": "2 and 3", "output": "5"}]"#;
        let _ = parse_records(&mutate(text, &e));
    }

    #[test]
    fn data_parser_never_panics_on_arbitrary_text(text in "\\PC{0,64}") {
        let _ = parse_records(&text);
    }

    #[test]
    fn config_parser_never_panics_on_mutated_configs(e in edits(), which in 0usize..2) {
        let file = ["configs/alpaca.toml", "configs/demo.toml"][which];
        let text = std::fs::read_to_string(common::repo().join(file)).unwrap();
        let _ = Config::parse(&mutate(&text, &e), &[]);
    }

    #[test]
    fn config_overrides_never_panic(key in "[a-z_.]{0,24}", value in "\\PC{0,16}") {
        let text = std::fs::read_to_string(common::repo().join("configs/demo.toml")).unwrap();
        let _ = Config::parse(&text, &[format!("{key}={value}")]);
        let _ = Config::parse(&text, std::slice::from_ref(&key));
    }
}

proptest! {
    #![proptest_config(cases(500))]

    #[test]
    fn safetensors_reader_never_panics_on_corrupt_files(e in edits()) {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("model.safetensors");
        let t = candle_core::Tensor::arange(0f32, 64., &candle_core::Device::Cpu).unwrap().reshape((8, 8)).unwrap();
        candle_core::safetensors::save(&std::collections::HashMap::from([("w".to_string(), t)]), &file).unwrap();
        let bytes = std::fs::read(&file).unwrap();
        // Edit the header region (the first ~100 bytes) and, at times, the data.
        let mut edited = bytes.clone();
        for (at, remove, insert) in &e {
            let at = ((edited.len().min(120) as f64) * at) as usize;
            let end = (at + remove).min(edited.len());
            edited.splice(at..end, insert.iter().copied());
        }
        std::fs::write(&file, &edited).unwrap();
        let _ = proxqat::model::io::load_safetensors_file(&file);
    }
}
