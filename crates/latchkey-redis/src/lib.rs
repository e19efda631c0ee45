//! # latchkey-redis
//!
//! latchkey on one Redis primary or on a Redis Cluster (written for Redis
//! 6.0+, tested with 7.0): the KV store
//! with revisions, prefix lists, watches and transactions, and locks with
//! fencing tokens. **Redis is the fast, simple choice, not the safest**:
//! see [What Redis cannot promise](#what-redis-cannot-promise).
//!
//! ```no_run
//! # async fn demo() -> latchkey_core::Result<()> {
//! let url = latchkey_core::BackendUrl::parse("redis://127.0.0.1:6379/0?namespace=app")?;
//! let backend = latchkey_redis::connect(url).await?;
//! # Ok(()) }
//! ```
//!
//! ## URLs
//!
//! `redis://[user[:password]@]host[:port][/db]` and `rediss://…` (TLS with
//! rustls; the server certificate is checked against the system's roots,
//! or against the CA certificates of `?ca=`). Parameters:
//!
//! | parameter | meaning | default |
//! |---|---|---|
//! | `namespace` | prefix of every key and lock (see below) | `""` |
//! | `timeout` | connecting, and waiting for each reply (`500ms`, `2s`); a dead server gives `Unavailable` within it | `2s` |
//! | `history` | change events the stream keeps for watches that resume (approximate: `XADD MAXLEN ~`); each event holds the value written, so this bounds memory as `history` × value size | `10000` |
//! | `ca` | path of a PEM file of CA certificates to trust (`rediss://` only) | system roots |
//!
//! ACL users work with `user:password@`; a password alone authenticates
//! as `default`. Wrong credentials are [`Error::Auth`](latchkey_core::Error::Auth).
//! For a Redis Cluster see [Redis Cluster](#redis-cluster).
//!
//! ## Connections
//!
//! A handle uses one multiplexed connection for every command, whatever the
//! number of locks it holds or waits for; one pub/sub connection, opened when
//! a lock waiter first has to wait; and one connection per open watch
//! (blocking `XREAD`). After a connection fails (a server restart), the next
//! call connects again: the caller does nothing. A read, or an idempotent
//! lock operation, is retried once on the new connection; a write whose
//! reply was lost is [`Error::Indeterminate`](latchkey_core::Error::Indeterminate).
//! Lock waiters and watches ride out an outage of up to one `timeout` (a
//! restart) and then carry on; longer, they fail with `Unavailable`.
//!
//! ## Key layout
//!
//! All keys of namespace `ns` share the hash tag `{ns}` (with `%`, `{`, `}`
//! escaped as `%25`, `%7B`, `%7D`), so each script touches one hash slot.
//! On a Redis Cluster the empty namespace uses the tag `{%}` instead of
//! `{}` (which Cluster does not treat as a hash tag); no other namespace
//! can produce `{%}`, since `%` is always escaped.
//!
//! | Redis key | type | holds |
//! |---|---|---|
//! | `latchkey:{ns}:rev` | string | the namespace's revision counter (`INCR` per write) |
//! | `latchkey:{ns}:kv:<key>` | hash | `v` value, `r` revision, `t` TTL in ms (with `PEXPIRE`) |
//! | `latchkey:{ns}:idx` | sorted set | every key of the namespace, score 0, so `list(prefix)` is one `ZRANGEBYLEX` (never `SCAN`) |
//! | `latchkey:{ns}:ttl` | sorted set | every key with a TTL, scored by its deadline (ms, server time), for the expiry sweep |
//! | `latchkey:{ns}:log` | stream | one entry per change, id `<revision>-<n>`, fields `k`, `e` (`p`/`d`), `v`, `t` (TTL of a put) |
//! | `latchkey:{ns}:epoch` | string | a random id set by the first watch; gone with the data, so watches notice lost history |
//! | `latchkey:{ns}:lock:<name>` | string | the holder's owner id, with a PX expiry |
//! | `latchkey:{ns}:fence:<name>` | string | the lock's fencing counter (kept forever) |
//! | `latchkey:{ns}:queue:<name>` | sorted set | the lock's waiters: owner id, scored by ticket (arrival order) |
//! | `latchkey:{ns}:waiters:<name>` | sorted set | the waiters' leases: owner id, scored by deadline (ms, server time) |
//! | `latchkey:{ns}:qseq` | string | the ticket counter of all queues of the namespace |
//! | channel `latchkey:{ns}:released:<name>:<owner>` | pub/sub | "your turn" for one waiter |
//!
//! So a lock named `x` in namespace `ns` occupies **`latchkey:{ns}:lock:x`**
//! exactly as `SET latchkey:{ns}:lock:x <token> NX PX <ttl>` would: a
//! redsync or redis-py `Lock` on that key excludes ours and ours excludes it.
//! Foreign clients do not queue (they may take a free lock ahead of our
//! queue), and a foreign release publishes nothing, so our head waiter
//! notices it when the foreign key's PTTL runs out (or within the refresh
//! period below if the key has no expiry).
//!
//! ## How it works
//!
//! - **Revisions**: every write is one Lua script (`EVALSHA`, reloaded
//!   after `NOSCRIPT`) that bumps the namespace counter, stores the value
//!   with its revision, updates the index and appends to the stream. CAS,
//!   `if_absent`, conditional deletes and transactions are single scripts.
//!   Revisions come from one counter per namespace: comparable across keys
//!   of one namespace (`global_revision`), never across namespaces.
//! - **TTL keys** expire natively (`PEXPIRE`, millisecond precision, the
//!   server's clock). `get` and `list` never show an expired key; `list`
//!   drops stale index entries as it meets them. The write scripts also
//!   record each TTL key's deadline in an expiry schedule; every open watch
//!   (of any handle) wakes at the next deadline and runs a sweep script that
//!   turns each key Redis has expired into a delete event with a new
//!   revision, exactly once. With no watch open, the expiries that happened
//!   meanwhile become events when the next watch starts (so a watch resuming
//!   from an old revision sees them, at revisions later than the expiry).
//! - **Watches** read the stream from any revision still in it; older is
//!   `Compacted`. A watch whose history the server lost (restart without
//!   persistence) ends with `Compacted` too.
//! - **Transactions**: one script evaluates every compare (including
//!   `Compare::Held`: owner id and fencing token), then runs one branch; all
//!   writes of a transaction share one revision. At most 1024 ops per branch.
//! - **Locks**: acquire = one script (`SET lock <owner> PX ttl` with a
//!   random owner id, then `INCR` of the lock's fencing counter); release =
//!   one compare-and-delete script. An uncontended lock + release costs two
//!   round trips. Locks are **FIFO**: a waiter takes a ticket in the lock's
//!   queue, a free lock goes to the head of the queue only, and a release
//!   publishes on the head's own channel, so it wakes one waiter (no herd).
//!   A waiter subscribes to its channel before it retries, and bounds each
//!   wait: the head by the holder's PTTL (an expiry publishes nothing), the
//!   others by the head's lease (a crashed head publishes nothing), all by
//!   the refresh period, min(TTL, 10 s): each attempt renews the waiter's
//!   own lease of two periods, after which a crashed waiter is dropped from
//!   the queue. So a lost message delays a waiter by at most a period, a
//!   crashed waiter holds up the queue for at most two, and a waiter sends
//!   one request per period while it waits (a lease renewal, not polling
//!   for the lock: releases are pushed). A cancelled or timed-out
//!   waiter leaves the queue at once (one script run in the background).
//!   Renewal: one script call per tick renews every lock of the handle with
//!   the same TTL; locks it finds gone fire `lost()`.
//!
//! ## What Redis cannot promise
//!
//! - **No durability assumed** (`durable_writes = false`,
//!   `durable_fencing = false`): without `appendonly yes` + `appendfsync
//!   always`, a restart loses acknowledged writes, held locks and the
//!   counters — revisions and fencing tokens then start again from 1 and
//!   **repeat**. Locks whose key vanished fire `lost()` at the next renewal.
//! - **No consensus**: replication is asynchronous; a failover (Sentinel,
//!   Cluster) can lose acknowledged writes and hand a held lock to a second
//!   holder. Reads are linearizable only because every command goes to the
//!   one primary this handle talks to.
//! - **Expiry runs on the server's wall clock**: a clock step on the server
//!   shortens or lengthens every TTL and lock lease.
//! - A script blocks the server while it runs: a 1024-op transaction, a
//!   `list` of a huge prefix or a renewal of 10,000 locks is one long command.
//! - Fencing tokens protect writes made through [`Compare::held`](latchkey_core::Compare::held)
//!   transactions in the same Redis, and resources that check them; they are
//!   only as durable as the server's data.
//!
//! Use etcd or ZooKeeper where a lock must survive a crash of the server.
//!
//! ## Redis Cluster
//!
//! ```no_run
//! # async fn demo() -> latchkey_core::Result<()> {
//! let url = latchkey_core::BackendUrl::parse(
//!     "redis+cluster://10.0.0.1:6379,10.0.0.2:6379?namespace=app",
//! )?;
//! let backend = latchkey_redis::connect(url).await?;
//! # Ok(()) }
//! ```
//!
//! `redis+cluster://[user[:password]@]host:port[,host:port…]` and
//! `rediss+cluster://…` (TLS) take the same parameters as a single server
//! (`namespace`, `timeout`, `history`, `ca`) and no `/db` path (a cluster
//! has only database 0). The hosts are seeds: any reachable one is enough,
//! the client learns the rest of the cluster from it (an ACL user needs
//! `CLUSTER SLOTS`, and `CLUSTER NODES` to learn where else to subscribe
//! when its pub/sub node dies). Everything above holds unchanged; what
//! differs:
//!
//! - **A namespace is one hash slot, the unit of sharding.** Every key of a
//!   namespace carries its hash tag, so every script (each write, each
//!   transaction, each lock operation) runs on the one master that owns the
//!   slot, atomically, and any transaction within a namespace works. One
//!   namespace's throughput is therefore bounded by one master: spread load
//!   over several namespaces (they land on different masters), not over
//!   keys of one namespace.
//! - **Connections**: the command connection is a cluster connection (one
//!   multiplexed connection per master), routed by slot. When a slot moves
//!   (resharding) or fails over, the cluster answers `MOVED`, `ASK`,
//!   `TRYAGAIN`, `CLUSTERDOWN` or `READONLY` without running the command;
//!   the adapter sends it again, with a short back-off, for up to one
//!   `timeout`, while the client library refreshes its slot map, so a
//!   migration is invisible to the caller (a migration that stalls half-way
//!   leaves the namespace's keys on two nodes, and Redis refuses multi-key
//!   scripts on it with `TRYAGAIN` until it completes: `Unavailable`). The library's own retries are
//!   off, because it would also resend a write whose reply was lost: such a
//!   write is [`Error::Indeterminate`](latchkey_core::Error::Indeterminate)
//!   as on one server. A script a node does not know (`NOSCRIPT`, after a
//!   failover, a restart or a migration to a node that never ran it) is
//!   sent again as `EVAL` of its source, routed like the `EVALSHA`, so it
//!   loads and runs on the master of its slot (never on a node that merely
//!   answered while the slot map was stale).
//! - **Watches** each get a cluster connection of their own (one
//!   connection per master), without reply timeout, which sends the
//!   blocking `XREAD` to the master of the slot and follows the slot after
//!   a migration or failover.
//! - **Failover**: while a master is down and before its replica is
//!   promoted (`cluster-node-timeout` plus an election), commands on its
//!   slots fail with `Unavailable` (`Indeterminate` for a write whose
//!   reply was lost); afterwards the same handle carries on. Lock waiters
//!   and watches ride out an outage of up to one `timeout`, so give the URL
//!   a `timeout` longer than a failover (with `cluster-node-timeout 1000`
//!   the tests measured 2.5–3 s from the kill to the first write on the
//!   promoted replica: `timeout=5s`). A new handle connects as long as one
//!   seed answers.
//! - **Name and capabilities**: [`Backend::name`] is `"redis"` in both
//!   modes (errors name it too; `Debug` of a handle shows `cluster: true`),
//!   and [`Backend::capabilities`] are the same as on one server: each
//!   script still runs atomically on one master, and the losses below are
//!   those a single server without `appendfsync always` already declares.
//! - **Lock hand-off** uses classic pub/sub: Redis Cluster forwards every
//!   `PUBLISH` to every node, so a handle subscribes on any one node (one
//!   pub/sub connection per handle, as on one server). If that node dies,
//!   its waiters re-check their locks and subscribe on the next node the
//!   handle knows (the seeds and the nodes listed by the last one). Sharded
//!   pub/sub (`SSUBSCRIBE`, Redis 7) would keep messages on the slot's
//!   shard, but the client library offers it only on RESP3 cluster
//!   connections that re-subscribe at their own pace, which breaks the
//!   "subscribed before the next attempt" rule the queue relies on; the
//!   price of the broadcast is one bus message per node per release. The
//!   bounded wait covers any message lost meanwhile.
//! - **What a cluster cannot promise** (on top of the list above):
//!   replication to replicas is asynchronous, so when a master fails and a
//!   replica is promoted, writes acknowledged by the old master but not yet
//!   replicated are gone: values, held locks (a second holder can acquire),
//!   fencing-counter and revision increments (tokens and revisions can
//!   repeat). `durable_writes` and `durable_fencing` stay `false`. A master
//!   cut off from the majority keeps serving reads and writes until
//!   `cluster-node-timeout` passes, so reads are linearizable only outside
//!   such a window. Revisions remain per namespace, as on one server.

#![deny(missing_docs)]

mod backend;
mod conn;
mod layout;
mod lock;
mod notify;
mod scripts;
mod watch;

pub use backend::{RedisBackend, MAX_TXN_OPS, MIN_TTL, TTL_GRANULARITY};
pub use conn::{DEFAULT_HISTORY, DEFAULT_TIMEOUT};

use latchkey_core::{Backend, BackendUrl, Result};
use std::sync::Arc;

/// The URL schemes of this backend.
pub const SCHEMES: &[&str] = &["redis", "rediss", "redis+cluster", "rediss+cluster"];

/// Opens a handle for a `redis://`, `rediss://`, `redis+cluster://` or
/// `rediss+cluster://` URL. Connects before it returns: an unreachable
/// server is `Unavailable`, refused credentials `Auth`, a bad URL
/// `InvalidUrl`.
pub async fn connect(url: BackendUrl) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(RedisBackend::connect(&url).await?))
}
