//! `proxqat plot` on a real (tiny) run's metrics.jsonl.

mod common;

use common::{run_bin, tiny_config, tiny_model_dir};

#[test]
fn plot_draws_a_runs_metrics_as_png_and_svg() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_model_dir(&model, 5);
    let cfg = tiny_config(tmp.path(), &model, "[quant]\nmethod = \"prox\"\n");
    let train = run_bin(&["train", "--config", cfg.to_str().unwrap()], tmp.path());
    assert!(train.status.success(), "{}", String::from_utf8_lossy(&train.stderr));
    let run = tmp.path().join("run");

    let png = tmp.path().join("m.png");
    let out = run_bin(
        &["plot", "--run", run.to_str().unwrap(), "--out", png.to_str().unwrap()],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let reader = decoder.read_info().unwrap();
    assert_eq!((reader.info().width, reader.info().height), (1400, 1200));

    let svg = run.join("metrics.svg");
    let out = run_bin(
        &["plot", "--run", run.to_str().unwrap(), "--out", svg.to_str().unwrap()],
        tmp.path(),
    );
    assert!(out.status.success());
    let text = std::fs::read_to_string(&svg).unwrap();
    for label in [
        "val q (hard)",
        "hit rate",
        "λ (dual variable)",
        "learning rate",
        "<polyline",
    ] {
        assert!(text.contains(label), "the SVG lacks {label:?}");
    }
    // An existing image is kept without --overwrite; a run without metrics is named.
    let again = run_bin(
        &["plot", "--run", run.to_str().unwrap(), "--out", svg.to_str().unwrap()],
        tmp.path(),
    );
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("--overwrite"));
    let none = run_bin(&["plot", "--run", tmp.path().to_str().unwrap()], tmp.path());
    assert!(!none.status.success() && String::from_utf8_lossy(&none.stderr).contains("metrics.jsonl"));
}
