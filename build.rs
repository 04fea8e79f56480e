//! With the `cuda` feature, compile kernels/proxqat.cu to PTX (nvcc from the pinned toolchain, see
//! scripts/build-cuda.sh) for src/fused/ to embed. Without it, nothing to do.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=kernels/proxqat.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("proxqat.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let status = Command::new("nvcc")
        .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=sm_{cap}"), "-o"])
        .arg(&out)
        .arg("kernels/proxqat.cu")
        .status()
        .expect("nvcc not found: source the CUDA toolchain's env.sh (scripts/build-cuda.sh does)");
    assert!(status.success(), "nvcc failed on kernels/proxqat.cu");
}
