//! The `weir` CLI, built inside this package so its tests get a fresh binary.
use std::process::ExitCode;

use clap::Parser;

// The data plane allocates small, short-lived buffers per request; mimalloc
// handles that pattern with less CPU than glibc malloc (see README, Performance).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    weir_agent::cli::main(weir_agent::cli::Cli::parse())
}
