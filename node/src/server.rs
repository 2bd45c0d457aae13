//! `shoal server`: one member of a 1-, 3- or 5-member control plane. Raft over TCP, the
//! replicated cluster state, the leader's placement controller, the admin API (writes
//! forwarded to the leader), the artifact store and the gateway, on one HTTP address.

use crate::api::cluster::Forwarder;
use crate::api::{self, AppState};
use crate::auth::Tokens;
use crate::control::{ClusterStateMachine, ControlPlane};
use crate::datadir::DataDir;
use crate::loops;
use crate::store::ArtifactStore;
use anyhow::{Context, bail};
use shoal_consensus::ConsensusConfig;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;
use tokio::sync::watch;

/// Raft timing for servers: a heartbeat every 100 ms and an election after 500-1000 ms
/// without one, so a lost leader is replaced well within a second and a half.
const TICK_INTERVAL: Duration = Duration::from_millis(50);
const ELECTION_TICKS: usize = 10;
const HEARTBEAT_TICKS: usize = 2;
/// Applied entries between snapshots of the cluster state.
const SNAPSHOT_INTERVAL_ENTRIES: u64 = 10_000;

/// Settings of `shoal server`, validated.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub id: u64,
    pub data_dir: PathBuf,
    /// HTTP: admin API, gateway, `/metrics`.
    pub listen: SocketAddr,
    /// Raft traffic between servers.
    pub raft_listen: SocketAddr,
    pub cluster_id: u64,
    /// Raft addresses of the members, this one included.
    pub peers: BTreeMap<u64, String>,
    /// HTTP addresses of the members, for forwarding writes to the leader.
    pub http_peers: BTreeMap<u64, String>,
    /// Start without membership and wait to be added, instead of bootstrapping `peers`.
    pub join: bool,
    /// Accepted bearer tokens (hashed); empty turns authentication off.
    pub tokens: Tokens,
    /// This server's own admin token, for the calls it makes to the cluster.
    pub token: Option<String>,
    /// Allow listening beyond loopback without tokens.
    pub insecure: bool,
    /// Per-model bound on requests in flight through this server's gateway.
    pub admission_limit: usize,
}

/// Refuses to serve beyond loopback with no tokens, unless told `--insecure`.
pub fn check_exposure(listen: SocketAddr, tokens: &Tokens, insecure: bool) -> anyhow::Result<()> {
    if !listen.ip().is_loopback() && tokens.is_empty() && !insecure {
        bail!(
            "refusing to listen on {listen} without tokens: anyone who can reach it could \
             change the cluster. Pass --tokens FILE, or --insecure if that is really wanted"
        );
    }
    Ok(())
}

/// Parses `1=host:port,2=host:port` into a map of member id to address.
pub fn parse_members(text: &str) -> anyhow::Result<BTreeMap<u64, String>> {
    let mut members = BTreeMap::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let Some((id, address)) = entry.split_once('=') else {
            bail!("{entry:?} is not ID=HOST:PORT");
        };
        let id: u64 = id
            .trim()
            .parse()
            .with_context(|| format!("member id {id:?}"))?;
        if id == 0 {
            bail!("member ids start at 1");
        }
        let address = address.trim();
        address
            .parse::<SocketAddr>()
            .with_context(|| format!("member {id} address {address:?} is not HOST:PORT"))?;
        if members.insert(id, address.to_string()).is_some() {
            bail!("member {id} is listed twice");
        }
    }
    Ok(members)
}

impl ServerConfig {
    /// Checks that the pieces agree.
    pub fn validate(self) -> anyhow::Result<ServerConfig> {
        if self.id == 0 {
            bail!("--id must be at least 1");
        }
        if !self.join && !self.peers.contains_key(&self.id) {
            bail!(
                "--peers must list this server ({}) when bootstrapping",
                self.id
            );
        }
        if !self.join && ![1, 3, 5].contains(&self.peers.len()) {
            bail!(
                "a control plane bootstraps with 1, 3 or 5 servers, not {}",
                self.peers.len()
            );
        }
        check_exposure(self.listen, &self.tokens, self.insecure)?;
        if !self.tokens.is_empty() && self.token.is_none() {
            bail!("with --tokens, set SHOAL_TOKEN to an admin token for this server's own calls");
        }
        Ok(self)
    }
}

