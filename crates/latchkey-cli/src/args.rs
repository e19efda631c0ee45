//! The command line.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::time::Duration;

fn duration(s: &str) -> Result<Duration, String> {
    latchkey::core::url::parse_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration like 500ms, 15s or 1m"))
}

/// Distributed locks, KV and transactions over Redis, etcd, Consul, ZooKeeper
/// or the embedded backend — one command for all of them.
#[derive(Parser, Debug)]
#[command(name = "latchkey", version)]
pub struct Cli {
    /// Backend URL (redis://, etcd://, consul://, zookeeper://, mem://).
    #[arg(
        long,
        global = true,
        env = "LATCHKEY_URL",
        default_value = "mem://",
        hide_env_values = true
    )]
    pub url: String,
    /// Print machine-readable JSON instead of human output.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a command while holding a lock (like flock(1), etcdctl lock, consul lock).
    ///
    /// The command gets LATCHKEY_FENCING_TOKEN in its environment. The lease is
    /// renewed while it runs and released when it exits; latchkey exits with
    /// its status. If the lock is lost, the command gets SIGTERM, then SIGKILL
    /// after the grace period, and latchkey exits with 75.
    Lock(LockArgs),
    /// Run a command only while this process leads an election.
    ///
    /// The command gets LATCHKEY_LEADER_TERM (a fencing token) in its
    /// environment; if leadership is lost it is terminated as with `lock`.
    Elect(ElectArgs),
    /// Read and write keys.
    #[command(subcommand)]
    Kv(KvCommand),
    /// Measure a backend: W1 uncontended, W2 contended counter, W3 handoff.
    Bench(BenchArgs),
    /// Check that a live deployment behaves as latchkey assumes: runs the
    /// conformance suite's non-destructive cases in throwaway namespaces.
    Check,
}

#[derive(Args, Debug)]
pub struct LockArgs {
    /// The lock's name.
    pub name: String,
    /// Lease TTL.
    #[arg(long, default_value = "15s", value_parser = duration)]
    pub ttl: Duration,
    /// How long to wait for the lock; 0 tries once. Default: wait forever.
    #[arg(long, value_parser = duration)]
    pub wait: Option<Duration>,
    /// Time between SIGTERM and SIGKILL when the lock is lost.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub grace: Duration,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ElectArgs {
    /// The election's name.
    pub name: String,
    /// Leadership lease TTL.
    #[arg(long, default_value = "15s", value_parser = duration)]
    pub ttl: Duration,
    /// The value to proclaim while leading (default: this process's pid).
    #[arg(long)]
    pub value: Option<String>,
    /// Time between SIGTERM and SIGKILL when leadership is lost.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub grace: Duration,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum KvCommand {
    /// Print a key's value (exit 1 if absent).
    Get { key: String },
    /// Write a key.
    Put {
        key: String,
        value: String,
        /// Expire after this long.
        #[arg(long, value_parser = duration)]
        ttl: Option<Duration>,
        /// Write only if the key's revision is this (exit 1 on conflict).
        #[arg(long)]
        if_revision: Option<u64>,
        /// Write only if the key does not exist (exit 1 on conflict).
        #[arg(long)]
        if_absent: bool,
    },
    /// Delete a key (exit 1 if it did not exist).
    Del {
        key: String,
        /// Delete only if the key's revision is this.
        #[arg(long)]
        if_revision: Option<u64>,
    },
    /// List keys by prefix, in key order.
    Ls {
        #[arg(default_value = "")]
        prefix: String,
        #[arg(long)]
        limit: Option<usize>,
        /// Keys and revisions only.
        #[arg(long)]
        keys_only: bool,
    },
    /// Print changes under a prefix as they happen.
    Watch {
        #[arg(default_value = "")]
        prefix: String,
        /// Replay from this revision (where the backend keeps history).
        #[arg(long, conflicts_with = "mirror")]
        from: Option<u64>,
        /// Print the whole mirrored map (a replicated map of the prefix) at
        /// every change instead of single events.
        #[arg(long)]
        mirror: bool,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// One client, sequential acquire+release of one lock.
    W1,
    /// Concurrent clients: lock, read counter, fenced write counter+1, release.
    W2,
    /// Two clients (or N waiters) pass one lock back and forth.
    W3,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long, value_enum)]
    pub workload: Workload,
    /// Operations (W1: acquisitions; W2: iterations per client; W3: handoffs).
    #[arg(long)]
    pub ops: Option<u64>,
    /// Clients for W2.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Queued waiters for W3 (2..=256).
    #[arg(long, default_value_t = 2)]
    pub waiters: usize,
}
