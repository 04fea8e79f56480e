use clap::Parser;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("PROXQAT_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = proxqat::cli::Cli::parse();
    if let Err(e) = proxqat::commands::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
