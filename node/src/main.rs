//! `shoal`: one binary for every role. `shoal up` runs the embedded default (control
//! plane, agent and gateway in one process); the other subcommands are the CLI client.
//!
//! This crate is the only one that wires the others together and the only one that knows
//! HTTP and JSON shapes.

mod agent;
mod api;
mod auth;
mod cli;
mod cluster_metrics;
mod control;
mod datadir;
mod demo;
mod explain;
mod gateway;
mod leases;
mod load;
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

/// Who may call the HTTP API.
#[derive(Debug, clap::Args)]
struct SecurityArgs {
    /// File of accepted tokens, one `SCOPE SHA256` per line (scopes: admin, infer); see
    /// `shoal token new`. Without it the API needs no token.
    #[arg(long, env = "SHOAL_TOKENS_FILE")]
    tokens: Option<PathBuf>,
    /// This process's own admin token, for the calls it makes to other servers.
    #[arg(long = "token", env = "SHOAL_TOKEN", hide_env_values = true)]
    own_token: Option<String>,
    /// Listen beyond loopback without tokens. Anyone who can reach the port can then
    /// change the cluster.
    #[arg(long)]
    insecure: bool,
    /// Requests one model may have in flight through this gateway; beyond it, 429.
    #[arg(long, default_value_t = api::ADMISSION_LIMIT_DEFAULT, env = "SHOAL_ADMISSION_LIMIT")]
    admission_limit: usize,
}

