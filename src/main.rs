//! `provisioner`: parses the command line and hands over to the library.

use clap::Parser;
use provisioner::cli::{self, Cli};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    cli::main_with(|settings| cli::run(cli, settings))
}
