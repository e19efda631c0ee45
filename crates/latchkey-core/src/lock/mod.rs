//! The lock machinery written once for every backend:
//!
//! - [`guard`]: [`LockGuard`](guard::LockGuard) — token, `lost()`, idempotent
//!   `release()`, release on drop; adapters supply [`GuardOps`](guard::GuardOps).
//! - [`lost`]: the one-shot "lease can no longer be guaranteed" signal.
//! - [`renew`]: [`RenewalGroup`](renew::RenewalGroup) — one renewal loop per
//!   distinct TTL of a handle, renewing all its locks in one call per tick,
//!   firing `lost()` when renewal fails up to the TTL deadline.
//! - [`local`]: a per-handle FIFO queue per lock name, so tasks of one handle
//!   never share one remote entry (the etcd same-lease trap).
//! - [`wait`]: wait bounds and cleanup of cancelled waits.

pub mod guard;
pub mod local;
pub mod lost;
pub mod renew;
pub mod wait;