impl SecurityArgs {
    fn tokens(&self) -> anyhow::Result<auth::Tokens> {
        match &self.tokens {
            None => Ok(auth::Tokens::default()),
            Some(path) => auth::Tokens::load(path).map_err(anyhow::Error::msg),
        }
    }
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print a new random token and the line to put in a tokens file.
    New {
        /// `admin` or `infer`.
        #[arg(long, default_value = "infer")]
        scope: String,
    },
    /// Print the sha256 of a token, as a tokens file stores it.
    Hash { token: String },
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
        #[command(flatten)]
        security: SecurityArgs,
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
        #[command(flatten)]
        security: SecurityArgs,
    },
    /// Make and hash bearer tokens for a tokens file.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Run the deploy agent of this host: it joins the cluster, runs the replicas placed
    /// here and serves them to gateways.
    Agent {
        /// This node's id (unique in the cluster).
        #[arg(long, env = "SHOAL_NODE_ID")]
        id: u64,
        /// Servers to join through, `HOST:PORT,HOST:PORT,...` (their HTTP addresses).
        #[arg(long, env = "SHOAL_SERVERS")]
        servers: String,
        /// Data-plane address gateways reach this agent at.
        #[arg(long, default_value = "127.0.0.1:7200", env = "SHOAL_AGENT_LISTEN")]
        listen: SocketAddr,
        /// Where the artifact cache lives.
        #[arg(long, default_value = ".shoal-agent", env = "SHOAL_DATA_DIR")]
        data_dir: PathBuf,
        /// A label for placement constraints, `KEY=VALUE`; repeat for more.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// An admin token, when the servers require one.
        #[arg(long, env = "SHOAL_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Run the HTTP submit endpoint alone: it follows the cluster state from the servers
    /// and sends inference to agents.
    Gateway {
        /// Servers to follow, `HOST:PORT,HOST:PORT,...` (their HTTP addresses).
        #[arg(long, env = "SHOAL_SERVERS")]
        servers: String,
        /// HTTP address for inference (and forwarded admin calls).
        #[arg(long, default_value = "127.0.0.1:7080", env = "SHOAL_LISTEN")]
        listen: SocketAddr,
        /// A scratch directory (locked, so two gateways never share it).
        #[arg(long, default_value = ".shoal-gateway", env = "SHOAL_DATA_DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        security: SecurityArgs,
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
    /// Agent hosts.
    Node {
        #[command(subcommand)]
        command: cli::NodeCommand,
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
    /// Explain a prediction: how much each input feature moved each output.
    Explain {
        #[command(flatten)]
        request: cli::ExplainArgs,
        #[command(flatten)]
        client: cli::ClientArgs,
    },
}

/// `HOST:PORT,...` (or URLs) as base URLs; at least one.
fn server_urls(servers: &str) -> anyhow::Result<Vec<String>> {
    let servers: Vec<String> = servers
        .split(',')
        .map(str::trim)
        .filter(|server| !server.is_empty())
        .map(|server| {
            if server.starts_with("http://") {
                server.trim_end_matches('/').to_string()
            } else {
                format!("http://{server}")
            }
        })
        .collect();
    if servers.is_empty() {
        anyhow::bail!("--servers needs at least one server address");
    }
    Ok(servers)
}

fn agent_config(
    id: u64,
    servers: &str,
    listen: SocketAddr,
    data_dir: PathBuf,
    labels: &[String],
    token: Option<String>,
) -> anyhow::Result<agent::AgentConfig> {
    if id == 0 {
        anyhow::bail!("--id must be at least 1");
    }
    let servers = server_urls(servers)?;
    let mut parsed = std::collections::BTreeMap::new();
    for label in labels {
        let Some((key, value)) = label.split_once('=') else {
            anyhow::bail!("label {label:?} is not KEY=VALUE");
        };
        parsed.insert(key.to_string(), value.to_string());
    }
    Ok(agent::AgentConfig {
        id,
        servers,
        listen,
        data_dir,
        labels: parsed,
        token,
    })
}

fn token(command: &TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::New { scope } => {
            if scope != "admin" && scope != "infer" {
                anyhow::bail!("scope {scope:?} is not admin or infer");
            }
            let mut bytes = [0u8; 24];
            std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
            let token = format!("shoal_{}", hex::encode(bytes));
            cli::out!("token:            {token}")?;
            cli::out!("tokens file line: {scope} {}", auth::hash_token(&token))?;
        }
        TokenCommand::Hash { token } => cli::out!("{}", auth::hash_token(token))?,
    }
    Ok(())
}

/// Pins how many pieces candle splits a kernel into, unless the operator chose it. The
/// pieces run on the compute pool's threads (one per core, `compute_threads`), whatever
/// this says. Without `RAYON_NUM_THREADS` candle asks `num_cpus::get_physical()` on every
/// operation, which reads and parses `/proc/cpuinfo`: a file read per matmul, several per
/// forward pass. Same count as candle's default, read once.
///
/// One thread per pass (parallelism only between passes, on the compute pool) was measured
/// on the 2-core benchmark host and rejected: the small MLP at c=64 gained 0–10%, while
/// MiniLM lost 13% of its throughput at c=32 and took 27% longer per request at c=1.
#[allow(unsafe_code)]
fn pin_intra_op_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    // SAFETY: called first thing in `main`, before any other thread exists, so nothing
    // reads the environment concurrently.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
}

/// How many threads run the async runtime (HTTP, actors, raft) in a process that also runs
/// models, unless the operator chose with `TOKIO_WORKER_THREADS`: half the cores, at least
/// one. `None` leaves tokio's choice, one per core (or the operator's).
///
/// The compute pool has a thread per core and, serving a model on the CPU under load, keeps
/// them all busy. A runtime with another thread per core oversubscribed the machine, and
/// handing a request to its batch and the answer back became wake-ups across threads. On
/// the 2-core benchmark host one runtime thread against two served the MLP at c=64 with
/// 12% more requests per second, cut its c=1 p50 from 0.356 to 0.273 ms, and served
/// MiniLM at c=32 with 8% more (`cargo bench -p shoal-tests --bench serving`, BENCHMARKS.md).
/// A `shoal server` or `gateway` runs no model: HTTP may have every core there.
fn async_worker_threads(command: &Commands) -> Option<usize> {
    if std::env::var_os("TOKIO_WORKER_THREADS").is_some() {
        return None;
    }
    match command {
        Commands::Up { .. } | Commands::Agent { .. } => {
            let cores = std::thread::available_parallelism().map_or(1, usize::from);
            Some((cores / 2).max(1))
        }
        _ => None,
    }
}

