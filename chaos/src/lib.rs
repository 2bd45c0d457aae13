//! Chaos testing for Shoal, after etcd's robustness suite and Jepsen: real `shoal`
//! processes in a network namespace of their own, a nemesis injecting faults on a seeded
//! schedule, workloads recording every operation, and checkers judging the history.
//!
//! - [`history`]: what a run records (pure data); [`checkers`]: the verdicts over it
//!   (pure); [`report`]: the summary a run writes (JSON and a text table).
//! - [`net`]: addresses, uids and iptables partitions; [`proxy`]: the raft-link proxies
//!   that delay, lose and drop; [`cluster`]: the processes; [`nemesis`]: the faults;
//!   [`workload`]: the clients; [`observe`]: what the harness watches; [`run`]: one run.

pub mod checkers;
pub mod cluster;
pub mod history;
pub mod nemesis;
pub mod net;
pub mod observe;
pub mod proxy;
pub mod report;
pub mod rng;
pub mod run;
pub mod workload;
