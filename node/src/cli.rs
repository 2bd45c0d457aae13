//! The CLI client: `shoal model …`, `shoal deploy …`, `shoal infer …`, `shoal explain …` against a running
//! Shoal at `SHOAL_ADDR`.

use crate::api::explain::{ExplainRequest, ExplainResponse};
use crate::api::oip::{
    Element, InferRequest, InferResponse, ModelMetadata, RequestInput, ResponseData,
};
use crate::explain::Method;
use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use serde::de::DeserializeOwned;
use shoal_actors::optimise::{Optimisation, Quantization, compare_classifiers};
use shoal_actors::runtime::{CONFIG_FILE, GGUF_WEIGHTS_FILE};
use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Standard output was closed by whoever reads it (`shoal model list | head -1`): the
/// command stops there, and `main` exits quietly, as Unix tools do. Rust ignores SIGPIPE,
/// so without this a closed pipe made `println!` panic; the servers keep that default.
#[derive(Debug, thiserror::Error)]
#[error("standard output is closed")]
pub struct StdoutClosed;

/// Writes one line to standard output; a closed pipe is [`StdoutClosed`].
pub fn write_line(line: std::fmt::Arguments) -> anyhow::Result<()> {
    match writeln!(std::io::stdout().lock(), "{line}") {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(error) => Err(anyhow::Error::new(error).context("writing to standard output")),
    }
}

/// `println!` for the CLI: evaluates to [`write_line`]'s result, for `?`.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_line(format_args!($($arg)*))
    };
}
pub(crate) use out;

/// Longest the CLI waits for an answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Where Shoal's HTTP endpoint is.
    #[arg(
        long,
        global = true,
        env = "SHOAL_ADDR",
        default_value = "http://127.0.0.1:7070"
    )]
    addr: String,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Bearer token, when the server requires one.
    #[arg(long, global = true, env = "SHOAL_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Every version of every model.
    List,
    /// Upload a directory of model files (safetensors, GGUF, JSON, tokenizer files) as a
    /// new version; acknowledged once the files are durable on a majority of servers.
    Push {
        /// The directory; its files become the version (no subdirectories).
        dir: PathBuf,
        /// The model's name.
        #[arg(long)]
        name: String,
        /// The weight format: safetensors, gguf, or raw (data files with no weights).
        /// Default: gguf when the directory holds model.gguf, else safetensors.
        #[arg(long)]
        format: Option<String>,
        /// The version of this model the new one was made from; the newest by default.
        #[arg(long)]
        parent: Option<u32>,
    },
    /// The versions and aliases of one model.
    Show { name: String },
    /// Make a new version of a model by pruning or quantizing the weights of one of its
    /// versions (on this machine), and push it with that version as its parent.
    Optimise(OptimiseArgs),
    /// Train an MLP classifier on a CSV (a header, numeric feature columns, the class name
    /// last) and push it as a new version of NAME. Trains here, on this machine's CPU.
    Train(TrainArgs),
    /// Train the demo Iris classifier into a directory (no server needed), ready for
    /// `shoal model push`.
    Demo {
        #[arg(long)]
        out: PathBuf,
        /// Seed of the initial weights; another seed is another version.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Point an alias (e.g. `stable`) at a version.
    Alias {
        name: String,
        alias: String,
        version: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Every node with its status, devices and replica count.
    List,
    /// Move the node's replicas elsewhere and place nothing new on it.
    Drain { id: u64 },
    /// Let the node take replicas again.
    Undrain { id: u64 },
}

#[derive(Debug, Subcommand)]
pub enum DeployCommand {
    /// Every deployment with its replicas.
    List,
    /// Create or update a deployment from a TOML file (name, model, version or alias,
    /// replicas, optional [autoscale] and [batching]).
    Apply {
        #[arg(short, long)]
        file: PathBuf,
    },
    /// Set a deployment's replica count.
    Scale { name: String, replicas: u32 },
    /// Remove a deployment and all its replicas.
    Delete { name: String },
    /// Return to the previous version: abandon a rollout in progress, or roll out the
    /// version the deployment ran before its last rollout (pinned: an alias it followed is
    /// no longer followed).
    Rollback { name: String },
    /// One deployment with its replicas.
    Show { name: String },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Leader, term, indexes and members, as the server at SHOAL_ADDR sees them.
    Status,
    /// The members and their roles.
    Members,
    /// Add a member (it must be running with `shoal server --join`).
    Add {
        id: u64,
        /// Its raft address, HOST:PORT.
        address: String,
        /// Add it as a learner (receives the log, does not vote); add again without this
        /// to promote it.
        #[arg(long)]
        learner: bool,
    },
    /// Remove a member.
    Remove { id: u64 },
    /// Hand leadership to another voter.
    TransferLeader { to: u64 },
}

#[derive(Debug, Args)]
pub struct InferArgs {
    /// The model to ask.
    model: String,
    /// The input rows as JSON, e.g. '[[5.1,3.5,1.4,0.2]]'.
    #[arg(long)]
    data: String,
    /// A specific version instead of the deployed one.
    #[arg(long)]
    version: Option<u32>,
}

#[derive(Debug, Args)]
pub struct OptimiseArgs {
    /// The model's name.
    name: String,
    /// The version to start from; the newest by default.
    #[arg(long)]
    version: Option<u32>,
    /// Share of each weight matrix's entries to zero, those of least magnitude (0 to 1).
    #[arg(long)]
    prune: Option<f64>,
    /// Store weight matrices in ggml's 8-bit or 4-bit blocks, as model.gguf.
    #[arg(long, value_enum)]
    quantize: Option<QuantizeArg>,
    /// Keep the new version's files in this directory (by default they go once pushed).
    #[arg(long)]
    out: Option<PathBuf>,
    /// For a classifier: a labelled CSV (as `model train` reads) to run both versions
    /// on before pushing, comparing their labels with each other and with the CSV's.
    #[arg(long)]
    check_data: Option<PathBuf>,
    /// With --check-data: push only if the versions label at least this share of its
    /// rows alike (0 to 1).
    #[arg(long, requires = "check_data")]
    min_agreement: Option<f64>,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The model's name.
    name: String,
    /// The CSV to learn from.
    #[arg(long)]
    data: PathBuf,
    /// Share of the rows held out of training and only scored, drawn by the seed.
    #[arg(long, default_value_t = 0.2)]
    holdout: f64,
    /// Widths of the hidden layers, e.g. 32,16.
    #[arg(long, value_delimiter = ',', default_value = "16")]
    hidden: Vec<usize>,
    #[arg(long, default_value_t = 300)]
    epochs: usize,
    #[arg(long, default_value_t = 0.05)]
    learning_rate: f64,
    /// Seed of the initial weights and of the held-out rows.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// The name of the model's input tensor.
    #[arg(long, default_value = "features")]
    input: String,
    /// Keep the trained files in this directory (by default they go once pushed).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// `--quantize`'s values: ggml's block formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum QuantizeArg {
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The model whose prediction to explain.
    model: String,
    /// The input rows as JSON, e.g. '[[5.1,3.5,1.4,0.2]]'.
    #[arg(long)]
    data: String,
    /// A specific version instead of the deployed one.
    #[arg(long)]
    version: Option<u32>,
    /// The FP32 output to explain; the model's first FP32 output when not given.
    #[arg(long = "explain-output")]
    explained_output: Option<String>,
    /// What a feature left out is set to: a number, or a JSON list with one per feature.
    /// Zero when not given.
    #[arg(long)]
    baseline: Option<String>,
    /// `shapley` (exact, up to 10 features) or `ablation` (one row per feature).
    #[arg(long, value_enum, default_value_t = Method::Shapley)]
    method: Method,
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    fn new(args: &ClientArgs) -> anyhow::Result<Client> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = &args.token {
            let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .context("the token has characters a header cannot carry")?;
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .timeout(CLIENT_TIMEOUT)
            .default_headers(headers)
            .build()
            .context("building the HTTP client")?;
        Ok(Client {
            http,
            base: base_url(&args.addr)?,
        })
    }

    /// One call with an optional JSON body; the answer decoded, or its error explained.
    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<T> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach Shoal at {} (set SHOAL_ADDR)", self.base))?;
        decode(response).await
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn put<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let body = serde_json::to_vec(body)?;
        self.call(reqwest::Method::PUT, path, Some(body)).await
    }

    async fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(reqwest::Method::DELETE, path, None).await
    }

    async fn post<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let body = serde_json::to_vec(body)?;
        self.call(reqwest::Method::POST, path, Some(body)).await
    }
}

