use std::process::ExitCode;

use clap::Parser;

/// A faster allocator than glibc's for the proxy's many small, short-lived
/// allocations (flow records, parsed messages).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = weir_agent::cli::Cli::parse();
    weir_agent::cli::main(cli)
}
