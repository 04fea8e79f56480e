//! Export round trips: harden, export (gguf / packed / hf), read back with candle's GGUF reader, with
//! proxqat's loaders and with an independent numpy + PyPI `gguf` reader; compare bit for bit.

mod common;

use common::{bits, run_bin, tiny_config, tiny_model_dir};
use proxqat::model::io::load_model;
use std::path::Path;

fn ok(args: &[&str], cwd: &Path) -> String {
    let out = run_bin(args, cwd);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Export `ckpt` and return the JSON report.
fn export(ckpt: &Path, format: &str, out: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "export",
        "--ckpt",
        ckpt.to_str().unwrap(),
        "--format",
        format,
        "--out",
        out.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(&ok(&args, ckpt.parent().unwrap())).unwrap()
}

fn storage_of(report: &serde_json::Value, name: &str) -> String {
    report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in the report"))["storage"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Every tensor of `a` equals `b`'s bit for bit.
fn assert_same_bits(a: &Path, b: &Path) {
    let (a, b) = (load_model(a).unwrap(), load_model(b).unwrap());
    assert_eq!(
        a.tensors.keys().collect::<Vec<_>>(),
        b.tensors.keys().collect::<Vec<_>>()
    );
    for (name, t) in &a.tensors {
        assert!(bits(t) == bits(&b.tensors[name]), "{name} differs");
    }
    assert_eq!(a.cfg, b.cfg);
}

const ALL_LINEAR: &str = "[quant]\nmethod = \"prox\"\n[quant.select]\nmode = \"all_linear\"\n";

/// A hardened tiny checkpoint (grid given as TOML) and its directory.
fn hardened(tmp: &Path, grid: &str, rope_scaling: bool) -> std::path::PathBuf {
    let model = tmp.join("m");
    tiny_model_dir(&model, 7);
    if rope_scaling {
        let file = model.join("config.json");
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        cfg["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        std::fs::write(&file, cfg.to_string()).unwrap();
    }
    let cfg = tiny_config(tmp, &model, &format!("{ALL_LINEAR}[quant.grid]\n{grid}\n"));
    let out = tmp.join("hard");
    let args = [
        "harden",
        "--ckpt",
        model.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ];
    ok(&[&args[..], &["--all", "--out", out.to_str().unwrap()]].concat(), tmp);
    out
}

#[test]
fn gguf_export_of_a_hardened_model_reads_back_bit_exact() {
    let q = "model.layers.0.self_attn.q_proj.weight";
    let down = "model.layers.1.mlp.down_proj.weight";
    for (grid, rope, want) in [
        ("bits = 4\nscale = \"group\"\ngroup_size = 32", true, "Q4_0"),
        ("bits = 8\nscale = \"group\"\ngroup_size = 64", false, "Q8_0"),
        ("bits = 3\nscale = \"channel\"", false, "Q4_0"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let hard = hardened(tmp.path(), grid, rope);
        let file = tmp.path().join("out.gguf");
        let report = export(&hard, "gguf", &file, &[]);
        assert_eq!(storage_of(&report, q), want, "{grid}");
        assert_eq!(storage_of(&report, down), want, "{grid}");
        assert_eq!(storage_of(&report, "model.embed_tokens.weight"), "F32");
        assert!(report["tensors"].as_array().unwrap().iter().all(|t| t["exact"] == true));
        // candle's GGUF reader (through proxqat's importer: dequantize, un-permute q/k, rope_freqs → llama3).
        assert_same_bits(&file, &hard);
        // The independent reader: PyPI gguf + numpy.
        let checked = common::run_python(&[
            common::repo().join("scripts/export_reference.py").to_str().unwrap(),
            "gguf",
            file.to_str().unwrap(),
            hard.to_str().unwrap(),
        ]);
        let checked: serde_json::Value = serde_json::from_str(&checked).unwrap();
        assert_eq!(checked["mismatched"], 0, "{checked}");
        assert_eq!(checked["compared"], 20, "{checked}");
        assert!(checked["types"].to_string().contains(want), "{checked}");
    }
}

#[test]
fn packed_and_hf_exports_read_back_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let hard = hardened(tmp.path(), "bits = 3\nscale = \"group\"\ngroup_size = 16", false);
    let packed = tmp.path().join("packed");
    let report = export(&hard, "packed", &packed, &[]);
    assert_eq!(
        storage_of(&report, "model.layers.0.mlp.up_proj.weight"),
        "packed 3-bit uniform"
    );
    // 3-bit codes: 64 columns take 24 bytes a row.
    let st = std::fs::read(packed.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    assert_eq!(
        st.tensor("model.layers.0.mlp.up_proj.weight.codes").unwrap().shape(),
        [128, 24]
    );
    assert_eq!(
        st.tensor("model.layers.0.mlp.up_proj.weight.scales").unwrap().shape(),
        [128, 4]
    );
    assert_same_bits(&packed, &hard);
    let checked: serde_json::Value = serde_json::from_str(&common::run_python(&[
        common::repo().join("scripts/export_reference.py").to_str().unwrap(),
        "packed",
        packed.to_str().unwrap(),
        hard.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(checked["mismatched"], 0, "{checked}");
    assert_eq!(checked["compared"], 20, "{checked}");

    let hf = tmp.path().join("hf");
    let report = export(&hard, "hf", &hf, &[]);
    assert!(report["tensors"].as_array().unwrap().iter().all(|t| t["exact"] == true));
    assert_same_bits(&hf, &hard);
    for f in [
        "config.json",
        "tokenizer.json",
        "generation_config.json",
        "model.safetensors",
    ] {
        assert!(hf.join(f).is_file(), "{f} missing");
    }
    // bf16 is half the size and says it rounds.
    let hf16 = tmp.path().join("hf16");
    let report = export(&hard, "hf", &hf16, &["--dtype", "bf16"]);
    assert!(report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["exact"] == false));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf16.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
    // The packed export is a checkpoint proxqat can evaluate.
    ok(
        &[
            "eval",
            "--ckpt",
            packed.to_str().unwrap(),
            "--prompt",
            "a",
            "--max-new-tokens",
            "2",
        ],
        tmp.path(),
    );
}

#[test]
fn tensors_off_the_grid_are_stored_as_floats_and_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_model_dir(&model, 3);
    let cfg = tiny_config(tmp.path(), &model, ALL_LINEAR);
    let file = tmp.path().join("soft.gguf");
    let report = export(&model, "gguf", &file, &["--config", cfg.to_str().unwrap()]);
    let q = report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "model.layers.0.self_attn.q_proj.weight")
        .unwrap()
        .clone();
    assert_eq!(q["storage"], "F32");
    assert!(q["note"].as_str().unwrap().contains("harden --all"), "{q}");
    assert_same_bits(&file, &model);
    // An existing output is refused without --overwrite and left as it was.
    let before = std::fs::read(&file).unwrap();
    let out = run_bin(
        &[
            "export",
            "--ckpt",
            model.to_str().unwrap(),
            "--format",
            "gguf",
            "--out",
            file.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--overwrite"));
    assert_eq!(std::fs::read(&file).unwrap(), before);
}

#[test]
fn ptq_rounds_every_selected_weight_to_nearest_with_scales_from_the_current_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_model_dir(&model, 11);
    let cfg = tiny_config(tmp.path(), &model, "[quant]\nmethod = \"fp\"\n");
    ok(&["train", "--config", cfg.to_str().unwrap()], tmp.path());
    let run = tmp.path().join("run");
    let rtn = tmp.path().join("rtn");
    let report: serde_json::Value = serde_json::from_str(&ok(
        &[
            "ptq",
            "--ckpt",
            run.to_str().unwrap(),
            "--out",
            rtn.to_str().unwrap(),
            "--json",
        ],
        tmp.path(),
    ))
    .unwrap();
    assert_eq!(report["mode"], "rtn");
    assert!(report["moved"].as_u64().unwrap() > 0);

    // Independent f64 recomputation of 4-bit group-32 absmax RTN (scales rounded to f16, ties to even).
    let name = "model.layers.1.mlp.gate_proj.weight";
    let fp = load_model(&proxqat::train::checkpoint::resolve(&run).unwrap()).unwrap();
    let got = load_model(&rtn).unwrap();
    let w = fp.tensors[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let q = got.tensors[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (wg, qg) in w.chunks(32).zip(q.chunks(32)) {
        let absmax = wg.iter().fold(0f64, |a, &x| a.max((x as f64).abs()));
        let s = half::f16::from_f64(absmax / 7.0).to_f64();
        for (&x, &y) in wg.iter().zip(qg) {
            let r = (x as f64 / s).round_ties_even().clamp(-7.0, 7.0);
            assert!((r * s - y as f64).abs() <= 1e-7 * s, "{x} → {y}, expected {}", r * s);
        }
    }
    // Unselected tensors are untouched.
    let embed = "model.embed_tokens.weight";
    assert!(bits(&fp.tensors[embed]) == bits(&got.tensors[embed]));
    // --out equal to the input (the run directory) is refused.
    let out = run_bin(
        &["ptq", "--ckpt", run.to_str().unwrap(), "--out", run.to_str().unwrap()],
        tmp.path(),
    );
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("is the input"));
}