/// The base URL of `--addr`/`SHOAL_ADDR`: `host:port` alone is taken as `http://host:port`,
/// as the servers' own flags write addresses.
fn base_url(addr: &str) -> anyhow::Result<String> {
    let addr = addr.trim().trim_end_matches('/');
    let base = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    match reqwest::Url::parse(&base) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Ok(base),
        _ => bail!("cannot use address {addr:?}: give the address as http://host:port"),
    }
}

/// Decodes a success body, or turns an error body into a readable error.
async fn decode<T: DeserializeOwned>(response: reqwest::Response) -> anyhow::Result<T> {
    let status = response.status();
    let body = response.bytes().await.context("reading the answer")?;
    if !status.is_success() {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|value| {
                value.get("error").map(|error| match error {
                    serde_json::Value::String(text) => text.clone(),
                    other => other.to_string(),
                })
            })
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        bail!("{status}: {message}");
    }
    serde_json::from_slice(&body).context("Shoal answered JSON this CLI does not understand")
}

pub async fn cluster(command: ClusterCommand, args: &ClientArgs) -> anyhow::Result<()> {
    let client = Client::new(args)?;
    let is_view = matches!(command, ClusterCommand::Status | ClusterCommand::Members);
    let is_status = matches!(command, ClusterCommand::Status);
    let answer: serde_json::Value = match command {
        ClusterCommand::Status | ClusterCommand::Members => client.get("/api/v1/cluster").await?,
        ClusterCommand::Add {
            id,
            address,
            learner,
        } => {
            let role = if learner { "learner" } else { "voter" };
            let body = serde_json::json!({"id": id, "address": address, "role": role});
            client.post("/api/v1/cluster/members", &body).await?
        }
        ClusterCommand::Remove { id } => {
            client
                .delete(&format!("/api/v1/cluster/members/{id}"))
                .await?
        }
        ClusterCommand::TransferLeader { to } => {
            client
                .post(
                    "/api/v1/cluster/transfer-leader",
                    &serde_json::json!({"to": to}),
                )
                .await?
        }
    };
    if args.output == Output::Json || !is_view {
        out!("{}", serde_json::to_string_pretty(&answer)?)?;
        return Ok(());
    }
    let members = answer["members"].as_array().cloned().unwrap_or_default();
    if is_status {
        out!(
            "member {} sees leader {} in term {}; commit {}, applied {}, snapshot {}",
            text(&answer, "id"),
            text(&answer, "leader"),
            text(&answer, "term"),
            text(&answer, "commit_index"),
            text(&answer, "applied_index"),
            text(&answer, "snapshot_index"),
        )?;
    }
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| vec![text(m, "id"), text(m, "role"), text(m, "leader")])
        .collect();
    print_table(&["ID", "ROLE", "LEADER"], &rows)?;
    Ok(())
}

/// A file of a version about to be pushed.
struct LocalFile {
    name: String,
    path: PathBuf,
    digest: String,
    size_bytes: u64,
}

