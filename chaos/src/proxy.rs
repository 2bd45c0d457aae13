//! The harness's TCP proxy on every raft link, so faults can be put on one direction of
//! one link: delay (each chunk waits), loss (connections reset at random, as a lossy path
//! looks to TCP once retransmissions give up) and drop (bytes accepted, never delivered).
//! Healing a link closes its connections, so no half-delivered frame survives a fault;
//! the raft transport reconnects.

use crate::net::{RAFT_PORT, link_ip, server_ip};
use crate::rng::Rng;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a link does to the bytes crossing it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LinkFault {
    Healthy,
    /// Each chunk waits `min_ms..max_ms` before it is forwarded.
    Delay {
        min_ms: u64,
        max_ms: u64,
    },
    /// Each chunk resets the connection with this probability.
    Loss {
        reset_probability: f64,
    },
    /// Every byte is swallowed.
    Drop,
}

#[derive(Debug)]
struct Link {
    fault: Mutex<LinkFault>,
    rng: Mutex<Rng>,
    /// Bumped when the link heals: connections from an older generation close.
    generation: AtomicU64,
}

impl Link {
    fn fault(&self) -> LinkFault {
        *self
            .fault
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn draw(&self, low: u64, high: u64) -> u64 {
        self.rng
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .range(low, high)
    }

    fn chance(&self, p: f64) -> bool {
        self.rng
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .chance(p)
    }
}

/// Every raft link's proxy, by (from, to) server.
#[derive(Clone, Debug)]
pub struct Proxies {
    links: Arc<BTreeMap<(u64, u64), Arc<Link>>>,
}

impl Proxies {
    /// Starts a proxy for every ordered pair of `servers` servers.
    pub async fn start(servers: u64, rng: &mut Rng) -> anyhow::Result<Proxies> {
        let mut links = BTreeMap::new();
        for from in 1..=servers {
            for to in (1..=servers).filter(|to| *to != from) {
                let link = Arc::new(Link {
                    fault: Mutex::new(LinkFault::Healthy),
                    rng: Mutex::new(rng.fork()),
                    generation: AtomicU64::new(0),
                });
                let listener = TcpListener::bind((link_ip(from, to), RAFT_PORT)).await?;
                tokio::spawn(accept(listener, to, Arc::clone(&link)));
                links.insert((from, to), link);
            }
        }
        Ok(Proxies {
            links: Arc::new(links),
        })
    }

    /// Puts `fault` on the link from `from` to `to`.
    pub fn set(&self, from: u64, to: u64, fault: LinkFault) {
        if let Some(link) = self.links.get(&(from, to)) {
            *link
                .fault
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = fault;
        }
    }

    /// Makes every link healthy and closes the connections that crossed a fault.
    pub fn heal(&self) {
        for link in self.links.values() {
            let mut fault = link
                .fault
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *fault != LinkFault::Healthy {
                *fault = LinkFault::Healthy;
                link.generation.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

async fn accept(listener: TcpListener, to: u64, link: Arc<Link>) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let link = Arc::clone(&link);
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect((server_ip(to), RAFT_PORT)).await else {
                return;
            };
            let generation = link.generation.load(Ordering::SeqCst);
            let (in_read, in_write) = inbound.into_split();
            let (out_read, out_write) = outbound.into_split();
            tokio::select! {
                () = pump(in_read, out_write, Arc::clone(&link), generation) => {}
                () = pump(out_read, in_write, link, generation) => {}
            }
        });
    }
}

/// Copies one direction until either side closes, the link heals past `generation`, or a
/// loss fault resets it.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Arc<Link>,
    generation: u64,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        if link.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        match link.fault() {
            LinkFault::Healthy => {}
            LinkFault::Delay { min_ms, max_ms } => {
                let wait = link.draw(min_ms, max_ms);
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            LinkFault::Loss { reset_probability } => {
                if link.chance(reset_probability) {
                    return;
                }
            }
            LinkFault::Drop => continue,
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
