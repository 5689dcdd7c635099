use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = weir_agent::cli::Cli::parse();
    weir_agent::cli::main(cli)
}
