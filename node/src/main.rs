//! `shoal`: one binary for every role. `shoal up` runs the embedded default (control
//! plane, agent and gateway in one process); the other subcommands are the CLI client.
//!
//! This crate is the only one that wires the others together and the only one that knows
//! HTTP and JSON shapes.

mod api;
mod cli;
mod control;
mod datadir;
mod demo;
mod loops;
mod server;
mod store;
mod up;

use clap::{Parser, Subcommand, ValueEnum};
use shoal_ops::tracing_setup::{self, LogFormat};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "shoal",
    version,
    about = "Serve machine-learning models on a cluster."
)]
struct Args {
    /// Log line format (logs go to stderr).
    #[arg(long, global = true, value_enum, default_value_t = LogFormatArg::Pretty, env = "SHOAL_LOG_FORMAT")]
    log_format: LogFormatArg,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormatArg {
    Pretty,
    Json,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Run Shoal in one process: control plane, agent and gateway, with the demo model.
    Up {
        /// Where the raft log and the artifacts live.
        #[arg(long, default_value = ".shoal", env = "SHOAL_DATA_DIR")]
        data_dir: PathBuf,
        /// Address of the HTTP endpoint (inference, admin API, /metrics). Port 0 picks one.
        #[arg(long, default_value = "127.0.0.1:7070", env = "SHOAL_LISTEN")]
        listen: SocketAddr,
    },
    /// Run one member of the control plane (1, 3 or 5 of them).
    Server {
        /// This member's raft id (1, 2, ...).
        #[arg(long, env = "SHOAL_SERVER_ID")]
        id: u64,
        /// Raft addresses of every member, this one included: `1=HOST:PORT,2=HOST:PORT,...`.
        #[arg(long, env = "SHOAL_PEERS", default_value = "")]
        peers: String,
        /// HTTP addresses of the members, for forwarding writes: `1=HOST:PORT,...`.
        #[arg(long, env = "SHOAL_HTTP_PEERS", default_value = "")]
        http_peers: String,
        /// Where raft traffic from the other members arrives.
        #[arg(long, env = "SHOAL_RAFT_LISTEN")]
        raft_listen: SocketAddr,
        /// HTTP address: admin API, gateway, /metrics.
        #[arg(long, default_value = "127.0.0.1:7070", env = "SHOAL_LISTEN")]
        listen: SocketAddr,
        /// Where the raft log and the artifacts live.
        #[arg(long, default_value = ".shoal-server", env = "SHOAL_DATA_DIR")]
        data_dir: PathBuf,
        /// Every member of one cluster uses the same id; traffic from another is refused.
        #[arg(long, default_value_t = 1, env = "SHOAL_CLUSTER_ID")]
        cluster_id: u64,
        /// Join an existing cluster (wait to be added with `shoal cluster add`) instead of
        /// bootstrapping a new one from --peers.
        #[arg(long)]
        join: bool,
    },
    /// The control plane's members and leader.
    Cluster {
        #[command(subcommand)]
        command: cli::ClusterCommand,
        #[command(flatten)]
        client: cli::ClientArgs,
    },
    /// Model versions.
    Model {
        #[command(subcommand)]
        command: cli::ModelCommand,
        #[command(flatten)]
        client: cli::ClientArgs,
    },
    /// Deployments.
    Deploy {
        #[command(subcommand)]
        command: cli::DeployCommand,
        #[command(flatten)]
        client: cli::ClientArgs,
    },
    /// Send one inference request.
    Infer {
        #[command(flatten)]
        request: cli::InferArgs,
        #[command(flatten)]
        client: cli::ClientArgs,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let format = match args.log_format {
        LogFormatArg::Pretty => LogFormat::Pretty,
        LogFormatArg::Json => LogFormat::Json,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("shoal: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = match args.command {
        Commands::Up { data_dir, listen } => {
            tracing_setup::init(format, "info,raft=warn,raft_engine=warn");
            runtime.block_on(up::run(up::UpConfig { data_dir, listen }))
        }
        Commands::Server {
            id,
            peers,
            http_peers,
            raft_listen,
            listen,
            data_dir,
            cluster_id,
            join,
        } => {
            tracing_setup::init(format, "info,raft=warn,raft_engine=warn");
            let config = server::parse_members(&peers)
                .and_then(|peers| Ok((peers, server::parse_members(&http_peers)?)))
                .and_then(|(peers, http_peers)| {
                    server::ServerConfig {
                        id,
                        data_dir,
                        listen,
                        raft_listen,
                        cluster_id,
                        peers,
                        http_peers,
                        join,
                    }
                    .validate()
                });
            match config {
                Ok(config) => runtime.block_on(server::run(config)),
                Err(error) => Err(error),
            }
        }
        Commands::Cluster { command, client } => {
            tracing_setup::init(format, "warn");
            runtime.block_on(cli::cluster(command, &client))
        }
        Commands::Model { command, client } => {
            tracing_setup::init(format, "warn");
            runtime.block_on(cli::model(command, &client))
        }
        Commands::Deploy { command, client } => {
            tracing_setup::init(format, "warn");
            runtime.block_on(cli::deploy(command, &client))
        }
        Commands::Infer { request, client } => {
            tracing_setup::init(format, "warn");
            runtime.block_on(cli::infer(request, &client))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("shoal: {error:#}");
            ExitCode::FAILURE
        }
    }
}
