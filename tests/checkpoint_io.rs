//! HF checkpoints: save → load is bit-exact; missing, extra or wrong-shape tensors are refused by name.

mod common;

use candle_core::{DType, Device, Tensor};
use proxqat::model::io;
use proxqat::model::{LlamaConfig, Params};
use std::collections::BTreeMap;

fn saved(tensors: &BTreeMap<String, Tensor>, cfg: &LlamaConfig) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    io::save_hf(
        dir.path(),
        cfg,
        tensors,
        &common::tiny_tokenizer(40),
        candle_core::DType::F32,
    )
    .unwrap();
    dir
}

#[test]
fn save_then_load_is_bit_exact() {
    for tied in [true, false] {
        let cfg = LlamaConfig::tiny(40, tied);
        let params = Params::random(&cfg, 11, DType::F32, &Device::Cpu).unwrap();
        let dir = saved(&params.to_tensors(), &cfg);
        let loaded = io::load_model(dir.path()).unwrap();
        assert_eq!(loaded.cfg, cfg);
        assert_eq!(loaded.tensors.len(), params.vars.len());
        for (name, t) in params.to_tensors() {
            let (a, b) = (common::bits(&t), common::bits(&loaded.tensors[&name]));
            assert_eq!(a, b, "{name} changed in the round trip");
        }
        Params::from_tensors(&loaded.cfg, loaded.tensors, DType::F32).unwrap();
    }
}

#[test]
fn bf16_checkpoints_load_as_f32() {
    let cfg = LlamaConfig::tiny(40, true);
    let params = Params::random(&cfg, 12, DType::F32, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    io::save_safetensors(&params.to_tensors(), DType::BF16, &dir.path().join("model.safetensors")).unwrap();
    let loaded = io::load_safetensors_dir(dir.path()).unwrap();
    let name = "model.layers.0.mlp.up_proj.weight";
    assert_eq!(loaded[name].dtype(), DType::F32);
    let expect = params.to_tensors()[name]
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let diff = (&loaded[name] - expect)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
}

#[test]
fn sharded_checkpoints_load() {
    let cfg = LlamaConfig::tiny(40, true);
    let params = Params::random(&cfg, 13, DType::F32, &Device::Cpu).unwrap();
    let dir = saved(&params.to_tensors(), &cfg);
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    let mut map = serde_json::Map::new();
    for (i, (name, t)) in params.to_tensors().into_iter().enumerate() {
        let file = if i % 2 == 0 {
            "model-00001-of-00002.safetensors"
        } else {
            "model-00002-of-00002.safetensors"
        };
        map.insert(name.clone(), file.into());
        if i % 2 == 0 {
            a.insert(name, t)
        } else {
            b.insert(name, t)
        };
    }
    io::save_safetensors(&a, DType::F32, &dir.path().join("model-00001-of-00002.safetensors")).unwrap();
    io::save_safetensors(&b, DType::F32, &dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": map}).to_string(),
    )
    .unwrap();
    let loaded = io::load_model(dir.path()).unwrap();
    assert_eq!(loaded.tensors.len(), params.vars.len());
}

#[test]
fn missing_extra_and_misshapen_tensors_are_named() {
    let cfg = LlamaConfig::tiny(40, false);
    let params = Params::random(&cfg, 14, DType::F32, &Device::Cpu).unwrap();
    let check = |tensors: BTreeMap<String, Tensor>, needle: &str| {
        let dir = saved(&tensors, &cfg);
        let loaded = io::load_model(dir.path()).unwrap();
        let err = format!(
            "{:#}",
            Params::from_tensors(&cfg, loaded.tensors, DType::F32)
                .err()
                .expect("must fail")
        );
        assert!(err.contains(needle), "error {err:?} does not name {needle}");
    };
    let mut missing = params.to_tensors();
    missing.remove("model.layers.1.mlp.down_proj.weight");
    check(missing, "model.layers.1.mlp.down_proj.weight");
    let mut extra = params.to_tensors();
    extra.insert(
        "model.layers.9.mlp.up_proj.weight".into(),
        Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
    );
    check(extra, "model.layers.9.mlp.up_proj.weight");
    let mut wrong = params.to_tensors();
    wrong.insert(
        "model.layers.0.self_attn.k_proj.weight".into(),
        Tensor::zeros((3, 64), DType::F32, &Device::Cpu).unwrap(),
    );
    check(wrong, "model.layers.0.self_attn.k_proj.weight");
}

#[test]
fn config_json_errors_name_the_field() {
    let err = LlamaConfig::from_hf_json(
        r#"{"model_type":"llama","vocab_size":10,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2}"#,
    )
    .err()
    .unwrap();
    assert!(format!("{err:#}").contains("hidden_size"));
    let err = LlamaConfig::from_hf_json(r#"{"hidden_size":8,"vocab_size":10,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"rope_scaling":{"rope_type":"yarn","factor":2}}"#)
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("yarn"));
    let llama = LlamaConfig::llama_3_2_1b();
    assert_eq!(LlamaConfig::from_hf_json(&llama.to_hf_json()).unwrap(), llama);
    assert_eq!(llama.num_params(), 1_235_814_400);
}
