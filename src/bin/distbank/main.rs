//! The `distbank` command line. Thin: parse flags (every flag also reads an environment
//! variable), set up logging, call the library. Exit codes: 0 ok, 1 runtime failure, 2 bad
//! input or usage.
//!
//! [`cli`] holds the flags, [`commands`] what each subcommand does.

mod cli;
mod commands;

use std::process::ExitCode;

use clap::Parser as _;
use distbank::input::InputError;
use distbank::telemetry;
use tokio_util::sync::CancellationToken;

use cli::{Cli, Command, UsageError};
use commands::dispatch;

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    let quiet = matches!(
        cli.command,
        Command::Run { .. } | Command::Client { .. } | Command::Bench { .. }
    );
    let single = cli.command.settle_runtimes();
    let mut builder = if single {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("distbank: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The OTLP exporter's gRPC channel needs the runtime.
    let telemetry = match runtime.block_on(async {
        telemetry::init(
            cli.log_format,
            if quiet { "warn" } else { "info" },
            cli.otlp_endpoint.as_deref(),
        )
    }) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("distbank: cannot set up telemetry: {e}");
            return ExitCode::FAILURE;
        }
    };
    let metrics_stop = CancellationToken::new();
    let result = runtime.block_on(async {
        if let Some(addr) = cli.metrics_listen {
            let (bound, server) = distbank::metrics::serve(addr, metrics_stop.clone()).await?;
            tracing::info!(addr = %bound, "serving metrics at /metrics");
            tokio::spawn(server);
        }
        dispatch(cli.command).await
    });
    metrics_stop.cancel();
    // Flush the spans still buffered while the runtime (and the exporter's channel) runs: on
    // a single-threaded runtime only `block_on` drives the channel's connection.
    runtime.block_on(async {
        if let Err(e) = tokio::task::spawn_blocking(move || telemetry.shutdown()).await {
            eprintln!("distbank: flushing traces: {e}");
        }
    });
    // Blocking work still running must not hold the exit: a DNS lookup (getaddrinfo, which
    // cannot be cancelled) towards a peer name that does not answer can take tens of seconds,
    // and a SIGTERM'd pod would then be killed at the end of its grace period (seen in the
    // end-to-end rolling restart: "stopped" logged, exit 137 30 s later).
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("distbank: error: {}", distbank::error_chain(&*e));
            if e.downcast_ref::<InputError>().is_some() || e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