pub async fn run(config: ServerConfig) -> anyhow::Result<()> {
    crate::up::listen_for_shutdown();
    shoal_ops::metrics::set_process_role("server");
    let data_dir = DataDir::lock(&config.data_dir)?;
    data_dir.check_state_format(crate::control::STATE_FORMAT)?;
    let mut peers = config.peers.clone();
    peers
        .entry(config.id)
        .or_insert_with(|| config.raft_listen.to_string());
    let consensus_config = ConsensusConfig {
        id: config.id,
        dir: data_dir.raft(),
        cluster_id: config.cluster_id,
        peers,
        bootstrap: !config.join,
        listen: Some(config.raft_listen),
        tick_interval: TICK_INTERVAL,
        election_ticks: ELECTION_TICKS,
        heartbeat_ticks: HEARTBEAT_TICKS,
        snapshot_interval_entries: SNAPSHOT_INTERVAL_ENTRIES,
    };
    let (machine, states) = ClusterStateMachine::new();
    let consensus = shoal_consensus::start(&consensus_config, machine)
        .await
        .context("starting consensus")?;
    // Its snapshot restored: the dir's state reads in this build's format.
    data_dir.mark_state_format(crate::control::STATE_FORMAT)?;
    let control = ControlPlane::new(consensus.handle(), states);
    let store =
        Arc::new(ArtifactStore::open(&data_dir.blobs()).context("opening the artifact store")?);
    let http_peers = config
        .http_peers
        .iter()
        .map(|(id, address)| (*id, format!("http://{address}")))
        .collect();
    let (_no_agent, routes) = watch::channel(Arc::new(shoal_actors::agent::Routes::default()));
    let leases = Arc::new(crate::leases::Leases::default());
    let load = Arc::new(crate::load::LoadBoard::default());
    let app = Arc::new(AppState {
        control: control.clone(),
        routes,
        next_route: AtomicUsize::new(0),
        required_models: Vec::new(),
        store: store.clone(),
        forwarder: Some(Forwarder::new(http_peers).context("building the forwarding client")?),
        tokens: config.tokens.clone(),
        member_id: config.id,
        leases: Some(leases.clone()),
        gateway: crate::api::gateway::Gateway::new().context("building the gateway client")?,
        load: load.clone(),
        admission: crate::api::Admission::new(config.admission_limit),
        traffic: None,
        embedded: false,
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let address = listener.local_addr()?;
    let (stop, stopping) = watch::channel(false);
    let controller = tokio::spawn(loops::run_controller(control.clone(), stopping.clone()));
    let publisher = tokio::spawn(crate::cluster_metrics::run_publisher(
        control.clone(),
        stopping.clone(),
    ));
    let autoscaler = tokio::spawn(crate::load::run_autoscaler(
        control.clone(),
        load,
        stopping.clone(),
    ));
    let detector = tokio::spawn(crate::leases::run_failure_detector(
        control.clone(),
        leases,
        stopping.clone(),
    ));
    let sweeper = tokio::spawn(crate::store::run_sweeper(
        store.clone(),
        control.clone(),
        stopping.clone(),
    ));
    let registration = tokio::spawn(register_self(
        control.clone(),
        config.id,
        address,
        config.token.clone(),
        stopping,
    ));
    println!("shoal: listening on http://{address}");
    tracing::info!(
        id = config.id,
        raft = %config.raft_listen,
        http = %address,
        join = config.join,
        "server started"
    );
    let served = axum::serve(listener, api::router(app))
        .with_graceful_shutdown(crate::up::shutdown_signal_or_lost_raft(consensus.handle()))
        .await;
    // Asked before the process stops the driver itself.
    let lost = consensus.handle().has_stopped();
    let _ = stop.send(true);
    let _ = controller.await;
    let _ = sweeper.await;
    let _ = publisher.await;
    let _ = detector.await;
    let _ = autoscaler.await;
    registration.abort();
    tokio::task::spawn_blocking(move || consensus.shutdown()).await?;
    drop(data_dir);
    served.context("serving HTTP")?;
    anyhow::ensure!(!lost, crate::up::RAFT_LOST);
    tracing::info!("server stopped");
    Ok(())
}

/// Records this server's HTTP address in the replicated state, through its own admin API
/// (which forwards to the leader), retrying until it is there.
async fn register_self(
    control: ControlPlane,
    id: u64,
    address: SocketAddr,
    token: Option<String>,
    mut stopping: watch::Receiver<bool>,
) {
    /// Time between attempts while there is no leader yet or the write fails.
    const RETRY_INTERVAL: Duration = Duration::from_millis(200);
    let Ok(client) = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
    else {
        return;
    };
    let http_address = address.to_string();
    let url = format!("http://{address}/api/v1/cluster/servers/{id}");
    loop {
        if control.state().servers.get(&id) == Some(&http_address) {
            tracing::info!(id, %http_address, "server address registered");
            return;
        }
        if control.raft_status().leader.is_some() {
            let body = serde_json::json!({"http_address": http_address});
            let mut request = client.put(&url).json(&body);
            if let Some(token) = &token {
                request = request.bearer_auth(token);
            }
            if let Err(error) = request.send().await {
                tracing::debug!(%error, "registering this server's address");
            }
        }
        tokio::select! {
            _ = stopping.changed() => return,
            () = tokio::time::sleep(RETRY_INTERVAL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_lists_parse_and_refuse_mistakes() {
        let members = parse_members("1=127.0.0.1:7101, 2=127.0.0.1:7102").unwrap();
        assert_eq!(members[&2], "127.0.0.1:7102");
        assert!(parse_members("1=127.0.0.1:7101,1=127.0.0.1:7102").is_err());
        assert!(parse_members("0=127.0.0.1:7101").is_err());
        assert!(parse_members("1=nowhere").is_err());
        assert!(parse_members("127.0.0.1:7101").is_err());
    }

    #[test]
    fn a_bootstrap_needs_an_odd_small_group_that_includes_this_server() {
        let config = |id, peers: &str, join| ServerConfig {
            id,
            data_dir: "d".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            raft_listen: "127.0.0.1:0".parse().unwrap(),
            cluster_id: 1,
            peers: parse_members(peers).unwrap(),
            http_peers: BTreeMap::new(),
            join,
            tokens: Tokens::default(),
            token: None,
            insecure: false,
            admission_limit: 1,
        };
        let three = "1=127.0.0.1:1,2=127.0.0.1:2,3=127.0.0.1:3";
        assert!(config(1, three, false).validate().is_ok());
        assert!(config(4, three, false).validate().is_err());
        assert!(
            config(1, "1=127.0.0.1:1,2=127.0.0.1:2", false)
                .validate()
                .is_err()
        );
        assert!(config(4, three, true).validate().is_ok());
    }

    #[test]
    fn an_exposed_listener_needs_tokens_or_an_explicit_insecure() {
        let open: SocketAddr = "0.0.0.0:7070".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:7070".parse().unwrap();
        let tokens = Tokens::parse(&format!("admin {}", crate::auth::hash_token("t"))).unwrap();
        assert!(check_exposure(local, &Tokens::default(), false).is_ok());
        let refused = check_exposure(open, &Tokens::default(), false).unwrap_err();
        assert!(refused.to_string().contains("--insecure"), "{refused}");
        assert!(check_exposure(open, &Tokens::default(), true).is_ok());
        assert!(check_exposure(open, &tokens, false).is_ok());
    }
}
