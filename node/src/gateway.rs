//! `shoal gateway`: the HTTP submit endpoint alone. It is no raft member: it follows the
//! cluster state from any server (a blocking query on the revision), routes inference to
//! agents exactly as a server's gateway does, and forwards admin writes to the leader.

use crate::api::nodes::LEADER_HEADER;
use crate::api::{self, AppState};
use crate::auth::Tokens;
use crate::control::ControlPlane;
use crate::store::ArtifactStore;
use anyhow::Context;
use shoal_consensus::RaftStatus;
use shoal_scheduler::ClusterState;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;
use tokio::sync::watch;

/// How long one state poll may wait on the server for a change.
const POLL_WAIT: Duration = Duration::from_secs(20);
/// Pause before trying the next server after a failure.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Settings of `shoal gateway`, validated.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Base URLs of the servers, `http://host:port`.
    pub servers: Vec<String>,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub tokens: Tokens,
    pub token: Option<String>,
    pub admission_limit: usize,
}

/// Keeps `states` and `raft` up to date from the servers, rotating on failure.
async fn follow(
    config: GatewayConfig,
    states: watch::Sender<Arc<ClusterState>>,
    raft: watch::Sender<RaftStatus>,
) {
    let http = match reqwest::Client::builder()
        .timeout(POLL_WAIT + Duration::from_secs(5))
        .build()
    {
        Ok(http) => http,
        Err(error) => {
            tracing::error!(%error, "no HTTP client; the gateway cannot follow the state");
            return;
        }
    };
    let mut next = 0usize;
    loop {
        let base = &config.servers[next % config.servers.len()];
        let revision = states.borrow().applied_index;
        let url = format!(
            "{base}/api/v1/state?revision={revision}&wait_ms={}",
            POLL_WAIT.as_millis()
        );
        let mut request = http.get(url);
        if let Some(token) = &config.token {
            request = request.bearer_auth(token);
        }
        let answer = match request.send().await {
            Ok(answer) if answer.status().is_success() => answer,
            _ => {
                next += 1;
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
        };
        let leader = answer
            .headers()
            .get(LEADER_HEADER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        let Ok(bytes) = answer.bytes().await else {
            next += 1;
            continue;
        };
        let decoded: Result<(ClusterState, usize), _> =
            bincode::serde::decode_from_slice(&bytes, crate::control::wire());
        let Ok((state, _)) = decoded else {
            tracing::warn!(server = %base, "a server sent a state that does not decode");
            next += 1;
            continue;
        };
        // A server behind what we have is skipped, never followed backwards.
        if state.applied_index >= states.borrow().applied_index {
            states.send_replace(Arc::new(state));
        } else {
            next += 1;
        }
        raft.send_if_modified(|status| {
            let changed = status.leader != leader;
            status.leader = leader;
            changed
        });
    }
}

pub async fn run(config: GatewayConfig) -> anyhow::Result<()> {
    crate::up::listen_for_shutdown();
    shoal_ops::metrics::set_process_role("gateway");
    let data_dir = crate::datadir::DataDir::lock(&config.data_dir)?;
    let (states, state_receiver) = watch::channel(Arc::new(ClusterState::default()));
    let (raft, raft_receiver) = watch::channel(RaftStatus::default());
    tokio::spawn(follow(config.clone(), states, raft));
    let (_no_agent, routes) = watch::channel(Arc::new(shoal_actors::agent::Routes::default()));
    let app = Arc::new(AppState {
        control: ControlPlane::follower(state_receiver, raft_receiver),
        routes,
        next_route: AtomicUsize::new(0),
        required_models: Vec::new(),
        store: Arc::new(
            ArtifactStore::open(&data_dir.blobs()).context("opening the artifact store")?,
        ),
        forwarder: Some(
            api::cluster::Forwarder::new(Default::default())
                .context("building the forwarding client")?,
        ),
        tokens: config.tokens.clone(),
        member_id: 0,
        leases: None,
        gateway: api::gateway::Gateway::new().context("building the gateway client")?,
        load: Arc::default(),
        admission: api::Admission::new(config.admission_limit),
        traffic: None,
        embedded: false,
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let address = listener.local_addr()?;
    println!("shoal: listening on http://{address}");
    tracing::info!(http = %address, servers = ?config.servers, "gateway started");
    axum::serve(listener, api::router(app))
        .with_graceful_shutdown(crate::up::shutdown_signal())
        .await
        .context("serving HTTP")?;
    drop(data_dir);
    tracing::info!("gateway stopped");
    Ok(())
}
