//! `shoal up`: control plane, agent and gateway in one process, over one data dir.

use crate::api::{self, AppState};
use crate::control::{ClusterStateMachine, ControlPlane};
use crate::datadir::DataDir;
use crate::demo;
use crate::loops::{self, ProposingReporter};
use crate::store::ArtifactStore;
use anyhow::Context;
use shoal_consensus::{ConsensusConfig, ConsensusHandle};
use shoal_scheduler::{Command, NodeId};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;
use tokio::sync::watch;

/// The embedded mode's one raft member and one node.
const MEMBER_ID: u64 = 1;
const NODE_ID: NodeId = NodeId(1);

/// Longest to wait for the single member to lead.
const LEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of `shoal up`, validated.
#[derive(Clone, Debug)]
pub struct UpConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Accepted bearer tokens; empty turns authentication off.
    pub tokens: crate::auth::Tokens,
    /// Per-model bound on requests in flight through the gateway.
    pub admission_limit: usize,
}

pub async fn run(config: UpConfig) -> anyhow::Result<()> {
    listen_for_shutdown();
    shoal_ops::metrics::set_process_role("up");
    let data_dir = DataDir::lock(&config.data_dir)?;
    data_dir.check_state_format(crate::control::STATE_FORMAT)?;
    let (machine, states) = ClusterStateMachine::new();
    let consensus = shoal_consensus::start(
        &ConsensusConfig::single(MEMBER_ID, data_dir.raft()),
        machine,
    )
    .await
    .context("starting consensus")?;
    // Its snapshot restored: the dir's state reads in this build's format.
    data_dir.mark_state_format(crate::control::STATE_FORMAT)?;
    let control = ControlPlane::new(consensus.handle(), states);
    let mut raft = control.watch_raft();
    tokio::time::timeout(LEADER_TIMEOUT, raft.wait_for(|status| status.is_leader))
        .await
        .context("the control plane did not elect itself leader")??;

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let address = listener.local_addr()?;

    // Registering the node is also a barrier: its answer comes after every entry before
    // it, so the state replayed from the log is complete once it returns.
    let devices = shoal_actors::device::discover_devices();
    control
        .propose(&Command::RegisterNode {
            id: NODE_ID,
            address: address.to_string(),
            devices: devices.clone(),
            labels: BTreeMap::new(),
        })
        .await
        .context("registering this node")?;
    let recovered = control.state();
    tracing::info!(
        applied_index = recovered.applied_index,
        models = recovered.models.len(),
        deployments = recovered.deployments.len(),
        "control plane state recovered"
    );

    // The demo is set up on a data dir's first start only; until it serves, that start is
    // not ready. Later starts are ready when the deployments the log holds are served.
    let first_start = !demo::is_set_up(&recovered);

    let store =
        Arc::new(ArtifactStore::open(&data_dir.blobs()).context("opening the artifact store")?);
    let reporter = Arc::new(ProposingReporter::start(control.clone()));
    let actors = shoal_actors::agent::AgentConfig {
        node: NODE_ID.0.to_string(),
        ..Default::default()
    };
    let (agent, routes) = shoal_actors::agent::start_with(devices, store.clone(), reporter, actors)
        .await
        .context("starting the agent")?;

    let (stop, stopping) = watch::channel(false);
    let controller = tokio::spawn(loops::run_controller(control.clone(), stopping.clone()));
    let publisher = tokio::spawn(crate::cluster_metrics::run_publisher(
        control.clone(),
        stopping.clone(),
    ));
    let sweeper = tokio::spawn(crate::store::run_sweeper(
        store.clone(),
        control.clone(),
        stopping.clone(),
    ));
    let reconciler = tokio::spawn(loops::run_reconciler(
        control.clone(),
        NODE_ID,
        agent.clone(),
        stopping.clone(),
    ));
    // No agent reports this node's load: the gateway counts it as it serves, for the
    // autoscaler as in a cluster.
    let load = Arc::new(crate::load::LoadBoard::default());
    let traffic = Arc::new(crate::load::TrafficMeter::default());
    let reporter = tokio::spawn(crate::load::report_own_load(
        traffic.clone(),
        routes.clone(),
        load.clone(),
        NODE_ID,
        crate::agent::HEARTBEAT_INTERVAL,
        stopping.clone(),
    ));
    let autoscaler = tokio::spawn(crate::load::run_autoscaler(
        control.clone(),
        load.clone(),
        stopping.clone(),
    ));

    let app = Arc::new(AppState {
        control: control.clone(),
        routes: routes.clone(),
        next_route: AtomicUsize::new(0),
        required_models: if first_start {
            vec![demo::DEMO_MODEL.to_string()]
        } else {
            Vec::new()
        },
        store: store.clone(),
        forwarder: None,
        tokens: config.tokens.clone(),
        member_id: MEMBER_ID,
        leases: None,
        gateway: crate::api::gateway::Gateway::new().context("building the gateway client")?,
        load,
        traffic: Some(traffic),
        admission: crate::api::Admission::new(config.admission_limit),
        embedded: true,
    });
    let mut server = tokio::spawn(
        axum::serve(listener, api::router(app))
            .with_graceful_shutdown(shutdown_signal_or_lost_raft(consensus.handle()))
            .into_future(),
    );
    // The exact line tests and scripts read to find the port when `--listen` ends in :0.
    println!("shoal: listening on http://{address}");

    let startup = async {
        demo::ensure(&control, &store, &data_dir.scratch()).await?;
        // On a later start the operator may have deleted the demo's deployment, or left it
        // scaled to zero: then there is nothing to wait for.
        let demo_served = control.state().deployments.values().any(|deployment| {
            deployment.model() == demo::DEMO_MODEL && deployment.replicas_desired > 0
        });
        if demo_served {
            let mut routes = routes.clone();
            routes
                .wait_for(|table| !table.for_model(demo::DEMO_MODEL).is_empty())
                .await
                .context("the agent stopped before the demo model was ready")?;
        }
        print_welcome(address, demo_served);
        anyhow::Ok(())
    };
    let served = tokio::select! {
        started = startup => match started {
            Ok(()) => (&mut server).await,
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), "startup failed; shutting down");
                server.abort();
                let _ = stop.send(true);
                agent.stop().await;
                tokio::task::spawn_blocking(move || consensus.shutdown()).await?;
                return Err(error);
            }
        },
        // A signal during startup: the server has drained; shut down without the demo.
        served = &mut server => served,
    };

    tracing::info!("http server drained; stopping");
    // Asked before the process stops the driver itself.
    let lost = consensus.handle().has_stopped();
    let _ = stop.send(true);
    let _ = tokio::join!(
        controller, publisher, reconciler, reporter, autoscaler, sweeper
    );
    agent.stop().await;
    tokio::task::spawn_blocking(move || consensus.shutdown()).await?;
    drop(data_dir);
    served
        .context("the HTTP server task failed")?
        .context("serving HTTP")?;
    anyhow::ensure!(!lost, RAFT_LOST);
    tracing::info!("shoal stopped");
    Ok(())
}

