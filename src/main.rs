//! `provisioner`: parses the command line and hands over to the library.

use clap::Parser;
use provisioner::cli::{self, Cli};
use provisioner::config::Settings;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    provisioner::telemetry::init_tracing(&settings.log);
    // Collected while loading, before logging existed; said once, now that it does.
    for note in &settings.deprecations {
        tracing::warn!(note = %note, "deprecated setting");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(cli::run(cli, settings));
    // A connection's I/O thread that is still busy must not hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes joined with ": ".
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
