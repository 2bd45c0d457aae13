//! Where every process listens and how partitions cut it off.
//!
//! The run happens in a network namespace of its own, so addresses and iptables rules
//! touch nothing outside it. Server `i` listens on 127.0.0.(10+i), agent `j` on
//! 127.0.0.(20+j). Raft traffic from server `i` to server `k` goes through the harness's
//! proxy for that link, on 127.0.1.(10i+k), so faults can be put on one direction of one
//! link. Every Shoal process runs as a uid of its own; a partition is an iptables rule
//! on the OUTPUT chain that drops what one uid sends to another member's addresses
//! (loopback traffic leaves from 127.0.0.1 whoever sends it, so the uid is what tells
//! senders apart).

use crate::history::Member;
use std::process::Command;

pub const RAFT_PORT: u16 = 7000;
pub const HTTP_PORT: u16 = 7070;
pub const AGENT_PORT: u16 = 7200;

pub fn server_ip(id: u64) -> String {
    format!("127.0.0.{}", 10 + id)
}

pub fn agent_ip(id: u64) -> String {
    format!("127.0.0.{}", 20 + id)
}

/// The proxy address server `from` dials to send raft messages to server `to`.
pub fn link_ip(from: u64, to: u64) -> String {
    format!("127.0.1.{}", 10 * from + to)
}

pub fn http_address(server: u64) -> String {
    format!("{}:{HTTP_PORT}", server_ip(server))
}

pub fn agent_address(agent: u64) -> String {
    format!("{}:{AGENT_PORT}", agent_ip(agent))
}

/// The uid a member's process runs as.
pub fn uid(member: Member) -> u32 {
    match member {
        Member::Server(id) => 20_010 + id as u32,
        Member::Agent(id) => 20_020 + id as u32,
    }
}

/// The addresses through which `from` reaches `to`.
fn addresses_of(from: Member, to: Member) -> Vec<String> {
    match (from, to) {
        (Member::Server(i), Member::Server(k)) => vec![server_ip(k), link_ip(i, k)],
        (_, Member::Server(k)) => vec![server_ip(k)],
        (_, Member::Agent(j)) => vec![agent_ip(j)],
    }
}

fn iptables(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("iptables").args(args).output()?;
    anyhow::ensure!(
        output.status.success(),
        "iptables {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// Drops everything `from` sends to `to`; the other direction is untouched.
pub fn block(from: Member, to: Member) -> anyhow::Result<()> {
    let owner = uid(from).to_string();
    for address in addresses_of(from, to) {
        iptables(&[
            "-A",
            "OUTPUT",
            "-m",
            "owner",
            "--uid-owner",
            &owner,
            "-d",
            &address,
            "-j",
            "DROP",
        ])?;
    }
    Ok(())
}

/// Blocks both directions between every member of `left` and every member of `right`.
pub fn cut(left: &[Member], right: &[Member]) -> anyhow::Result<()> {
    for &a in left {
        for &b in right {
            block(a, b)?;
            block(b, a)?;
        }
    }
    Ok(())
}

/// Removes every partition.
pub fn heal() -> anyhow::Result<()> {
    iptables(&["-F", "OUTPUT"])
}

/// Brings the namespace's loopback up; every 127/8 address is then local.
pub fn loopback_up() -> anyhow::Result<()> {
    let status = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()?;
    anyhow::ensure!(status.success(), "ip link set lo up failed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_member_and_link_has_its_own_address_and_uid() {
        let mut addresses = std::collections::BTreeSet::new();
        let mut uids = std::collections::BTreeSet::new();
        for id in 1..=5 {
            assert!(addresses.insert(server_ip(id)));
            assert!(addresses.insert(agent_ip(id)));
            assert!(uids.insert(uid(Member::Server(id))));
            assert!(uids.insert(uid(Member::Agent(id))));
            for other in (1..=5).filter(|other| *other != id) {
                assert!(addresses.insert(link_ip(id, other)));
            }
        }
    }

    #[test]
    fn a_server_reaches_another_server_directly_and_through_its_raft_link() {
        let seen = addresses_of(Member::Server(1), Member::Server(3));
        assert_eq!(
            seen,
            vec!["127.0.0.13".to_string(), "127.0.1.13".to_string()]
        );
        let seen = addresses_of(Member::Agent(2), Member::Server(3));
        assert_eq!(seen, vec!["127.0.0.13".to_string()]);
    }
}