/// The name of the async runtime's threads (its workers and its blocking pool), as `top -H`,
/// `perf` and the serving bench's split by thread see them: named like the compute pool's
/// `shoal-compute-N`, and within the 15 bytes Linux keeps of a thread's name.
const RUNTIME_THREAD_NAME: &str = "shoal-runtime";

/// How long blocking work left at exit may run before the process ends without it: a
/// stop must not wait out a large model's load.
const BLOCKING_WORK_AT_EXIT: std::time::Duration = std::time::Duration::from_secs(5);

fn main() -> ExitCode {
    pin_intra_op_threads();
    let args = Args::parse();
    let format = match args.log_format {
        LogFormatArg::Pretty => LogFormat::Pretty,
        LogFormatArg::Json => LogFormat::Json,
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.thread_name(RUNTIME_THREAD_NAME);
    if let Some(threads) = async_worker_threads(&args.command) {
        runtime.worker_threads(threads);
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("shoal: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = match args.command {
        Commands::Up {
            data_dir,
            listen,
            security,
        } => {
            tracing_setup::init(format, "info,raft=warn,raft_engine=warn");
            let config = security.tokens().and_then(|tokens| {
                server::check_exposure(listen, &tokens, security.insecure)?;
                Ok(up::UpConfig {
                    data_dir,
                    listen,
                    tokens,
                    admission_limit: security.admission_limit,
                })
            });
            config.and_then(|config| runtime.block_on(up::run(config)))
        }
        Commands::Token { command } => token(&command),
        Commands::Server {
            id,
            peers,
            http_peers,
            raft_listen,
            listen,
            data_dir,
            cluster_id,
            join,
            security,
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
                        tokens: security.tokens()?,
                        token: security.own_token.clone(),
                        insecure: security.insecure,
                        admission_limit: security.admission_limit,
                    }
                    .validate()
                });
            match config {
                Ok(config) => runtime.block_on(server::run(config)),
                Err(error) => Err(error),
            }
        }
        Commands::Agent {
            id,
            servers,
            listen,
            data_dir,
            labels,
            token,
        } => {
            tracing_setup::init(format, "info");
            agent_config(id, &servers, listen, data_dir, &labels, token)
                .and_then(|config| runtime.block_on(agent::run(config)))
        }
        Commands::Gateway {
            servers,
            listen,
            data_dir,
            security,
        } => {
            tracing_setup::init(format, "info");
            let config = server_urls(&servers).and_then(|servers| {
                let tokens = security.tokens()?;
                server::check_exposure(listen, &tokens, security.insecure)?;
                Ok(gateway::GatewayConfig {
                    servers,
                    listen,
                    data_dir,
                    tokens,
                    token: security.own_token.clone(),
                    admission_limit: security.admission_limit,
                })
            });
            config.and_then(|config| runtime.block_on(gateway::run(config)))
        }
        Commands::Cluster { command, client } => {
            tracing_setup::init(format, "warn");
            runtime.block_on(cli::cluster(command, &client))
        }
        Commands::Model { command, client } => {
            tracing_setup::init(format, "warn");
            runtime.block_on(cli::model(command, &client))
        }
        Commands::Node { command, client } => {
            tracing_setup::init(format, "warn");
            runtime.block_on(cli::node(command, &client))
        }
        Commands::Deploy { command, client } => {
            tracing_setup::init(format, "warn");
            runtime.block_on(cli::deploy(command, &client))
        }
        Commands::Infer { request, client } => {
            tracing_setup::init(format, "warn");
            runtime.block_on(cli::infer(request, &client))
        }
        Commands::Explain { request, client } => {
            tracing_setup::init(format, "warn");
            runtime.block_on(cli::explain(request, &client))
        }
    };
    // Blocking work still running once the command is done (a model load under way when
    // an agent was stopped) gets this long, then the process exits without it.
    runtime.shutdown_timeout(BLOCKING_WORK_AT_EXIT);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Whoever read the output stopped reading (`| head -1`): nothing is wrong.
        Err(error) if error.is::<cli::StdoutClosed>() => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("shoal: {error:#}");
            ExitCode::FAILURE
        }
    }
}