/// Resolves on Ctrl-C, SIGTERM, or when the raft driver ended by itself (a fatal log
/// error or a panic). A member without its driver cannot take part in the group, and
/// serving a state that no longer moves helps nobody: it shuts down and exits non-zero
/// for its supervisor to restart it.
pub(crate) async fn shutdown_signal_or_lost_raft(consensus: ConsensusHandle) {
    tokio::select! {
        () = shutdown_signal() => {}
        () = consensus.stopped() => {
            tracing::error!("the raft driver stopped; shutting down");
        }
    }
}

/// What a member exits with when its raft driver ended before it was asked to.
pub(crate) const RAFT_LOST: &str =
    "the raft driver stopped (see the log above); exiting to be restarted";

/// Set once a shutdown is asked for, from the moment [`listen_for_shutdown`] runs.
static SHUTDOWN: std::sync::OnceLock<watch::Receiver<bool>> = std::sync::OnceLock::new();

/// Starts listening for Ctrl-C and SIGTERM at once; a long-running command calls it first,
/// inside the runtime. Before, a process only listened once it served, and a signal that
/// came while it started (opening its raft log, electing) was lost: the process ran on
/// until killed.
pub(crate) fn listen_for_shutdown() {
    let (asked, receiver) = watch::channel(false);
    if SHUTDOWN.set(receiver).is_ok() {
        tokio::spawn(async move {
            wait_for_signal().await;
            let _ = asked.send(true);
            // Kept open: a receiver of a closed channel does not wait.
            std::future::pending::<()>().await;
        });
    }
}

/// Resolves once Ctrl-C or SIGTERM came, even if it came before this was called (see
/// [`listen_for_shutdown`]).
pub(crate) async fn shutdown_signal() {
    match SHUTDOWN.get() {
        Some(receiver) => {
            let _ = receiver.clone().wait_for(|asked| *asked).await;
        }
        None => wait_for_signal().await,
    }
    tracing::info!("shutdown requested; finishing in-flight requests");
}

/// Resolves on the next Ctrl-C or SIGTERM.
async fn wait_for_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}

fn print_welcome(address: SocketAddr, demo_served: bool) {
    let base = format!("http://{address}");
    if !demo_served {
        println!(
            "\nShoal is up; the demo model `{model}` is not deployed, or is scaled to zero.\n\n  \
             models     {base}/api/v1/models\n  \
             metrics    {base}/metrics\n\n\
             Ctrl-C stops Shoal; `shoal up` again on the same data dir resumes where it was.",
            model = demo::DEMO_MODEL,
        );
        return;
    }
    println!(
        "\nShoal is up. The demo model `{model}` is ready.\n\n  \
         inference  {base}/v2/models/{model}/infer\n  \
         metadata   {base}/v2/models/{model}\n  \
         models     {base}/api/v1/models\n  \
         metrics    {base}/metrics\n\n\
         Try:\n  curl -s {base}/v2/models/{model}/infer -H 'content-type: application/json' \\\n    \
         -d '{{\"inputs\":[{{\"name\":\"features\",\"shape\":[1,4],\"datatype\":\"FP32\",\"data\":[[5.1,3.5,1.4,0.2]]}}]}}'\n  \
         SHOAL_ADDR={base} shoal infer {model} --data '[[6.3,3.3,6.0,2.5]]'\n\n\
         Ctrl-C stops Shoal; `shoal up` again on the same data dir resumes where it was.",
        model = demo::DEMO_MODEL,
    );
}