/// The files of `dir`, each checked to be a plain file inside it, hashed as it is read.
fn collect_files(dir: &Path) -> anyhow::Result<Vec<LocalFile>> {
    let root = dir
        .canonicalize()
        .with_context(|| format!("{} is not a readable directory", dir.display()))?;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&root).with_context(|| format!("reading {}", root.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path().canonicalize()?;
        // A symlink that leads out of the model is refused, not followed.
        if path.parent() != Some(root.as_path()) {
            bail!("{name} points outside {}", root.display());
        }
        if path.is_dir() {
            bail!("{name} is a directory; a version is a flat set of files");
        }
        crate::store::check_name(&name).map_err(anyhow::Error::msg)?;
        let mut file = std::fs::File::open(&path)?;
        let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
        let size_bytes = std::io::copy(&mut file, &mut hasher)?;
        files.push(LocalFile {
            name,
            path,
            digest: hex::encode(sha2::Digest::finalize(hasher)),
            size_bytes,
        });
    }
    if files.is_empty() {
        bail!("{} has no files", root.display());
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// Streams one file to `PUT /api/v1/blobs/{digest}`, showing progress on a terminal.
async fn upload(client: &Client, file: &LocalFile) -> anyhow::Result<()> {
    use futures_util::StreamExt;
    let terminal = std::io::stderr().is_terminal();
    let total = file.size_bytes.max(1);
    let name = file.name.clone();
    let handle = tokio::fs::File::open(&file.path).await?;
    let mut sent = 0u64;
    let mut last_percent = 0;
    let stream = tokio_util_stream(handle).map(move |chunk| {
        if let Ok(bytes) = &chunk {
            sent += bytes.len() as u64;
            let percent = sent * 100 / total;
            if terminal && percent != last_percent {
                last_percent = percent;
                eprint!("\r  {name}: {percent:>3}% ({sent} of {total} bytes)");
                let _ = std::io::stderr().flush();
            }
        }
        chunk
    });
    let response = client
        .http
        .put(format!("{}/api/v1/blobs/{}", client.base, file.digest))
        .timeout(TRANSFER_TIMEOUT)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .with_context(|| format!("uploading {}", file.name))?;
    if terminal {
        eprintln!();
    }
    let answer: serde_json::Value = decode(response)
        .await
        .with_context(|| format!("uploading {}", file.name))?;
    eprintln!(
        "uploaded {} ({} bytes, on {})",
        file.name,
        file.size_bytes,
        servers_text(&answer)
    );
    Ok(())
}

/// How many servers hold an uploaded file: "1 server", "3 servers".
fn servers_text(answer: &serde_json::Value) -> String {
    match answer["copies"].as_u64() {
        Some(1) => "1 server".to_string(),
        _ => format!("{} servers", text(answer, "copies")),
    }
}

/// A file as a stream of chunks, read on the async runtime.
fn tokio_util_stream(
    file: tokio::fs::File,
) -> impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> {
    /// Bytes read from the file per chunk sent.
    const CHUNK_BYTES: usize = 1 << 20;
    futures_util::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buffer = vec![0u8; CHUNK_BYTES];
        match file.read(&mut buffer).await {
            Ok(0) => None,
            Ok(read) => {
                buffer.truncate(read);
                Some((Ok(buffer), file))
            }
            Err(error) => Some((Err(error), file)),
        }
    })
}

