//! The Alpaca stream: template text, labels, masks, padding, truncation, split and resume determinism.

mod common;

use proxqat::data::{self, alpaca, Batch, Cursor, Encoder, Record, TrainStream, ValSize, IGNORE, PAD_ID};
use proxqat::model::io::load_tokenizer;

fn rec(instruction: &str, input: &str, output: &str) -> Record {
    Record {
        instruction: instruction.into(),
        input: input.into(),
        output: output.into(),
    }
}

fn encoder(max: usize, mask_prompt: bool) -> Encoder {
    let tok = load_tokenizer(&common::assets().join("llama3.2-tokenizer.json")).unwrap();
    Encoder {
        tokenizer: tok,
        eos_id: 128001,
        max_seq_length: max,
        mask_prompt,
    }
}

#[test]
fn prompt_template_is_litgpt_alpaca_byte_for_byte() {
    assert_eq!(
        alpaca::prompt(&rec("Add.", "2 and 3", "5")),
        "Below is an instruction that describes a task, paired with an input that provides further context. \
Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n"
    );
    assert_eq!(
        alpaca::prompt(&rec("Say hi.", "", "hi")),
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n\
### Instruction:\nSay hi.\n\n### Response:\n"
    );
}

#[test]
fn ids_have_bos_prompt_response_eos_and_masks() {
    let e = encoder(512, false);
    let r = rec("Say hi.", "", "hi there");
    let ex = e.encode(&r).unwrap();
    let prompt_ids = e
        .tokenizer
        .encode(alpaca::prompt(&r), false)
        .unwrap()
        .get_ids()
        .to_vec();
    let resp_ids = e.tokenizer.encode("hi there", false).unwrap().get_ids().to_vec();
    assert_eq!(ex.ids[0], 128000, "the Llama-3 tokenizer adds <|begin_of_text|>");
    assert_eq!(&ex.ids[1..1 + prompt_ids.len()], prompt_ids.as_slice());
    assert_eq!(&ex.ids[1 + prompt_ids.len()..ex.ids.len() - 1], resp_ids.as_slice());
    assert_eq!(*ex.ids.last().unwrap(), 128001);
    assert!(
        ex.labels.iter().zip(&ex.ids).all(|(l, i)| *l == *i as i64),
        "no mask: labels = ids"
    );
    let masked = encoder(512, true).encode(&r).unwrap();
    let n_prompt = 1 + prompt_ids.len();
    assert!(masked.labels[..n_prompt].iter().all(|&l| l == IGNORE));
    assert!(masked.labels[n_prompt..].iter().all(|&l| l != IGNORE));
}

#[test]
fn truncation_and_padding() {
    let e = encoder(10, false);
    let long = e
        .encode(&rec("Write a long story about a dragon.", "", "Once upon a time"))
        .unwrap();
    assert_eq!(long.ids.len(), 10);
    assert!(long.truncated);
    let short = data::Example {
        ids: vec![5, 6, 7],
        labels: vec![5, IGNORE, 7],
        truncated: false,
    };
    let b = Batch::from_examples(&[long.clone(), short]);
    assert_eq!((b.rows, b.cols, b.truncated), (2, 10, 1));
    assert_eq!(
        &b.ids[10..],
        &[5, 6, 7, PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID]
    );
    assert_eq!(&b.labels[10..13], &[5, IGNORE, 7]);
    assert!(b.labels[13..].iter().all(|&l| l == IGNORE));
    assert_eq!(b.counted_targets(), 9 + 1);
}

#[test]
fn split_is_seeded_and_complete() {
    let records: Vec<Record> = (0..100).map(|i| rec(&format!("q{i}"), "", &format!("a{i}"))).collect();
    let (t1, v1) = data::split(records.clone(), ValSize::Fraction(0.1), 42).unwrap();
    let (t2, v2) = data::split(records.clone(), ValSize::Fraction(0.1), 42).unwrap();
    let (_, v3) = data::split(records.clone(), ValSize::Fraction(0.1), 43).unwrap();
    assert_eq!((t1.len(), v1.len()), (90, 10));
    assert_eq!((&t1, &v1), (&t2, &v2));
    assert_ne!(v1, v3);
    let mut all: Vec<String> = t1.iter().chain(&v1).map(|r| r.instruction.clone()).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 100);
    assert!(data::split(records.clone(), ValSize::Records(0), 1).is_err());
    assert!(data::split(records, ValSize::Records(100), 1).is_err());
}

#[test]
fn stream_resumes_exactly_from_its_cursor() {
    let records: Vec<Record> = (0..7).map(|i| rec(&format!("q{i}"), "", &format!("a{i}"))).collect();
    let examples = data::encode_all(&records, &encoder(64, false)).unwrap();
    let one_by_one: Vec<_> = records.iter().map(|r| encoder(64, false).encode(r).unwrap()).collect();
    assert_eq!(examples, one_by_one, "tokenizing on all cores keeps the records' order");
    let mut a = TrainStream::new(examples.clone(), 9, Cursor::default());
    let first: Vec<Batch> = (0..3).map(|_| a.next_batch(3)).collect();
    let cursor = a.cursor;
    assert_eq!(
        cursor,
        Cursor { epoch: 1, position: 2 },
        "9 rows over 7 records wrap into epoch 1"
    );
    let rest_a: Vec<Batch> = (0..4).map(|_| a.next_batch(3)).collect();
    let mut b = TrainStream::new(examples, 9, cursor);
    let rest_b: Vec<Batch> = (0..4).map(|_| b.next_batch(3)).collect();
    assert_eq!(rest_a, rest_b);
    assert_ne!(first[0], first[2]);
}

#[test]
fn bad_records_are_refused_by_index_and_field() {
    let err = |text: &str| format!("{:#}", alpaca::parse_records(text).expect_err("must fail"));
    assert!(
        err(r#"[{"instruction": "a", "output": "b"}, {"input": "x", "output": "y"}]"#)
            .contains("record 1 has no `instruction`")
    );
    assert!(err(r#"[{"instruction": "a", "output": 5}]"#).contains("field `output` must be a string"));
    assert!(err(r#"[{"instruction": "a""#).contains("malformed JSON"));
    assert!(err("[]").contains("no records"));
    let ok = alpaca::parse_records(r#"[{"instruction": "a", "output": "b"}]"#).unwrap();
    assert_eq!(ok[0].input, "");
}

#[test]
fn demo_data_parses() {
    let records = alpaca::load_records(&common::assets().join("alpaca_en_demo.json")).unwrap();
    assert_eq!(records.len(), 999);
    assert_eq!(records.iter().filter(|r| !r.input.is_empty()).count(), 412);
}
