//! The CLI client: `shoal model …`, `shoal deploy …`, `shoal infer …` against a running
//! Shoal at `SHOAL_ADDR`.

use crate::api::oip::{InferRequest, InferResponse, ModelMetadata, RequestInput, ResponseData};
use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use serde::de::DeserializeOwned;
use std::time::Duration;

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
}

#[derive(Debug, Subcommand)]
pub enum DeployCommand {
    /// Every deployment with its replicas.
    List,
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
            base: args.addr.trim_end_matches('/').to_string(),
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .with_context(|| format!("cannot reach Shoal at {} (set SHOAL_ADDR)", self.base))?;
        decode(response).await
    }

    async fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let response = self
            .http
            .delete(format!("{}{path}", self.base))
            .send()
            .await
            .with_context(|| format!("cannot reach Shoal at {} (set SHOAL_ADDR)", self.base))?;
        decode(response).await
    }

    async fn post<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .with_context(|| format!("cannot reach Shoal at {} (set SHOAL_ADDR)", self.base))?;
        decode(response).await
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
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    let members = answer["members"].as_array().cloned().unwrap_or_default();
    if is_status {
        println!(
            "member {} sees leader {} in term {}; commit {}, applied {}, snapshot {}",
            text(&answer, "id"),
            text(&answer, "leader"),
            text(&answer, "term"),
            text(&answer, "commit_index"),
            text(&answer, "applied_index"),
            text(&answer, "snapshot_index"),
        );
    }
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| vec![text(m, "id"), text(m, "role"), text(m, "leader")])
        .collect();
    print_table(&["ID", "ROLE", "LEADER"], &rows);
    Ok(())
}

pub async fn model(command: ModelCommand, args: &ClientArgs) -> anyhow::Result<()> {
    let client = Client::new(args)?;
    match command {
        ModelCommand::List => {
            let versions: Vec<serde_json::Value> = client.get("/api/v1/models").await?;
            if args.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&versions)?);
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
            );
        }
    }
    Ok(())
}

pub async fn deploy(command: DeployCommand, args: &ClientArgs) -> anyhow::Result<()> {
    let client = Client::new(args)?;
    match command {
        DeployCommand::List => {
            let deployments: Vec<serde_json::Value> = client.get("/api/v1/deployments").await?;
            if args.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&deployments)?);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = deployments
                .iter()
                .map(|d| {
                    vec![
                        text(d, "name"),
                        text(d, "model"),
                        text(d, "version"),
                        format!(
                            "{}/{}",
                            text(d, "replicas_ready"),
                            text(d, "replicas_wanted")
                        ),
                    ]
                })
                .collect();
            print_table(&["NAME", "MODEL", "VERSION", "READY"], &rows);
        }
    }
    Ok(())
}

pub async fn infer(request: InferArgs, args: &ClientArgs) -> anyhow::Result<()> {
    let client = Client::new(args)?;
    let data: serde_json::Value = serde_json::from_str(&request.data)
        .with_context(|| format!("--data is not JSON: {}", request.data))?;
    let shape = shape_of(&data)?;
    let path = match request.version {
        Some(version) => format!("/v2/models/{}/versions/{version}", request.model),
        None => format!("/v2/models/{}", request.model),
    };
    let metadata: ModelMetadata = client.get(&path).await?;
    let [input] = metadata.inputs.as_slice() else {
        bail!(
            "model {} takes {} inputs; `shoal infer` sends one",
            request.model,
            metadata.inputs.len()
        );
    };
    let body = InferRequest {
        id: None,
        inputs: vec![RequestInput {
            name: input.name.clone(),
            shape,
            datatype: input.datatype.clone(),
            data,
        }],
        outputs: Vec::new(),
    };
    let answer: InferResponse = client.post(&format!("{path}/infer"), &body).await?;
    if args.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
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
            let cell = match &output.data {
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
    print_table(&headers, &rows);
    println!(
        "model {} version {}",
        answer.model_name, answer.model_version
    );
    Ok(())
}

fn join<T>(values: &[T], show: impl Fn(&T) -> String) -> String {
    values.iter().map(show).collect::<Vec<_>>().join(" ")
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

fn print_table(headers: &[&str], rows: &[Vec<String>]) {
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
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
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
}