pub async fn node(command: NodeCommand, args: &ClientArgs) -> anyhow::Result<()> {
    let client = Client::new(args)?;
    let answer: serde_json::Value = match &command {
        NodeCommand::List => client.get("/api/v1/nodes").await?,
        NodeCommand::Drain { id } => {
            client
                .post(&format!("/api/v1/nodes/{id}/drain"), &serde_json::json!({}))
                .await?
        }
        NodeCommand::Undrain { id } => {
            client
                .post(
                    &format!("/api/v1/nodes/{id}/undrain"),
                    &serde_json::json!({}),
                )
                .await?
        }
    };
    if args.output == Output::Json || !matches!(command, NodeCommand::List) {
        out!("{}", serde_json::to_string_pretty(&answer)?)?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = answer
        .as_array()
        .into_iter()
        .flatten()
        .map(|node| {
            let memory: u64 = node["devices"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|device| device["memory_bytes"].as_u64())
                .sum();
            vec![
                text(node, "id"),
                text(node, "address"),
                text(node, "status"),
                node["devices"].as_array().map_or(0, Vec::len).to_string(),
                memory.to_string(),
                text(node, "replicas"),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "ADDRESS",
            "STATUS",
            "DEVICES",
            "MEMORY_BYTES",
            "REPLICAS",
        ],
        &rows,
    )?;
    Ok(())
}

pub async fn model(command: ModelCommand, args: &ClientArgs) -> anyhow::Result<()> {
    if let ModelCommand::Demo { out, seed } = &command {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let out = out.clone();
        let mut config = shoal_actors::train::TrainConfig::iris();
        if let Some(seed) = seed {
            config.seed = *seed;
        }
        let report = tokio::task::spawn_blocking(move || {
            shoal_actors::train::train_classifier(shoal_actors::IRIS_CSV, &config, &out)
        })
        .await??;
        if args.output == Output::Json {
            let report = serde_json::json!({
                "accuracy": report.accuracy,
                "rows": report.rows,
                "files": report.files,
            });
            out!("{}", serde_json::to_string_pretty(&report)?)?;
            return Ok(());
        }
        out!(
            "trained the iris classifier: accuracy {:.3} on {} rows; files: {}",
            report.accuracy,
            report.rows,
            report.files.join(", ")
        )?;
        return Ok(());
    }
    let client = Client::new(args)?;
    match command {
        ModelCommand::Demo { .. } => {}
        ModelCommand::Push {
            dir,
            name,
            format,
            parent,
        } => {
            let answer = push(&client, &dir, &name, format, parent).await?;
            if args.output == Output::Json {
                out!("{}", serde_json::to_string_pretty(&answer)?)?;
            } else {
                out!("{}", pushed(&name, &answer))?;
            }
        }
        ModelCommand::Optimise(request) => optimise(&client, args.output, request).await?,
        ModelCommand::Train(request) => train(&client, args.output, request).await?,
        ModelCommand::Show { name } => {
            let versions: Vec<serde_json::Value> = client.get("/api/v1/models").await?;
            let versions: Vec<&serde_json::Value> = versions
                .iter()
                .filter(|v| v["model"] == name.as_str())
                .collect();
            if versions.is_empty() {
                bail!("no model {name}");
            }
            if args.output == Output::Json {
                out!("{}", serde_json::to_string_pretty(&versions)?)?;
                return Ok(());
            }
            for line in model_lines(&name, &versions) {
                out!("{line}")?;
            }
        }
        ModelCommand::Alias {
            name,
            alias,
            version,
        } => {
            let answer: serde_json::Value = client
                .put(
                    &format!("/api/v1/models/{name}/aliases/{alias}"),
                    &serde_json::json!({"version": version}),
                )
                .await?;
            if args.output == Output::Json {
                out!("{}", serde_json::to_string_pretty(&answer)?)?;
                return Ok(());
            }
            out!(
                "{name}:{} -> version {}",
                text(&answer, "alias"),
                text(&answer, "version")
            )?;
        }
        ModelCommand::List => {
            let versions: Vec<serde_json::Value> = client.get("/api/v1/models").await?;
            if args.output == Output::Json {
                out!("{}", serde_json::to_string_pretty(&versions)?)?;
                return Ok(());
            }
            let rows: Vec<Vec<String>> = versions
                .iter()
                .map(|v| {
                    vec![
                        text(v, "model"),
                        text(v, "version"),
                        text(v, "format"),
                        text(v, "size_bytes"),
                        text(v, "manifest_digest").chars().take(16).collect(),
                    ]
                })
                .collect();
            print_table(
                &["MODEL", "VERSION", "FORMAT", "SIZE_BYTES", "DIGEST"],
                &rows,
            )?;
        }
    }
    Ok(())
}

/// `shoal model show` as a table: each version with its files and the aliases naming it,
/// then every alias of the model.
fn model_lines(name: &str, versions: &[&serde_json::Value]) -> Vec<String> {
    // Every version's entry carries the model's aliases.
    let aliases: Vec<(String, String)> = versions
        .first()
        .and_then(|version| version["aliases"].as_object())
        .into_iter()
        .flatten()
        .map(|(alias, version)| (alias.clone(), version.to_string()))
        .collect();
    let mut lines = Vec::new();
    for version in versions {
        let number = text(version, "version");
        let named: Vec<&str> = aliases
            .iter()
            .filter(|(_, target)| *target == number)
            .map(|(alias, _)| alias.as_str())
            .collect();
        let named = if named.is_empty() {
            String::new()
        } else {
            format!(" ({})", named.join(", "))
        };
        let parent = match version["parent"].as_u64() {
            Some(parent) => format!(", from version {parent}"),
            None => String::new(),
        };
        lines.push(format!(
            "{name} version {number}{named}: {} bytes{parent}, digest {}",
            text(version, "size_bytes"),
            text(version, "manifest_digest")
        ));
        for file in version["files"].as_array().into_iter().flatten() {
            lines.push(format!(
                "  {}  {}  {} bytes",
                text(file, "name"),
                text(file, "digest"),
                text(file, "size_bytes")
            ));
        }
    }
    let aliases: Vec<String> = aliases
        .iter()
        .map(|(alias, version)| format!("{alias} -> {version}"))
        .collect();
    lines.push(if aliases.is_empty() {
        "aliases: none".to_string()
    } else {
        format!("aliases: {}", aliases.join(", "))
    });
    lines
}

pub async fn deploy(command: DeployCommand, args: &ClientArgs) -> anyhow::Result<()> {
    let client = Client::new(args)?;
    match command {
        DeployCommand::Apply { file } => {
            let contents = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let deployment: crate::api::deployments::DeploymentFile = toml::from_str(&contents)
                .with_context(|| format!("{} is not a deployment file", file.display()))?;
            deployment.spec().map_err(anyhow::Error::msg)?;
            let answer: serde_json::Value = client.post("/api/v1/deployments", &deployment).await?;
            let applied = match answer["outcome"].as_str() {
                Some("DeploymentCreated") => "created".to_string(),
                Some("DeploymentUpdated") => "updated".to_string(),
                _ => format!("applied ({})", text(&answer, "outcome")),
            };
            let summary = format!("deployment {} {applied}", text(&answer, "name"));
            print_answer(args, &answer, &summary)?;
        }
        DeployCommand::Scale { name, replicas } => {
            let answer: serde_json::Value = client
                .post(
                    &format!("/api/v1/deployments/{name}/scale"),
                    &serde_json::json!({"replicas": replicas}),
                )
                .await?;
            let summary = format!(
                "deployment {} scaled to {} replicas",
                text(&answer, "name"),
                text(&answer, "replicas")
            );
            print_answer(args, &answer, &summary)?;
        }
        DeployCommand::Rollback { name } => {
            let answer: serde_json::Value = client
                .post(
                    &format!("/api/v1/deployments/{name}/rollback"),
                    &serde_json::json!({}),
                )
                .await?;
            let mut summary = format!(
                "deployment {} rolling back ({})",
                text(&answer, "name"),
                text(&answer, "outcome")
            );
            if let Some(note) = answer["note"].as_str() {
                summary = format!("{summary}; {note}");
            }
            print_answer(args, &answer, &summary)?;
        }
        DeployCommand::Show { name } => {
            let deployments: Vec<serde_json::Value> = client.get("/api/v1/deployments").await?;
            let Some(deployment) = deployments.iter().find(|d| d["name"] == name.as_str()) else {
                bail!("no deployment {name}");
            };
            if args.output == Output::Json {
                out!("{}", serde_json::to_string_pretty(deployment)?)?;
                return Ok(());
            }
            let versions = match deployment["selector"].get("split") {
                Some(_) => "versions",
                None => "version",
            };
            out!(
                "{name}: model {} {versions} {}, {}/{} ready",
                text(deployment, "model"),
                versions_text(deployment),
                text(deployment, "replicas_ready"),
                text(deployment, "replicas_wanted")
            )?;
            let rows: Vec<Vec<String>> = deployment["replicas"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    vec![
                        text(r, "id"),
                        text(r, "version"),
                        text(r, "node"),
                        replica_state_text(r),
                        text(r, "failure"),
                    ]
                })
                .collect();
            print_table(&["REPLICA", "VERSION", "NODE", "STATE", "FAILURE"], &rows)?;
        }
        DeployCommand::Delete { name } => {
            let answer: serde_json::Value = client
                .delete(&format!("/api/v1/deployments/{name}"))
                .await?;
            let summary = format!("deployment {} deleted", text(&answer, "deleted"));
            print_answer(args, &answer, &summary)?;
        }
        DeployCommand::List => {
            let deployments: Vec<serde_json::Value> = client.get("/api/v1/deployments").await?;
            if args.output == Output::Json {
                out!("{}", serde_json::to_string_pretty(&deployments)?)?;
                return Ok(());
            }
            let rows: Vec<Vec<String>> = deployments
                .iter()
                .map(|d| {
                    vec![
                        text(d, "name"),
                        text(d, "model"),
                        versions_text(d),
                        format!(
                            "{}/{}",
                            text(d, "replicas_ready"),
                            text(d, "replicas_wanted")
                        ),
                    ]
                })
                .collect();
            print_table(&["NAME", "MODEL", "VERSION", "READY"], &rows)?;
        }
    }
    Ok(())
}

/// A write's answer: as JSON with `-o json`, else as its one-line `summary`.
fn print_answer(
    args: &ClientArgs,
    answer: &serde_json::Value,
    summary: &str,
) -> anyhow::Result<()> {
    match args.output {
        Output::Json => out!("{}", serde_json::to_string_pretty(answer)?),
        Output::Table => out!("{summary}"),
    }
}

/// A replica's state from its view; a node marked Down is named, since such a replica
/// keeps the last state it reported: "Ready (node down)".
fn replica_state_text(replica: &serde_json::Value) -> String {
    let state = text(replica, "state");
    match replica["node_status"].as_str() {
        Some("Down") => format!("{state} (node down)"),
        _ => state,
    }
}

/// The version(s) a deployment serves, from its view: `1`, `2 (alias stable)`, or a
/// traffic split as `1 (90%), 2 (10%)`.
fn versions_text(deployment: &serde_json::Value) -> String {
    let selector = &deployment["selector"];
    if let Some(split) = selector["split"].as_array() {
        let weight = |share: &serde_json::Value| share["weight"].as_u64().unwrap_or(0);
        let total: u64 = split.iter().map(weight).sum::<u64>().max(1);
        return split
            .iter()
            .map(|share| {
                let percent = (weight(share) * 100 + total / 2) / total;
                format!("{} ({percent}%)", text(share, "version"))
            })
            .collect::<Vec<_>>()
            .join(", ");
    }
    match selector["alias"].as_str() {
        Some(alias) => format!("{} (alias {alias})", text(deployment, "version")),
        None => text(deployment, "version"),
    }
}

/// `shoal model optimise`: fetches a version, optimises it here and pushes the result with
/// that version as its parent, after comparing the two on a labelled CSV if asked.
async fn optimise(client: &Client, output: Output, request: OptimiseArgs) -> anyhow::Result<()> {
    let OptimiseArgs {
        name,
        version,
        prune,
        quantize,
        out,
        check_data,
        min_agreement,
    } = request;
    if let Some(least) = min_agreement
        && !(0.0..=1.0).contains(&least)
    {
        bail!("--min-agreement is a share of rows, from 0 to 1, not {least}");
    }
    let check_csv = match &check_data {
        Some(path) => Some(
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        ),
        None => None,
    };
    let optimisation = Optimisation {
        prune,
        quantize: quantize.map(|choice| match choice {
            QuantizeArg::Q8_0 => Quantization::Q8_0,
            QuantizeArg::Q4_0 => Quantization::Q4_0,
        }),
    };
    let scratch = tempfile::tempdir().context("a scratch directory")?;
    let dir = new_version_dir(out, &scratch)?;
    let versions: Vec<serde_json::Value> = client.get("/api/v1/models").await?;
    let source = versions
        .iter()
        .filter(|v| v["model"] == name.as_str())
        .filter(|v| version.is_none_or(|wanted| v["version"].as_u64() == Some(u64::from(wanted))))
        .max_by_key(|v| v["version"].as_u64())
        .with_context(|| match version {
            Some(version) => format!("model {name} has no version {version}"),
            None => format!("no model {name}"),
        })?;
    let number = source["version"].as_u64().unwrap_or(0);
    let parent = u32::try_from(number).context("a version number")?;
    let mut files = shoal_actors::runtime::ModelFiles::new();
    for file in source["files"].as_array().into_iter().flatten() {
        let file_name = text(file, "name");
        let bytes = download(client, &text(file, "digest"))
            .await
            .with_context(|| format!("fetching {file_name} of {name} version {number}"))?;
        files.insert(file_name, bytes);
    }
    let from = format!(
        "{name} version {number}, manifest sha256 {}",
        text(source, "manifest_digest")
    );
    let (optimised, report, check) = tokio::task::spawn_blocking(move || {
        let (optimised, report) = shoal_actors::optimise::optimise(&files, &optimisation, &from)?;
        let check = check_csv
            .map(|csv| compare_classifiers(&files, &optimised, &csv))
            .transpose()?;
        Ok::<_, shoal_actors::optimise::OptimiseError>((optimised, report, check))
    })
    .await??;
    if let Some(check) = &check {
        eprintln!(
            "on {} rows of {}: labels alike {:.3}; right {:.3}, against {:.3} for \
                 version {parent}; largest change of a probability {:.4}",
            check.rows,
            check_data.as_deref().unwrap_or(Path::new("-")).display(),
            check.agreement,
            check.optimised_accuracy,
            check.source_accuracy,
            check.largest_probability_change
        );
        if let Some(least) = min_agreement
            && check.agreement < least
        {
            bail!(
                "the optimised version labels {:.3} of the rows as version {parent} \
                     does, under --min-agreement {least}: not pushed",
                check.agreement
            );
        }
    }
    for (file_name, bytes) in &optimised {
        let path = dir.join(file_name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    let answer = push(
        client,
        &dir,
        &name,
        Some(report.format.into()),
        Some(parent),
    )
    .await?;
    if output == Output::Json {
        let report = serde_json::json!({
            "check": check,
            "from_version": parent,
            "optimisation": optimisation.describe(),
            "format": report.format,
            "weights_bytes_before": report.weights_bytes_before,
            "weights_bytes_after": report.weights_bytes_after,
            "tensors": report.tensors,
            "model": answer["model"],
            "version": answer["version"],
            "created": answer["created"],
        });
        out!("{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = report
        .tensors
        .iter()
        .map(|change| {
            vec![
                change.name.clone(),
                format!("{:?}", change.shape),
                change.stored_as.to_string(),
                change.zeroed.to_string(),
                format!("{:.4}", change.relative_error),
            ]
        })
        .collect();
    print_table(
        &["TENSOR", "SHAPE", "STORED", "ZEROED", "RELATIVE ERROR"],
        &rows,
    )?;
    out!(
        "{} from version {parent}: weights {} -> {} bytes ({})",
        optimisation.describe(),
        report.weights_bytes_before,
        report.weights_bytes_after,
        report.format
    )?;
    out!("{}", pushed(&name, &answer))?;
    Ok(())
}

/// `shoal model train`: trains a classifier here and pushes it as a new version.
async fn train(client: &Client, output: Output, request: TrainArgs) -> anyhow::Result<()> {
    let TrainArgs {
        name,
        data,
        holdout,
        hidden,
        epochs,
        learning_rate,
        seed,
        input,
        out,
    } = request;
    let csv =
        std::fs::read_to_string(&data).with_context(|| format!("reading {}", data.display()))?;
    let config = shoal_actors::train::TrainConfig {
        input,
        hidden_sizes: hidden,
        epochs,
        learning_rate,
        seed,
        holdout,
    };
    let scratch = tempfile::tempdir().context("a scratch directory")?;
    let dir = new_version_dir(out, &scratch)?;
    let trained_into = dir.clone();
    let report = tokio::task::spawn_blocking(move || {
        shoal_actors::train::train_classifier(&csv, &config, &trained_into)
    })
    .await?
    .with_context(|| format!("training on {}", data.display()))?;
    let answer = push(client, &dir, &name, None, None).await?;
    if output == Output::Json {
        let report = serde_json::json!({
            "accuracy": report.accuracy,
            "rows": report.rows,
            "holdout_accuracy": report.holdout_accuracy,
            "holdout_rows": report.holdout_rows,
            "model": answer["model"],
            "version": answer["version"],
            "created": answer["created"],
        });
        out!("{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(());
    }
    let held_out = match report.holdout_accuracy {
        Some(accuracy) => format!(
            "; {} rows held out (accuracy {accuracy:.3})",
            report.holdout_rows
        ),
        None => String::new(),
    };
    out!(
        "trained on {} rows (accuracy {:.3}){held_out}",
        report.rows,
        report.accuracy
    )?;
    out!("{}", pushed(&name, &answer))?;
    Ok(())
}

/// Uploads the files of `dir` and registers them as a version of `name`; the server's
/// answer. What the server would refuse (an unknown format, a file missing) is refused
/// before any upload, so no blob is left that nothing uses.
async fn push(
    client: &Client,
    dir: &Path,
    name: &str,
    format: Option<String>,
    parent: Option<u32>,
) -> anyhow::Result<serde_json::Value> {
    if let Some(format) = &format {
        crate::store::check_format(format).map_err(anyhow::Error::msg)?;
    }
    let files = collect_files(dir)?;
    let format = format.unwrap_or_else(|| {
        let gguf = files.iter().any(|file| file.name == GGUF_WEIGHTS_FILE);
        if gguf { "gguf" } else { "safetensors" }.to_string()
    });
    let names: Vec<&str> = files.iter().map(|file| file.name.as_str()).collect();
    let config_json = match files.iter().find(|file| file.name == CONFIG_FILE) {
        Some(config) => Some(
            std::fs::read(&config.path)
                .with_context(|| format!("reading {}", config.path.display()))?,
        ),
        None => None,
    };
    crate::store::check_loadable(&format, &names, config_json.as_deref())
        .map_err(anyhow::Error::msg)?;
    for file in &files {
        upload(client, file).await?;
    }
    let mut body = serde_json::json!({
        "format": format,
        "files": files.iter().map(|f| serde_json::json!({"name": f.name, "digest": f.digest})).collect::<Vec<_>>(),
    });
    // Named only when given: a server from before parents refuses a field it does not know.
    if let Some(parent) = parent {
        body["parent"] = parent.into();
    }
    client
        .post(&format!("/api/v1/models/{name}/versions"), &body)
        .await
}

/// Where a new version's files are written before they are pushed: `out`, new or empty
/// (every file there is pushed), else the scratch directory.
fn new_version_dir(out: Option<PathBuf>, scratch: &tempfile::TempDir) -> anyhow::Result<PathBuf> {
    let Some(dir) = out else {
        return Ok(scratch.path().to_path_buf());
    };
    if let Ok(mut entries) = std::fs::read_dir(&dir)
        && entries.next().is_some()
    {
        bail!(
            "{} is not empty: every file there would be pushed with the new version; give a \
             new or empty directory",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Longest a blob's upload or download may take: a large model's weights, not a call's
/// answer.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The blob `digest` from the artifact store, checked against its digest.
async fn download(client: &Client, digest: &str) -> anyhow::Result<Vec<u8>> {
    use sha2::Digest;
    let response = client
        .http
        .get(format!("{}/api/v1/blobs/{digest}", client.base))
        .timeout(TRANSFER_TIMEOUT)
        .send()
        .await
        .with_context(|| format!("cannot reach Shoal at {} (set SHOAL_ADDR)", client.base))?;
    if !response.status().is_success() {
        let _: serde_json::Value = decode(response).await?;
        bail!("the store answered without the blob");
    }
    let bytes = response.bytes().await.context("reading the blob")?;
    if hex::encode(sha2::Sha256::digest(&bytes)) != digest {
        bail!("the blob's bytes do not hash to {digest}");
    }
    Ok(bytes.to_vec())
}

/// A push's answer in words: `iris version 2 (new)`.
fn pushed(name: &str, answer: &serde_json::Value) -> String {
    let created = if answer["created"] == true {
        "new"
    } else {
        "existing"
    };
    format!("{name} version {} ({created})", text(answer, "version"))
}

/// `--data` as the model's one input, and the model's (or version's) path: what
/// `shoal infer` and `shoal explain` send.
async fn one_input(
    client: &Client,
    model: &str,
    version: Option<u32>,
    data: &str,
    command: &str,
) -> anyhow::Result<(String, RequestInput)> {
    let rows: serde_json::Value =
        serde_json::from_str(data).with_context(|| format!("--data is not JSON: {data}"))?;
    check_rows(&rows)?;
    let shape = shape_of(&rows)?;
    let path = match version {
        Some(version) => format!("/v2/models/{model}/versions/{version}"),
        None => format!("/v2/models/{model}"),
    };
    let metadata: ModelMetadata = client.get(&path).await?;
    let [input] = metadata.inputs.as_slice() else {
        bail!(
            "model {model} takes {} inputs; `shoal {command}` sends one",
            metadata.inputs.len()
        );
    };
    let input = RequestInput {
        name: input.name.clone(),
        shape,
        datatype: input.datatype.clone(),
        data: Some(serde_json::from_value(rows)?),
        parameters: None,
    };
    Ok((path, input))
}

pub async fn infer(request: InferArgs, args: &ClientArgs) -> anyhow::Result<()> {
    let client = Client::new(args)?;
    let (path, input) = one_input(
        &client,
        &request.model,
        request.version,
        &request.data,
        "infer",
    )
    .await?;
    let body = InferRequest {
        id: None,
        inputs: vec![input],
        outputs: Vec::new(),
        parameters: None,
    };
    let answer: InferResponse = client.post(&format!("{path}/infer"), &body).await?;
    if args.output == Output::Json {
        out!("{}", serde_json::to_string_pretty(&answer)?)?;
        return Ok(());
    }
    let rows_total = answer
        .outputs
        .first()
        .and_then(|o| o.shape.first().copied())
        .unwrap_or(0);
    let mut headers = vec!["ROW".to_string()];
    headers.extend(answer.outputs.iter().map(|o| o.name.to_uppercase()));
    let mut rows = Vec::new();
    for row in 0..rows_total {
        let mut cells = vec![row.to_string()];
        for output in &answer.outputs {
            let per_row: usize = output.shape.iter().skip(1).product();
            // The CLI asks for JSON answers, so every output carries its data.
            let Some(data) = &output.data else {
                cells.push("-".into());
                continue;
            };
            let cell = match data {
                ResponseData::Fp32(values) => {
                    join(&values[row * per_row..(row + 1) * per_row], |v| {
                        format!("{v:.4}")
                    })
                }
                ResponseData::Int64(values) => {
                    join(&values[row * per_row..(row + 1) * per_row], i64::to_string)
                }
                ResponseData::Bytes(values) => values[row * per_row..(row + 1) * per_row].join(" "),
            };
            cells.push(cell);
        }
        rows.push(cells);
    }
    let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
    print_table(&headers, &rows)?;
    out!(
        "model {} version {}",
        answer.model_name,
        answer.model_version
    )?;
    Ok(())
}

pub async fn explain(request: ExplainArgs, args: &ClientArgs) -> anyhow::Result<()> {
    let client = Client::new(args)?;
    let (path, input) = one_input(
        &client,
        &request.model,
        request.version,
        &request.data,
        "explain",
    )
    .await?;
    let baseline = match &request.baseline {
        None => None,
        Some(text) => Some(serde_json::from_str(text).with_context(|| {
            format!("--baseline is neither a number nor a JSON list of numbers: {text}")
        })?),
    };
    let body = ExplainRequest {
        inputs: vec![input],
        output: request.explained_output,
        baseline,
        method: request.method,
    };
    let answer: ExplainResponse = client.post(&format!("{path}/explain"), &body).await?;
    if args.output == Output::Json {
        out!("{}", serde_json::to_string_pretty(&answer)?)?;
        return Ok(());
    }
    let features = answer.baseline.len();
    let elements = answer.output_shape.iter().product::<usize>();
    let mut headers = vec!["FEATURE".to_string(), "VALUE".into(), "BASELINE".into()];
    headers.extend((0..elements).map(|j| format!("{}[{j}]", answer.output.to_uppercase())));
    let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
    let values = body.inputs[0]
        .data
        .as_ref()
        .map(|data| data.values.iter().map(feature_value).collect::<Vec<_>>())
        .unwrap_or_default();
    for (row, explanation) in answer.explanations.iter().enumerate() {
        out!(
            "row {row}: {} = {} (baseline {})",
            answer.output,
            join(&explanation.prediction, |v| format!("{v:.4}")),
            join(&explanation.baseline_prediction, |v| format!("{v:.4}"))
        )?;
        let table: Vec<Vec<String>> = (0..features)
            .map(|i| {
                let mut cells = vec![
                    i.to_string(),
                    values.get(row * features + i).cloned().unwrap_or_default(),
                    format!("{:.4}", answer.baseline[i]),
                ];
                cells.extend(
                    explanation
                        .attributions
                        .iter()
                        .map(|per_feature| format!("{:+.4}", per_feature[i])),
                );
                cells
            })
            .collect();
        print_table(&headers, &table)?;
    }
    out!(
        "model {} version {}, {} values",
        answer.model_name,
        answer.model_version,
        answer.method.as_str()
    )?;
    Ok(())
}

/// A feature's value as `--data` gave it, in the table's four decimals.
fn feature_value(element: &Element) -> String {
    match *element {
        Element::Float(value) => format!("{value:.4}"),
        Element::Int(value) => format!("{:.4}", value as f64),
        Element::Unsigned(value) => format!("{:.4}", value as f64),
        _ => element.to_string(),
    }
}

fn join<T>(values: &[T], show: impl Fn(&T) -> String) -> String {
    values.iter().map(show).collect::<Vec<_>>().join(" ")
}

/// Refuses `--data` that is not a JSON array (of rows, or of one row's numbers).
fn check_rows(data: &serde_json::Value) -> anyhow::Result<()> {
    if !data.is_array() {
        bail!("--data must be a JSON array of rows, e.g. '[[5.1, 3.5, 1.4, 0.2]]', not {data}");
    }
    Ok(())
}

/// The shape of nested JSON arrays; every row must be as long as its siblings.
fn shape_of(data: &serde_json::Value) -> anyhow::Result<Vec<i64>> {
    let mut shape = Vec::new();
    let mut level = vec![data];
    loop {
        let lengths: Vec<Option<usize>> =
            level.iter().map(|v| v.as_array().map(Vec::len)).collect();
        match lengths.first().copied().flatten() {
            None if lengths.iter().all(Option::is_none) => return Ok(shape),
            Some(length) if lengths.iter().all(|l| *l == Some(length)) => {
                shape.push(length as i64);
                level = level
                    .iter()
                    .flat_map(|v| v.as_array().into_iter().flatten())
                    .collect();
            }
            _ => bail!("--data is ragged: every row must have the same length"),
        }
    }
}

fn text(value: &serde_json::Value, key: &str) -> String {
    match value.get(key) {
        Some(serde_json::Value::String(text)) => text.clone(),
        Some(serde_json::Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn print_table(headers: &[&str], rows: &[Vec<String>]) -> anyhow::Result<()> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out!("{}", padded.join("  ").trim_end())
    };
    line(headers.to_vec())?;
    for row in rows {
        line(row.iter().map(String::as_str).collect())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_rows_give_their_shape() {
        assert_eq!(shape_of(&json!([[1, 2, 3, 4]])).unwrap(), vec![1, 4]);
        assert_eq!(shape_of(&json!([1, 2])).unwrap(), vec![2]);
        assert!(shape_of(&json!([[1, 2], [3]])).is_err());
    }

    #[test]
    fn a_deployments_split_and_alias_are_shown_with_its_version() {
        let split = json!({"version": 1, "selector": {"split": [
            {"version": 1, "weight": 90}, {"version": 2, "weight": 10}]}});
        assert_eq!(versions_text(&split), "1 (90%), 2 (10%)");
        let thirds = json!({"version": 2, "selector": {"split": [
            {"version": 1, "weight": 1}, {"version": 2, "weight": 2}]}});
        assert_eq!(versions_text(&thirds), "1 (33%), 2 (67%)");
        let follows = json!({"version": 2, "selector": {"alias": "stable"}});
        assert_eq!(versions_text(&follows), "2 (alias stable)");
        let pinned = json!({"version": 1, "selector": {"version": 1}});
        assert_eq!(versions_text(&pinned), "1");
    }

    #[test]
    fn a_replica_on_a_down_node_says_so_beside_its_last_state() {
        let down = json!({"state": "Ready", "node_status": "Down"});
        assert_eq!(replica_state_text(&down), "Ready (node down)");
        let up = json!({"state": "Ready", "node_status": "Ready"});
        assert_eq!(replica_state_text(&up), "Ready");
    }

    #[test]
    fn an_address_without_a_scheme_is_taken_as_http() {
        assert_eq!(base_url("127.0.0.1:7401").unwrap(), "http://127.0.0.1:7401");
        assert_eq!(
            base_url("http://127.0.0.1:7401/").unwrap(),
            "http://127.0.0.1:7401"
        );
        assert_eq!(
            base_url("https://shoal.example").unwrap(),
            "https://shoal.example"
        );
        let refused = base_url("ftp://host:1").unwrap_err().to_string();
        assert!(
            refused.contains("give the address as http://host:port"),
            "{refused}"
        );
    }

    #[test]
    fn infer_data_that_is_not_an_array_of_rows_says_so() {
        let refused = check_rows(&json!({"x": 1})).unwrap_err().to_string();
        assert!(
            refused.contains("must be a JSON array of rows"),
            "{refused}"
        );
        assert!(check_rows(&json!([[1, 2]])).is_ok());
    }

    #[test]
    fn one_server_is_not_servers() {
        assert_eq!(servers_text(&json!({"copies": 1})), "1 server");
        assert_eq!(servers_text(&json!({"copies": 3})), "3 servers");
    }

    #[test]
    fn model_show_names_each_alias_and_the_version_it_points_at() {
        let aliases = json!({"stable": 1, "canary": 2});
        let versions = [
            json!({"model": "iris", "version": 1, "size_bytes": 10, "manifest_digest": "aa",
                   "files": [], "aliases": aliases}),
            json!({"model": "iris", "version": 2, "size_bytes": 20, "manifest_digest": "bb",
                   "files": [], "aliases": aliases}),
        ];
        let lines = model_lines("iris", &versions.iter().collect::<Vec<_>>());
        assert_eq!(
            lines,
            [
                "iris version 1 (stable): 10 bytes, digest aa",
                "iris version 2 (canary): 20 bytes, digest bb",
                "aliases: canary -> 2, stable -> 1",
            ]
        );
        let bare = json!({"model": "m", "version": 1, "size_bytes": 1, "manifest_digest": "c",
                          "files": [], "aliases": {}});
        assert_eq!(model_lines("m", &[&bare])[1], "aliases: none");
    }
}
