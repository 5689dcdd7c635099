//! The `weir` CLI, built inside this package so its tests get a fresh binary.
use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    weir_agent::cli::main(weir_agent::cli::Cli::parse())
}
