//! The nemesis: one fault at a time on a seeded schedule, each held for a moment and then
//! healed, every one recorded with whom it hit.

use crate::cluster::Cluster;
use crate::history::{FaultKind, Member, NemesisEvent, UnbiddenExit};
use crate::net;
use crate::proxy::{LinkFault, Proxies};
use crate::rng::Rng;
use crate::workload::Recorder;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a fault is held: long enough to trigger elections and timeouts sometimes.
const HOLD_MS: (u64, u64) = (150, 1_000);
/// The quiet between two faults.
const GAP_MS: (u64, u64) = (30, 200);

/// What to undo when a fault is healed.
#[derive(Clone, Copy)]
enum Heal {
    Restart(Member),
    Resume(Member),
    Network,
    Links,
    Disk,
    Unskew(Member),
}

/// How long a restarted process may take to listen again.
const RESTART_BOUND: Duration = Duration::from_secs(20);
/// Log lines kept with an unbidden exit: a panic message and what led to it.
const LOG_TAIL_LINES: usize = 6;

/// Waits (at most [`RESTART_BOUND`]) until `member` accepts connections on its HTTP port;
/// false if it never did.
async fn wait_listening(member: Member) -> bool {
    let address = match member {
        Member::Server(id) => net::http_address(id),
        Member::Agent(id) => net::agent_address(id),
    };
    let deadline = Instant::now() + RESTART_BOUND;
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(&address).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Records every process of `cluster` that exited although nobody killed it.
pub fn record_unbidden_exits(cluster: &Mutex<Cluster>, recorder: &Recorder) {
    let mut cluster = cluster
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (member, status) in cluster.reap_exited() {
        let detail = format!(
            "{status}; its log ends: {}",
            cluster.log_tail(member, LOG_TAIL_LINES)
        );
        record_unbidden_exit(recorder, member, detail);
    }
}

fn record_unbidden_exit(recorder: &Recorder, member: Member, detail: String) {
    let at = recorder.now();
    recorder.with(|history| {
        history
            .unbidden_exits
            .push(UnbiddenExit { at, member, detail });
    });
}

/// The nemesis' view of the world it breaks.
pub struct Nemesis<'a> {
    pub cluster: &'a Mutex<Cluster>,
    pub proxies: &'a Proxies,
    pub recorder: &'a Recorder,
    pub rng: Rng,
}

