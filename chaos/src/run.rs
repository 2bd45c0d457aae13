//! One chaos run, inside the network namespace: start the cluster and the proxies, set up
//! the models, run the workloads, the observers and the nemesis for the duration, heal,
//! wait for convergence, read the final state, and judge the history.

use crate::checkers::{self, Verdict};
use crate::cluster::Cluster;
use crate::history::{History, Member, OpKind, Operation};
use crate::nemesis::{self, Nemesis};
use crate::net::{self, http_address};
use crate::observe;
use crate::proxy::Proxies;
use crate::rng::Rng;
use crate::workload::{self, Recorder};
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a run is asked to do.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub seed: u64,
    pub duration: Duration,
    pub servers: u64,
    pub agents: u64,
    /// Where the processes' data, logs and the report go.
    pub root: PathBuf,
    /// The `shoal` binary under test.
    pub shoal: PathBuf,
    /// How long the cluster may take to converge once every fault is healed.
    pub convergence_bound: Duration,
}

const CONTROL_CLIENTS: u32 = 3;
const INFERENCE_CLIENTS: u32 = 2;

/// Runs the `shoal` CLI as root against `server`; fails with its stderr.
fn cli(shoal: &Path, server: u64, args: &[&str]) -> anyhow::Result<String> {
    let output = std::process::Command::new(shoal)
        .args(args)
        .args(["--addr", &format!("http://{}", http_address(server))])
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "shoal {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Waits until `check` holds, polling; fails naming `what` after `timeout`.
async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        anyhow::ensure!(Instant::now() < deadline, "{what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// The register model's versions, the classifier pushed and deployed on every agent.
async fn set_up_models(config: &RunConfig) -> anyhow::Result<u64> {
    let http = shoal_tests::http_client(Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(30);
    let leader = loop {
        if let (Some(leader), _) = observe::current_leader(&http, config.servers).await {
            break Some(leader);
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let leader = leader.context("no leader")?;
    wait_until("every agent joined", Duration::from_secs(30), || async {
        let url = format!("http://{}/api/v1/nodes", http_address(leader));
        let nodes = http.get(url).send().await.ok();
        let count = match nodes {
            Some(answer) => answer
                .json::<serde_json::Value>()
                .await
                .ok()
                .and_then(|nodes| nodes.as_array().map(Vec::len)),
            None => None,
        };
        count == Some(config.agents as usize)
    })
    .await?;
    for value in 1..=workload::REGISTER_VALUES {
        let content = format!("register value {value}").into_bytes();
        let digest = workload::upload_blob(&http, leader, content)
            .await
            .map_err(|error| anyhow::anyhow!("uploading a register value: {error}"))?;
        let (outcome, _) =
            workload::register(&http, leader, workload::REGISTER_MODEL, &digest).await;
        anyhow::ensure!(
            outcome == crate::history::Outcome::Ok,
            "registering a register value: {outcome:?}"
        );
    }
    let iris = config.root.join("iris");
    let shoal = config.root.join("shoal");
    let iris_dir = iris.to_str().context("a UTF-8 path")?;
    let status = std::process::Command::new(&shoal)
        .args(["model", "demo", "--out", iris_dir])
        .stdout(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "shoal model demo failed");
    cli(
        &shoal,
        leader,
        &["model", "push", iris_dir, "--name", "iris"],
    )?;
    let deployment = config.root.join("iris.toml");
    std::fs::write(
        &deployment,
        "name = \"iris\"\nmodel = \"iris\"\nversion = 1\nreplicas = 2\n",
    )?;
    let deployment = deployment.to_str().context("a UTF-8 path")?;
    cli(&shoal, leader, &["deploy", "apply", "-f", deployment])?;
    let body = serde_json::json!({"inputs": [{"name": "features", "shape": [1, 4],
        "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]});
    wait_until(
        "the classifier serving",
        Duration::from_secs(60),
        || async {
            let url = format!("http://{}/v2/models/iris/infer", http_address(leader));
            let answer = http.post(url).json(&body).send().await;
            answer.is_ok_and(|answer| answer.status() == 200)
        },
    )
    .await?;
    Ok(leader)
}

/// Runs everything and returns the history and the verdicts.
pub async fn run(config: &RunConfig) -> anyhow::Result<(History, Vec<Verdict>)> {
    net::loopback_up()?;
    net::heal()?;
    let mut rng = Rng::new(config.seed);
    let proxies = Proxies::start(config.servers, &mut rng).await?;
    let cluster = Cluster::prepare(&config.root, &config.shoal, config.servers, config.agents)?;
    let cluster = Mutex::new(cluster);
    lock(&cluster).start_all()?;
    // The observers start before the set-up, so every placement is seen from the first.
    let recorder = Arc::new(Recorder::new(config.seed));
    let stop_workloads = Arc::new(AtomicBool::new(false));
    let stop_observers = Arc::new(AtomicBool::new(false));
    let mut observers = tokio::task::JoinSet::new();
    {
        let (servers, agents) = (config.servers, config.agents);
        let (watching, stop) = (Arc::clone(&recorder), Arc::clone(&stop_observers));
        observers.spawn(async move { observe::watch_leaders(servers, &watching, &stop).await });
        let (watching, stop) = (Arc::clone(&recorder), Arc::clone(&stop_observers));
        observers.spawn(async move {
            observe::watch_state(servers, agents, &watching, &stop).await;
        });
    }
    set_up_models(config).await?;
    eprintln!("shoal-chaos: cluster up; faults for {:?}", config.duration);
    let faults_started = recorder.now();
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..CONTROL_CLIENTS + INFERENCE_CLIENTS {
        let (recorder, stop, client_rng) = (
            Arc::clone(&recorder),
            Arc::clone(&stop_workloads),
            rng.fork(),
        );
        let servers = config.servers;
        tasks.spawn(async move {
            if client < CONTROL_CLIENTS {
                workload::control_client(client, servers, &recorder, client_rng, &stop).await;
            } else {
                workload::inference_client(client, servers, &recorder, client_rng, &stop).await;
            }
        });
    }

    let mut nemesis = Nemesis {
        cluster: &cluster,
        proxies: &proxies,
        recorder: &recorder,
        rng: rng.fork(),
    };
    let faults = nemesis.run(Instant::now() + config.duration).await;
    let duration = recorder.now() - faults_started;
    stop_workloads.store(true, Ordering::Relaxed);
    while tasks.join_next().await.is_some() {}
    faults?;

    // Heal whatever is left (the nemesis heals each fault; this is the safety net), then
    // give the cluster its bound to converge. A process that died on its own is recorded
    // first, then started again like the rest.
    nemesis::record_unbidden_exits(&cluster, &recorder);
    net::heal()?;
    proxies.heal();
    {
        let mut cluster = lock(&cluster);
        cluster.free_disk();
        for member in cluster.members() {
            cluster.resume(member)?;
            if !cluster.is_running(member) {
                cluster.start(member, None)?;
            }
        }
    }
    let healed_at = recorder.now();
    eprintln!(
        "shoal-chaos: healed; waiting up to {:?} to converge",
        config.convergence_bound
    );
    observe::wait_for_convergence(config.servers, &recorder, config.convergence_bound).await;

    // A last linearizable read of the register, and the final state from the leader.
    let http = shoal_tests::http_client(Duration::from_secs(10));
    let (leader, _) = observe::current_leader(&http, config.servers).await;
    let mut final_state = None;
    if let Some(leader) = leader {
        let invoked = recorder.now();
        let (outcome, value) = workload::alias_read(&http, leader).await;
        recorder.record(Operation {
            client: u32::MAX,
            kind: OpKind::AliasRead { value },
            invoked,
            completed: recorder.now(),
            outcome,
        });
        final_state = observe::state_of(&http, leader).await;
    }
    stop_observers.store(true, Ordering::Relaxed);
    while observers.join_next().await.is_some() {}
    nemesis::record_unbidden_exits(&cluster, &recorder);

    let agents: Vec<u64> = (1..=config.agents).collect();
    let history = recorder.with(|history| {
        history.duration = duration;
        history.healed_at = healed_at;
        if let Some(state) = &final_state {
            history.final_state = observe::final_state(state);
        }
        for agent in &agents {
            let log = lock(&cluster).log_path(Member::Agent(*agent));
            history
                .accepted
                .extend(observe::accepted_assignments(*agent, &log));
        }
        history.clone()
    });
    lock(&cluster).stop_all();
    let bound = config.convergence_bound.as_micros() as u64;
    let verdicts = checkers::all(&history, bound);
    Ok((history, verdicts))
}

fn lock(cluster: &Mutex<Cluster>) -> std::sync::MutexGuard<'_, Cluster> {
    cluster
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
