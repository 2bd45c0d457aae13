//! `shoal-chaos`: runs a chaos test against a real Shoal cluster and writes a report.
//!
//! `shoal-chaos run` (as root) creates a network namespace, runs itself inside it (where
//! the cluster, the proxies, the workloads and the nemesis live), and afterwards kills
//! whatever is left in the namespace and deletes it, also when interrupted. The report
//! (`report.json`, `report.txt`, `history.json`) goes to `--out`; the exit status is 0
//! only when every checker passed.

use anyhow::Context;
use clap::{Parser, Subcommand};
use shoal_chaos::report;
use shoal_chaos::run::{RunConfig, run};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Set inside the namespace, naming it; its absence means "create one first".
const NETNS_ENV: &str = "SHOAL_CHAOS_NETNS";

#[derive(Debug, Parser)]
#[command(
    name = "shoal-chaos",
    version,
    about = "Fault injection against a real Shoal cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// One run: faults for `--duration-s`, then healing, convergence and the checkers.
    Run(RunArgs),
}

#[derive(Debug, Clone, clap::Args)]
struct RunArgs {
    /// The schedule's seed: a number, or `random` (printed, so the run can be replayed).
    #[arg(long, default_value = "random")]
    seed: String,
    /// Seconds of faults.
    #[arg(long, default_value_t = 120)]
    duration_s: u64,
    /// Control-plane servers (3 or 5).
    #[arg(long, default_value_t = 3)]
    servers: u64,
    /// Agents (2 to 4).
    #[arg(long, default_value_t = 2)]
    agents: u64,
    /// Seconds the cluster may take to converge after the last fault is healed.
    #[arg(long, default_value_t = 60)]
    convergence_bound_s: u64,
    /// Where data, logs and the report go (a new temporary directory by default).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The `shoal` binary under test (the workspace's debug build by default).
    #[arg(long)]
    shoal: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let Commands::Run(args) = cli.command;
    anyhow::ensure!(
        matches!(args.servers, 3 | 5),
        "--servers must be 3 or 5, not {}",
        args.servers
    );
    anyhow::ensure!(
        (2..=4).contains(&args.agents),
        "--agents must be 2 to 4, not {}",
        args.agents
    );
    match std::env::var(NETNS_ENV) {
        Ok(_) => inside(args),
        Err(_) => outside(&args),
    }
}

/// Creates the namespace, runs this command again inside it, and cleans up after.
fn outside(args: &RunArgs) -> anyhow::Result<()> {
    let seed = match args.seed.as_str() {
        "random" => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_nanos() as u64);
            nanos ^ u64::from(std::process::id()).rotate_left(32)
        }
        number => number
            .parse()
            .with_context(|| format!("--seed {number:?} is not a number or `random`"))?,
    };
    println!("shoal-chaos: seed {seed} (replay with --seed {seed})");
    let out = match &args.out {
        Some(out) => out.clone(),
        None => std::env::temp_dir().join(format!("shoal-chaos-{seed}")),
    };
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let namespace = format!("shoal-chaos-{}", std::process::id());
    let created = Command::new("ip")
        .args(["netns", "add", &namespace])
        .status()
        .context("running ip (iproute2)")?;
    anyhow::ensure!(
        created.success(),
        "creating network namespace {namespace} failed (shoal-chaos needs root)"
    );
    // Ctrl-C reaches the child too (same process group); this process only waits and
    // then cleans up.
    swallow_interrupts()?;
    let this = std::env::current_exe()?;
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &namespace])
        .arg(this)
        .arg("run")
        .args(["--seed", &seed.to_string()])
        .args(["--duration-s", &args.duration_s.to_string()])
        .args(["--servers", &args.servers.to_string()])
        .args(["--agents", &args.agents.to_string()])
        .args([
            "--convergence-bound-s",
            &args.convergence_bound_s.to_string(),
        ])
        .arg("--out")
        .arg(&out)
        .env(NETNS_ENV, &namespace);
    if let Some(shoal) = &args.shoal {
        command.arg("--shoal").arg(shoal);
    }
    let status = command.status();
    clean_up(&namespace);
    let status = status?;
    anyhow::ensure!(
        status.success(),
        "the chaos run failed ({status}); see {}",
        out.display()
    );
    Ok(())
}

/// Keeps SIGINT from killing this process before it cleans up (the child, which has the
/// default action again after exec, handles it).
fn swallow_interrupts() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        runtime.block_on(async { while tokio::signal::ctrl_c().await.is_ok() {} });
    });
    // Let the thread register its handler before the child starts.
    std::thread::sleep(Duration::from_millis(50));
    Ok(())
}

/// The `shoal` binary next to this one (cargo builds both into the same directory).
fn default_shoal() -> anyhow::Result<PathBuf> {
    let this = std::env::current_exe()?;
    let dir = this.parent().context("the binary's directory")?;
    Ok(dir.join("shoal"))
}

/// Kills every process left in `namespace` and deletes it.
fn clean_up(namespace: &str) {
    if let Ok(output) = Command::new("ip")
        .args(["netns", "pids", namespace])
        .output()
    {
        for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", namespace])
        .status();
}

/// The run itself, inside the namespace.
fn inside(args: RunArgs) -> anyhow::Result<()> {
    let seed: u64 = args.seed.parse().context("the seed")?;
    let out = args.out.context("--out is set by the outer process")?;
    let shoal = match args.shoal {
        Some(shoal) => shoal,
        None => default_shoal()?,
    };
    anyhow::ensure!(
        shoal.exists(),
        "no shoal binary at {}; build it first",
        shoal.display()
    );
    let config = RunConfig {
        seed,
        duration: Duration::from_secs(args.duration_s),
        servers: args.servers,
        agents: args.agents,
        root: out.clone(),
        shoal,
        convergence_bound: Duration::from_secs(args.convergence_bound_s),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = run(&config) => outcome,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    // Dropping the run's future (on Ctrl-C) dropped the cluster, which killed its
    // processes and unmounted its tmpfs.
    let (history, verdicts) = outcome?;
    let report = report::build(&history, &verdicts);
    std::fs::write(out.join("report.json"), report::json(&report))?;
    let text = report::text(&report);
    std::fs::write(out.join("report.txt"), &text)?;
    std::fs::write(
        out.join("history.json"),
        serde_json::to_string(&history).context("encoding the history")?,
    )?;
    println!("{text}");
    println!("shoal-chaos: report in {}", out.display());
    anyhow::ensure!(report.passed, "a checker failed");
    Ok(())
}