impl Nemesis<'_> {
    fn cluster(&self) -> std::sync::MutexGuard<'_, Cluster> {
        self.cluster
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn servers(&self) -> Vec<u64> {
        (1..=self.cluster().servers).collect()
    }

    fn leader(&self) -> Option<u64> {
        self.recorder
            .with(|history| history.leaders.last().and_then(|seen| seen.leader))
    }

    /// Injects faults until `until`, one at a time; returns with everything healed.
    pub async fn run(&mut self, until: Instant) -> anyhow::Result<()> {
        while Instant::now() < until {
            record_unbidden_exits(self.cluster, self.recorder);
            let kind = *self.rng.pick(&FaultKind::ALL);
            let leader_before = self.leader();
            let started = self.recorder.now();
            let (targets, detail, heal) = self.inject(kind, leader_before)?;
            let hold = self.rng.range(HOLD_MS.0, HOLD_MS.1);
            tokio::time::sleep(Duration::from_millis(hold)).await;
            // Before the heal, which may kill the target again (a clock skew's), and would
            // reap one that died meanwhile without a word.
            record_unbidden_exits(self.cluster, self.recorder);
            self.heal(heal)?;
            // A restarted process is healed once it listens again, not when it is spawned.
            if let Heal::Restart(member) | Heal::Unskew(member) = heal
                && !wait_listening(member).await
            {
                let log = self.cluster().log_tail(member, LOG_TAIL_LINES);
                let detail = format!(
                    "not listening {RESTART_BOUND:?} after its restart; its log ends: {log}"
                );
                record_unbidden_exit(self.recorder, member, detail);
            }
            let healed = self.recorder.now();
            self.recorder.with(|history| {
                history.nemesis.push(NemesisEvent {
                    kind,
                    started,
                    healed: Some(healed),
                    targets,
                    leader_before,
                    detail,
                });
            });
            let gap = self.rng.range(GAP_MS.0, GAP_MS.1);
            tokio::time::sleep(Duration::from_millis(gap)).await;
        }
        Ok(())
    }

    fn inject(
        &mut self,
        kind: FaultKind,
        leader: Option<u64>,
    ) -> anyhow::Result<(Vec<Member>, String, Heal)> {
        let servers = self.servers();
        let agents = self.cluster().agents;
        let leader = leader.unwrap_or(servers[0]);
        let followers: Vec<u64> = servers.iter().copied().filter(|s| *s != leader).collect();
        let any_server = *self.rng.pick(&servers);
        Ok(match kind {
            FaultKind::KillLeader => {
                let target = Member::Server(leader);
                self.cluster().kill(target);
                (
                    vec![target],
                    format!("kill -9 server {leader} (leader)"),
                    Heal::Restart(target),
                )
            }
            FaultKind::KillFollower => {
                let follower = *self.rng.pick(&followers);
                let target = Member::Server(follower);
                self.cluster().kill(target);
                (
                    vec![target],
                    format!("kill -9 server {follower}"),
                    Heal::Restart(target),
                )
            }
            FaultKind::KillAgent => {
                let agent = self.rng.range(1, agents + 1);
                let target = Member::Agent(agent);
                self.cluster().kill(target);
                (
                    vec![target],
                    format!("kill -9 agent {agent}"),
                    Heal::Restart(target),
                )
            }
            FaultKind::Pause => {
                let members = self.cluster().members();
                let target = *self.rng.pick(&members);
                self.cluster().pause(target)?;
                (
                    vec![target],
                    format!("SIGSTOP {target:?}"),
                    Heal::Resume(target),
                )
            }
            FaultKind::PartitionIsolate => {
                let target = Member::Server(any_server);
                let others: Vec<Member> = self
                    .cluster()
                    .members()
                    .into_iter()
                    .filter(|member| *member != target)
                    .collect();
                net::cut(&[target], &others)?;
                (
                    vec![target],
                    format!("isolate server {any_server}"),
                    Heal::Network,
                )
            }
            FaultKind::PartitionSplit => {
                let mut shuffled = servers.clone();
                self.shuffle(&mut shuffled);
                let minority_size = (servers.len() - 1) / 2;
                let (minority, majority) = shuffled.split_at(minority_size.max(1));
                let minority: Vec<Member> = minority.iter().map(|s| Member::Server(*s)).collect();
                let majority: Vec<Member> = majority.iter().map(|s| Member::Server(*s)).collect();
                net::cut(&minority, &majority)?;
                let detail = format!("split {minority:?} | {majority:?}");
                (minority, detail, Heal::Network)
            }
            FaultKind::PartitionBridge => {
                let mut shuffled = servers.clone();
                self.shuffle(&mut shuffled);
                let half = shuffled.len() / 2;
                let left: Vec<Member> = shuffled[..half]
                    .iter()
                    .map(|s| Member::Server(*s))
                    .collect();
                let bridge = shuffled[half];
                let right: Vec<Member> = shuffled[half + 1..]
                    .iter()
                    .map(|s| Member::Server(*s))
                    .collect();
                net::cut(&left, &right)?;
                let detail = format!("bridge: {left:?} | {right:?} through server {bridge}");
                let mut targets = left;
                targets.extend(right);
                (targets, detail, Heal::Network)
            }
            FaultKind::PartitionOneWay => {
                let from = any_server;
                let others: Vec<u64> = servers.iter().copied().filter(|s| *s != from).collect();
                let to = *self.rng.pick(&others);
                net::block(Member::Server(from), Member::Server(to))?;
                let detail = format!("server {from} cannot send to server {to}");
                (vec![Member::Server(from)], detail, Heal::Network)
            }
            FaultKind::ProxyDelay | FaultKind::ProxyLoss | FaultKind::ProxyDrop => {
                let fault = match kind {
                    FaultKind::ProxyDelay => {
                        let low = self.rng.range(10, 100);
                        LinkFault::Delay {
                            min_ms: low,
                            max_ms: low + self.rng.range(10, 200),
                        }
                    }
                    FaultKind::ProxyLoss => LinkFault::Loss {
                        reset_probability: 0.05 + self.rng.range(0, 30) as f64 / 100.0,
                    },
                    _ => LinkFault::Drop,
                };
                // Every link out of one server, and sometimes into it too.
                let both_ways = self.rng.chance(0.5);
                for other in servers.iter().copied().filter(|s| *s != any_server) {
                    self.proxies.set(any_server, other, fault);
                    if both_ways {
                        self.proxies.set(other, any_server, fault);
                    }
                }
                let direction = if both_ways { "to and from" } else { "from" };
                let detail = format!("{fault:?} on raft links {direction} server {any_server}");
                (vec![Member::Server(any_server)], detail, Heal::Links)
            }
            FaultKind::DiskFull => {
                let server = self.cluster().disk_server();
                self.cluster().fill_disk()?;
                (
                    vec![Member::Server(server)],
                    format!("fill the disk of server {server}"),
                    Heal::Disk,
                )
            }
            FaultKind::ClockSkew => {
                let skew =
                    self.rng.range(10, 300) as i64 * if self.rng.chance(0.5) { 1 } else { -1 };
                let target = Member::Server(any_server);
                let mut cluster = self.cluster();
                cluster.kill(target);
                cluster.start(target, Some(skew))?;
                let detail = format!("restart server {any_server} with its clock {skew:+} s off");
                (vec![target], detail, Heal::Unskew(target))
            }
        })
    }

    fn heal(&self, heal: Heal) -> anyhow::Result<()> {
        match heal {
            Heal::Restart(member) => self.cluster().start(member, None),
            Heal::Resume(member) => self.cluster().resume(member),
            Heal::Network => net::heal(),
            Heal::Links => {
                self.proxies.heal();
                Ok(())
            }
            Heal::Disk => {
                self.cluster().free_disk();
                Ok(())
            }
            Heal::Unskew(member) => {
                let mut cluster = self.cluster();
                cluster.kill(member);
                cluster.start(member, None)
            }
        }
    }

    fn shuffle(&mut self, items: &mut [u64]) {
        for index in (1..items.len()).rev() {
            let other = self.rng.range(0, index as u64 + 1) as usize;
            items.swap(index, other);
        }
    }
}
