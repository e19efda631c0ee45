//! What a backend can and cannot promise, declared in code (never faked).
//! The conformance suite reads these to gate or adapt its cases; the facade's
//! `connect_requiring` reads them to fail early.

use std::fmt;
use std::time::Duration;

/// Facts about one backend. See `notes/safety.md` for the sources.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// A watch delivers every revision of every key (not coalesced snapshots).
    pub watch_every_revision: bool,
    /// A watch can start from an earlier revision and replay what was missed.
    pub watch_resume: bool,
    /// A watch reports the expiry of a TTL key as a delete event.
    pub watch_reports_expiry: bool,
    /// Revisions of all keys come from one global sequence and are comparable.
    pub global_revision: bool,
    /// Keys can carry a TTL.
    pub native_ttl: bool,
    /// The shortest TTL the backend honours (shorter ones are raised to it).
    pub min_ttl: Duration,
    /// How late past its TTL a key or lease may still be seen.
    pub ttl_granularity: Duration,
    /// Most ops one transaction branch may hold.
    pub max_txn_ops: usize,
    /// Largest value accepted, in bytes.
    pub max_value_bytes: usize,
    /// Lock waiters are served in arrival order.
    pub fifo_locks: bool,
    /// Reads are linearizable (see the backend's docs for the mode).
    pub linearizable_reads: bool,
    /// Fencing tokens survive a server restart or failover (never repeat).
    pub durable_fencing: bool,
    /// Acknowledged writes survive a server restart.
    pub durable_writes: bool,
    /// Longest lock TTL the backend can honour (`None`: no bound). Backends
    /// that tie locks to a session bound it by the session timeout.
    pub max_lock_ttl: Option<Duration>,
}

impl Capabilities {
    /// The capabilities of a backend that promises everything (the embedded
    /// mem backend). Adapters start from this and switch off what they lack.
    pub const fn full() -> Self {
        Capabilities {
            watch_every_revision: true,
            watch_resume: true,
            watch_reports_expiry: true,
            global_revision: true,
            native_ttl: true,
            min_ttl: Duration::from_millis(1),
            ttl_granularity: Duration::from_millis(50),
            max_txn_ops: 128,
            max_value_bytes: crate::validate::MAX_VALUE_BYTES,
            fifo_locks: true,
            linearizable_reads: true,
            durable_fencing: true,
            durable_writes: true,
            max_lock_ttl: None,
        }
    }

    /// True if this backend has `cap`.
    pub fn supports(&self, cap: Capability) -> bool {
        match cap {
            Capability::WatchEveryRevision => self.watch_every_revision,
            Capability::WatchResume => self.watch_resume,
            Capability::WatchReportsExpiry => self.watch_reports_expiry,
            Capability::GlobalRevision => self.global_revision,
            Capability::NativeTtl => self.native_ttl,
            Capability::FifoLocks => self.fifo_locks,
            Capability::LinearizableReads => self.linearizable_reads,
            Capability::DurableFencing => self.durable_fencing,
            Capability::DurableWrites => self.durable_writes,
        }
    }

    /// The capabilities among `required` that this backend lacks.
    pub fn missing(&self, required: &[Capability]) -> Vec<Capability> {
        required
            .iter()
            .copied()
            .filter(|c| !self.supports(*c))
            .collect()
    }
}

impl Default for Capabilities {
    fn default() -> Self {
        Self::full()
    }
}

/// A yes/no capability, by name (for `Unsupported` errors and
/// `connect_requiring`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Capability {
    /// See [`Capabilities::watch_every_revision`].
    WatchEveryRevision,
    /// See [`Capabilities::watch_resume`].
    WatchResume,
    /// See [`Capabilities::watch_reports_expiry`].
    WatchReportsExpiry,
    /// See [`Capabilities::global_revision`].
    GlobalRevision,
    /// See [`Capabilities::native_ttl`].
    NativeTtl,
    /// See [`Capabilities::fifo_locks`].
    FifoLocks,
    /// See [`Capabilities::linearizable_reads`].
    LinearizableReads,
    /// See [`Capabilities::durable_fencing`].
    DurableFencing,
    /// See [`Capabilities::durable_writes`].
    DurableWrites,
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Capability::WatchEveryRevision => "watch_every_revision",
            Capability::WatchResume => "watch_resume",
            Capability::WatchReportsExpiry => "watch_reports_expiry",
            Capability::GlobalRevision => "global_revision",
            Capability::NativeTtl => "native_ttl",
            Capability::FifoLocks => "fifo_locks",
            Capability::LinearizableReads => "linearizable_reads",
            Capability::DurableFencing => "durable_fencing",
            Capability::DurableWrites => "durable_writes",
        };
        f.write_str(s)
    }
}
