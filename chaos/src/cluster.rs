//! The Shoal processes under test: starting each as its own uid on its own address,
//! killing, pausing and restarting them, and the small tmpfs one server keeps its data on
//! so the disk can be filled.

use crate::history::Member;
use crate::net::{RAFT_PORT, agent_address, http_address, link_ip, server_ip, uid};
use anyhow::Context;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// libfaketime, from Debian's `faketime` package (multi-threaded variant: Shoal is).
pub const FAKETIME_LIBRARY: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// Size of the tmpfs the disk-full server keeps its data on.
const DISK_MIB: u32 = 64;

#[derive(Debug)]
pub struct Cluster {
    pub servers: u64,
    pub agents: u64,
    root: PathBuf,
    shoal: PathBuf,
    processes: BTreeMap<Member, Child>,
    paused: BTreeSet<Member>,
    /// How many times each agent has been started.
    pub incarnations: BTreeMap<u64, u32>,
    mounted: bool,
}

impl Cluster {
    /// Lays out `root` (world-traversable, since the processes run as other uids), copies
    /// the `shoal` binary into it, and mounts the disk-full server's tmpfs.
    pub fn prepare(
        root: &Path,
        shoal: &Path,
        servers: u64,
        agents: u64,
    ) -> anyhow::Result<Cluster> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(root.join("logs"))?;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))?;
        let binary = root.join("shoal");
        std::fs::copy(shoal, &binary).with_context(|| format!("copying {}", shoal.display()))?;
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755))?;
        let mut cluster = Cluster {
            servers,
            agents,
            root: root.to_path_buf(),
            shoal: binary,
            processes: BTreeMap::new(),
            paused: BTreeSet::new(),
            incarnations: BTreeMap::new(),
            mounted: false,
        };
        let disk = cluster.disk_dir();
        std::fs::create_dir_all(&disk)?;
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={DISK_MIB}m"), "tmpfs"])
            .arg(&disk)
            .status()?;
        anyhow::ensure!(mounted.success(), "mounting a tmpfs on {}", disk.display());
        cluster.mounted = true;
        for member in cluster.members() {
            let dir = cluster.data_dir(member);
            std::fs::create_dir_all(&dir)?;
            let owner = uid(member);
            std::os::unix::fs::chown(&dir, Some(owner), Some(owner))?;
        }
        Ok(cluster)
    }

    pub fn members(&self) -> Vec<Member> {
        (1..=self.servers)
            .map(Member::Server)
            .chain((1..=self.agents).map(Member::Agent))
            .collect()
    }

    /// The server whose data lives on the small tmpfs: the last one.
    pub fn disk_server(&self) -> u64 {
        self.servers
    }

    fn disk_dir(&self) -> PathBuf {
        self.root.join(format!("disk-{}", self.disk_server()))
    }

    fn data_dir(&self, member: Member) -> PathBuf {
        match member {
            Member::Server(id) if id == self.disk_server() => self.disk_dir().join("data"),
            Member::Server(id) => self.root.join(format!("server-{id}")),
            Member::Agent(id) => self.root.join(format!("agent-{id}")),
        }
    }

    pub fn log_path(&self, member: Member) -> PathBuf {
        match member {
            Member::Server(id) => self.root.join("logs").join(format!("server-{id}.log")),
            Member::Agent(id) => self.root.join("logs").join(format!("agent-{id}.log")),
        }
    }

    fn arguments(&self, member: Member) -> Vec<String> {
        let data_dir = self.data_dir(member).display().to_string();
        let servers: Vec<String> = (1..=self.servers).map(http_address).collect();
        match member {
            Member::Server(id) => {
                // Raft to another server goes through the proxy of that link.
                let peers: Vec<String> = (1..=self.servers)
                    .map(|other| {
                        let ip = if other == id {
                            server_ip(id)
                        } else {
                            link_ip(id, other)
                        };
                        format!("{other}={ip}:{RAFT_PORT}")
                    })
                    .collect();
                let http_peers: Vec<String> = (1..=self.servers)
                    .map(|other| format!("{other}={}", http_address(other)))
                    .collect();
                vec![
                    "server".into(),
                    "--id".into(),
                    id.to_string(),
                    "--peers".into(),
                    peers.join(","),
                    "--http-peers".into(),
                    http_peers.join(","),
                    "--raft-listen".into(),
                    format!("{}:{RAFT_PORT}", server_ip(id)),
                    "--listen".into(),
                    http_address(id),
                    "--data-dir".into(),
                    data_dir,
                ]
            }
            Member::Agent(id) => vec![
                "agent".into(),
                "--id".into(),
                id.to_string(),
                "--servers".into(),
                servers.join(","),
                "--listen".into(),
                agent_address(id),
                "--data-dir".into(),
                data_dir,
            ],
        }
    }

    /// Starts `member` as its own uid; `skew_seconds` runs it under faketime with its
    /// clock that far off.
    pub fn start(&mut self, member: Member, skew_seconds: Option<i64>) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(member))?;
        let owner = uid(member).to_string();
        let mut command = Command::new("setpriv");
        command.args([
            &format!("--reuid={owner}"),
            &format!("--regid={owner}"),
            "--clear-groups",
            "--",
        ]);
        if let Some(skew) = skew_seconds {
            // libfaketime preloaded directly (the `faketime` wrapper forks, and its pid would
            // not be the server's), and through `env` after the uid change, which execs too:
            // preloaded into `setpriv`, it made its shared semaphore as root, and the server,
            // no longer root, could not open it and exited at once. Only the wall clock is
            // off, as with a bad NTP source; the monotonic clock runs true.
            command.args([
                "env".to_owned(),
                format!("LD_PRELOAD={FAKETIME_LIBRARY}"),
                format!("FAKETIME={skew:+}s"),
                "FAKETIME_DONT_FAKE_MONOTONIC=1".to_owned(),
            ]);
        }
        let child = command
            .arg(&self.shoal)
            .args(self.arguments(member))
            .env("RUST_LOG", "info,raft=warn,raft_engine=warn")
            .env("SHOAL_LOG_FORMAT", "json")
            .env("HOME", &self.root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {member:?}"))?;
        if let Member::Agent(id) = member {
            *self.incarnations.entry(id).or_default() += 1;
        }
        self.processes.insert(member, child);
        Ok(())
    }

    pub fn start_all(&mut self) -> anyhow::Result<()> {
        for member in self.members() {
            self.start(member, None)?;
        }
        Ok(())
    }

    pub fn is_running(&self, member: Member) -> bool {
        self.processes.contains_key(&member)
    }

    /// Members whose process ended although nobody killed it, with how each ended; they
    /// no longer count as running.
    pub fn reap_exited(&mut self) -> Vec<(Member, String)> {
        let exited: Vec<(Member, String)> = self
            .processes
            .iter_mut()
            .filter_map(|(member, child)| {
                let status = child.try_wait().ok().flatten()?;
                Some((*member, status.to_string()))
            })
            .collect();
        for (member, _) in &exited {
            self.processes.remove(member);
            self.paused.remove(member);
        }
        exited
    }

    /// The last `lines` lines of `member`'s log, joined with " | ".
    pub fn log_tail(&self, member: Member, lines: usize) -> String {
        use std::io::{Read, Seek, SeekFrom};
        /// Enough for a panic message and a few log lines; the start of a log is not read.
        const TAIL_BYTES: u64 = 16 << 10;
        let Ok(mut file) = std::fs::File::open(self.log_path(member)) else {
            return String::new();
        };
        let length = file.metadata().map_or(0, |metadata| metadata.len());
        let _ = file.seek(SeekFrom::Start(length.saturating_sub(TAIL_BYTES)));
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        let text = String::from_utf8_lossy(&bytes);
        let kept: Vec<&str> = text
            .lines()
            .filter(|line| !line.trim().is_empty())
            .collect();
        kept[kept.len().saturating_sub(lines)..].join(" | ")
    }

    /// SIGKILLs `member` and reaps it.
    pub fn kill(&mut self, member: Member) {
        if let Some(mut child) = self.processes.remove(&member) {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused.remove(&member);
    }

    fn signal(&self, member: Member, signal: &str) -> anyhow::Result<()> {
        let Some(child) = self.processes.get(&member) else {
            return Ok(());
        };
        // `setpriv` execs the server, so the child's pid is the server's.
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill {signal} {member:?}");
        Ok(())
    }

    /// SIGSTOPs `member`.
    pub fn pause(&mut self, member: Member) -> anyhow::Result<()> {
        self.signal(member, "-STOP")?;
        self.paused.insert(member);
        Ok(())
    }

    /// SIGCONTs `member` if it was paused.
    pub fn resume(&mut self, member: Member) -> anyhow::Result<()> {
        if self.paused.remove(&member) {
            self.signal(member, "-CONT")?;
        }
        Ok(())
    }

    /// Fills the disk-full server's tmpfs to the last byte.
    pub fn fill_disk(&self) -> anyhow::Result<()> {
        use std::io::Write;
        let mut filler = std::fs::File::create(self.disk_dir().join("filler"))?;
        let block = vec![0u8; 1 << 20];
        while filler.write_all(&block).is_ok() {}
        // The last partial megabyte.
        while filler.write_all(&block[..4096]).is_ok() {}
        Ok(())
    }

    /// Frees what [`Cluster::fill_disk`] took.
    pub fn free_disk(&self) {
        let _ = std::fs::remove_file(self.disk_dir().join("filler"));
    }

    /// Stops every process (SIGKILL: the run is over) and unmounts the tmpfs.
    pub fn stop_all(&mut self) {
        for member in self.members() {
            let _ = self.resume(member);
            self.kill(member);
        }
        if std::mem::take(&mut self.mounted) {
            let _ = Command::new("umount").arg(self.disk_dir()).status();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}
