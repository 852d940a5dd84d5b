//! Monitor Gateway: the Cloud Connector gateway to the managed Product Analytics stack.

#![forbid(unsafe_code)]

mod config;
mod dev;
mod http;
mod serve;
mod telemetry;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Settings;

/// jemalloc, built with its background threads on: they return the pages that stopped tenant
/// actors freed within its decay time (10 s by default; `_RJEM_MALLOC_CONF=dirty_decay_ms:N`
/// changes it), however idle the threads that freed them are. With mimalloc or the system
/// allocator that memory stayed resident after a burst of tenants idled out.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "monitor-gateway", version, about)]
struct Cli {
    /// A TOML file layered over the built-in defaults (environment variables
    /// MONITOR_GATEWAY__SECTION__KEY override both).
    #[arg(long, global = true, env = "MONITOR_GATEWAY_CONFIG")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve,
    /// Validate the configuration and print it, secrets redacted.
    CheckConfig,
    /// Developer helpers for trying the gateway without CustomersDot. Not for production.
    #[command(subcommand)]
    Dev(dev::DevCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve => Settings::load(cli.config.as_deref())
            .map_err(anyhow::Error::from)
            .and_then(serve::run),
        Command::CheckConfig => check_config(cli.config.as_deref()),
        Command::Dev(command) => dev::run(command, cli.config.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("monitor-gateway: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: Option<&std::path::Path>) -> anyhow::Result<()> {
    let settings = Settings::load(file)?;
    print!("{}", settings.redacted_toml());
    eprintln!("configuration is valid");
    Ok(())
}
