//! `ferry`: the agent (`ferry agent`) and the fleet manager's commands.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_agent::cli::{self, BrokerArgs, EvacuateArgs, MigrateArgs, SignArgs};
use ferry_agent::config::AgentSettings;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Live-migrates Docker containers between edge devices"
)]
struct Cli {
    /// Log as JSON lines instead of text (both go to stderr).
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent on this device.
    Agent {
        /// TOML file with the same keys as the flags (a flag wins).
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Box<AgentSettings>,
    },
    /// Publish a migrate job and follow it until it ends.
    Migrate(MigrateArgs),
    /// Move every labelled container off a node, one at a time, each to a node it fits.
    Evacuate(EvacuateArgs),
    /// List the nodes' statuses.
    Nodes(BrokerArgs),
    /// Follow job statuses as they change.
    Watch {
        /// Only this job; stop when it ends.
        job: Option<String>,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Sign a job for a script: reads the job JSON on stdin, prints the envelope to publish on {root}/{node}/jobs/{job-id}.
    Sign {
        /// The node the job is for (the topic's node).
        #[arg(long)]
        node: String,
        /// The job id (the topic's last level).
        #[arg(long)]
        job_id: String,
        #[command(flatten)]
        signing: SignArgs,
    },
    /// Create a fleet CA, a manager CA, certificates for a broker, nodes and a manager, and the manager's order signing key; or revoke a node's certificate.
    Certs {
        #[arg(long)]
        out: PathBuf,
        /// Node ids, comma-separated.
        #[arg(long, value_delimiter = ',', required_unless_present = "revoke")]
        nodes: Vec<String>,
        /// Revoke this node's certificate (OUT/NODE.pem): add it to OUT/crl.pem, which mosquitto's crlfile and the agents' tls_crl read.
        #[arg(long, value_name = "NODE", conflicts_with = "nodes")]
        revoke: Option<String>,
        #[arg(long, default_value = ferry_agent::certs::DEFAULT_MANAGER)]
        manager: String,
        /// Broker host names and IPs for its certificate, comma-separated.
        #[arg(long, value_delimiter = ',', default_values = ferry_agent::certs::DEFAULT_BROKER_HOSTS)]
        broker_hosts: Vec<String>,
        /// Validity of the issued certificates.
        #[arg(long, default_value_t = ferry_agent::certs::DEFAULT_DAYS)]
        days: u32,
    },
}

/// The agent logs its work at `info`; the manager's commands print their
/// own output and only log problems.
fn init_tracing(json: bool, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colour only on a terminal: journald and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// SIGTERM (systemd) and SIGINT (a terminal) both start the drain.
fn shutdown_on_signals() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
        }
        t.cancel();
    });
    Ok(token)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent { config, settings } => {
            let file = match &config {
                Some(path) => AgentSettings::from_toml_file(path)?,
                None => AgentSettings::default(),
            };
            let config = settings.over(file).validate()?;
            let shutdown = shutdown_on_signals()?;
            ferry_agent::agent::run(config, shutdown).await?;
        }
        Command::Migrate(args) => {
            cli::migrate(args).await?;
        }
        Command::Evacuate(args) => {
            cli::evacuate(args).await?;
        }
        Command::Nodes(broker) => {
            cli::nodes(broker).await?;
        }
        Command::Watch { job, broker } => cli::watch(broker, job).await?,
        Command::Sign {
            node,
            job_id,
            signing,
        } => {
            let mut job = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut job)
                .context("reading the job from standard input")?;
            println!("{}", cli::sign(&signing, &node, &job_id, &job)?);
        }
        Command::Certs {
            out,
            revoke: Some(node),
            ..
        } => {
            let serial = ferry_agent::certs::revoke(&out, &node)?;
            println!(
                "revoked {node} (serial {serial}) in {}; copy it to the nodes and send their agents SIGHUP, and restart the broker",
                out.join(ferry_agent::certs::CRL_FILE).display()
            );
        }
        Command::Certs {
            out,
            nodes,
            manager,
            broker_hosts,
            days,
            revoke: None,
        } => {
            ferry_agent::certs::generate(
                &out,
                &ferry_agent::certs::FleetSpec {
                    nodes,
                    manager,
                    broker_hosts,
                    days,
                },
            )?;
            println!(
                "wrote the fleet CA, certificates and the order key ({}, for the agents: {}) to {}",
                ferry_agent::order::ORDER_KEY_FILE,
                ferry_agent::order::ORDER_PUB_FILE,
                out.display()
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = if matches!(cli.command, Command::Agent { .. }) {
        "info"
    } else {
        "warn"
    };
    init_tracing(cli.log_json, level);
    // Two worker threads are plenty on a Pi; the heavy work (zstd, tar) runs
    // on the blocking pool.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferry: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: {e:#}");
            ExitCode::FAILURE
        }
    }
}
