//! Release notifications for lock waiters: one pub/sub connection per
//! handle (opened on first need), shared by every waiter of the handle.
//!
//! A waiter subscribes to its own channel (`…released:<name>:<owner>`)
//! *before* it retries,
//! so a release between its failed attempt and its wait is never missed.
//! Pub/sub is fire-and-forget (a message published while the connection
//! was down is gone, and a TTL expiry publishes nothing), so every wait is
//! also bounded by the holder's remaining PTTL.
//!
//! On a Redis Cluster the scripts `PUBLISH` as on one server, on the
//! master of the namespace's hash slot, and Redis Cluster forwards every
//! classic `PUBLISH` to every node over its bus, so a subscription on any
//! node hears it. The handle subscribes on that master when it can reach
//! it: a message that crosses the bus arrives up to ~45 ms late (measured:
//! the W3 handoff p99 on a 3-master cluster was 44 ms on another node,
//! well under 1 ms on the master). When the node dies the reader ends,
//! every waiter re-checks its lock, and the next subscription goes to the
//! slot's master if it answers, else to the next node the handle knows
//! (the URL's seeds, plus the nodes the last node listed in `CLUSTER
//! NODES`). A subscription that had to settle for another node stays
//! there until its connection ends: slower, never wrong. Sharded pub/sub (`SPUBLISH`,
//! Redis 7) would keep the message on the namespace's shard, but the client
//! library offers it only on RESP3 cluster connections, whose pushes come
//! back on one channel for the whole connection and are re-subscribed by
//! the library at its own pace; a plain pub/sub connection to one node
//! keeps the "confirmed before the next attempt" rule above simple, and
//! works with Redis 6 as well. The price: each release message crosses the
//! cluster bus to every node.

use crate::conn::{map_err, ClusterTarget, Target, NAME};
use futures::StreamExt;
use latchkey_core::{Error, Result};
use redis::aio::{PubSub, PubSubSink};
use redis::AsyncConnectionConfig;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::watch;

struct Channel {
    /// Bumped at every message on the channel (and when the connection is
    /// lost, so waiters re-check).
    tx: watch::Sender<u64>,
    users: usize,
    /// The connection generation the channel is subscribed on (0: none).
    subscribed_on: u64,
}

#[derive(Default)]
struct ConnState {
    sink: Option<PubSubSink>,
    generation: u64,
    /// The task reading the current connection's messages; aborting it
    /// closes the connection.
    reader: Option<tokio::task::AbortHandle>,
}

impl ConnState {
    fn close(&mut self) {
        self.sink = None;
        if let Some(r) = self.reader.take() {
            r.abort();
        }
    }
}

struct Inner {
    target: Target,
    /// A key in the namespace's hash slot (cluster only): the master of
    /// that slot is where the release messages are published.
    slot_key: String,
    /// Cluster nodes to subscribe on, in the order to try them (rotated
    /// past a node that failed).
    nodes: Mutex<Vec<(String, u16)>>,
    timeout: Duration,
    ops: Arc<AtomicU64>,
    /// Serialises (re)connecting, subscribing and unsubscribing, so an
    /// UNSUBSCRIBE of a channel nobody waits on any more never overtakes a
    /// new waiter's SUBSCRIBE.
    conn: tokio::sync::Mutex<ConnState>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

/// The release notifications of one handle.
#[derive(Clone)]
pub(crate) struct Notifier {
    inner: Arc<Inner>,
}

/// One waiter's interest in one channel. Dropping it unsubscribes (in the
/// background) once no waiter of the handle needs the channel: a Redis
/// waiter has no server-side entry, so nothing else is left behind.
pub(crate) struct Subscription {
    inner: Arc<Inner>,
    channel: String,
    rx: watch::Receiver<u64>,
}

fn channels(
    m: &Mutex<HashMap<String, Channel>>,
) -> std::sync::MutexGuard<'_, HashMap<String, Channel>> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Notifier {
    /// Notifications for the namespace whose keys hash like `slot_key`.
    pub(crate) fn new(
        target: Target,
        slot_key: String,
        timeout: Duration,
        ops: Arc<AtomicU64>,
    ) -> Self {
        let nodes = match &target {
            Target::Single(_) => Vec::new(),
            Target::Cluster(c) => c.seed_addrs(),
        };
        Notifier {
            inner: Arc::new(Inner {
                target,
                slot_key,
                nodes: Mutex::new(nodes),
                timeout,
                ops,
                conn: tokio::sync::Mutex::new(ConnState::default()),
                channels: Arc::new(Mutex::new(HashMap::new())),
            }),
        }
    }

    /// Subscribes to `channel`; returns once the server confirmed.
    pub(crate) async fn subscribe(&self, channel: &str) -> Result<Subscription> {
        let rx = {
            let mut map = channels(&self.inner.channels);
            let ch = map.entry(channel.to_string()).or_insert_with(|| Channel {
                tx: watch::channel(0).0,
                users: 0,
                subscribed_on: 0,
            });
            ch.users += 1;
            ch.tx.subscribe()
        };
        let sub = Subscription {
            inner: self.inner.clone(),
            channel: channel.to_string(),
            rx,
        };
        sub.inner.ensure(channel).await?;
        Ok(sub)
    }

    /// Number of channels this handle is subscribed to or about to be
    /// (for tests: a cancelled waiter leaves none).
    pub(crate) fn channel_count(&self) -> usize {
        channels(&self.inner.channels).len()
    }
}

impl Inner {
    /// Makes sure `channel` is subscribed on a live connection.
    async fn ensure(self: &Arc<Self>, channel: &str) -> Result<()> {
        let mut st = self.conn.lock().await;
        if st.sink.is_none() {
            self.connect(&mut st).await?;
        }
        let generation = st.generation;
        let already = channels(&self.channels)
            .get(channel)
            .is_some_and(|c| c.subscribed_on == generation);
        if already {
            return Ok(());
        }
        let sink = st.sink.as_mut().expect("connected above");
        self.ops.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(self.timeout, sink.subscribe(channel)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                st.close();
                return Err(map_err(&e));
            }
            Err(_) => {
                st.close();
                return Err(Error::unavailable(NAME, "SUBSCRIBE timed out"));
            }
        }
        if let Some(c) = channels(&self.channels).get_mut(channel) {
            c.subscribed_on = generation;
        }
        Ok(())
    }

    async fn connect(self: &Arc<Self>, st: &mut ConnState) -> Result<()> {
        let pubsub = self.open().await?;
        let (sink, mut stream) = pubsub.split();
        let generation = st.generation + 1;
        let map = self.channels.clone();
        let weak = Arc::downgrade(self);
        st.close();
        let reader = tokio::spawn(async move {
            while let Some(msg) = stream.next().await {
                if let Some(c) = channels(&map).get(msg.get_channel_name()) {
                    c.tx.send_modify(|n| *n += 1);
                }
            }
            // The connection is gone: forget it, and wake every waiter so it
            // re-subscribes on a new one and re-checks the lock.
            if let Some(inner) = weak.upgrade() {
                let mut st = inner.conn.lock().await;
                if st.generation == generation {
                    st.sink = None;
                    st.reader = None;
                }
            }
            for c in channels(&map).values() {
                c.tx.send_modify(|n| *n += 1);
            }
        });
        st.generation = generation;
        st.sink = Some(sink);
        st.reader = Some(reader.abort_handle());
        Ok(())
    }
}

/// What one node said about the cluster.
#[derive(Debug, Default, PartialEq)]
struct Listing {
    /// The nodes its `CLUSTER NODES` lists as reachable.
    nodes: Vec<(String, u16)>,
    /// The reachable master serving the namespace's slot, if listed.
    owner: Option<(String, u16)>,
}

/// Parses a `CLUSTER NODES` reply; `slot`: the namespace's hash slot.
fn parse_cluster_nodes(text: &str, slot: Option<u16>) -> Listing {
    let mut out = Listing::default();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(_id), Some(addr), Some(flags)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if flags
            .split(',')
            .any(|fl| matches!(fl, "fail" | "fail?" | "noaddr" | "handshake"))
        {
            continue;
        }
        // `ip:port@cport[,hostname]`
        let hp = addr.split(['@', ',']).next().unwrap_or("");
        let Some((host, port)) = hp.rsplit_once(':') else {
            continue;
        };
        let Ok(port) = port.parse::<u16>() else {
            continue;
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 {
            continue;
        }
        let addr = (host.to_string(), port);
        // Fields after `link-state` are slot ranges (`[…]` entries are
        // slots being migrated: not served here yet).
        let serves = |slot: u16| {
            flags.split(',').any(|fl| fl == "master")
                && f.clone().skip(5).any(|r| {
                    let (a, b) = r.split_once('-').unwrap_or((r, r));
                    matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if (a..=b).contains(&slot))
                })
        };
        if slot.is_some_and(serves) {
            out.owner = Some(addr.clone());
        }
        out.nodes.push(addr);
    }
    out
}

impl Inner {
    /// A pub/sub connection: to the server, or to one node of the cluster.
    async fn open(&self) -> Result<PubSub> {
        let timeout = self.timeout;
        let cluster = match &self.target {
            Target::Single(client) => {
                return match tokio::time::timeout(timeout, client.get_async_pubsub()).await {
                    Ok(Ok(p)) => Ok(p),
                    Ok(Err(e)) => Err(map_err(&e)),
                    Err(_) => Err(Error::unavailable(
                        NAME,
                        format!("no pub/sub connection within {timeout:?}"),
                    )),
                };
            }
            Target::Cluster(c) => c.clone(),
        };
        let candidates = self
            .nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut last = Error::unavailable(NAME, "no cluster node to subscribe on");
        for (n, (host, port)) in candidates.iter().enumerate() {
            match tokio::time::timeout(timeout, self.open_on(&cluster, host, *port)).await {
                Ok(Ok((mut pubsub, listed))) => {
                    let mut used = (host.clone(), *port);
                    // Move to the slot's master, where the messages are
                    // published, if this is another node and it answers.
                    if let Some(owner) = listed.owner.filter(|o| *o != used) {
                        if let Ok(Ok((p, _))) =
                            tokio::time::timeout(timeout, self.open_on(&cluster, &owner.0, owner.1))
                                .await
                        {
                            pubsub = p;
                            used = owner;
                        }
                    }
                    let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
                    // Next time start with the node that worked, then the
                    // ones it listed, then the seeds.
                    let mut next = vec![used];
                    for a in listed.nodes.into_iter().chain(cluster.seed_addrs()) {
                        if !next.contains(&a) {
                            next.push(a);
                        }
                    }
                    *nodes = next;
                    return Ok(pubsub);
                }
                Ok(Err(e)) => last = e,
                Err(_) => {
                    last = Error::unavailable(
                        NAME,
                        format!("no pub/sub connection to {host}:{port} within {timeout:?}"),
                    )
                }
            }
            // Put the node that failed last, so the next try starts
            // elsewhere.
            let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(pos) = nodes.iter().position(|a| a == &candidates[n]) {
                let a = nodes.remove(pos);
                nodes.push(a);
            }
        }
        Err(last)
    }

    /// Subscribes on one cluster node; also returns what it lists.
    async fn open_on(
        &self,
        cluster: &ClusterTarget,
        host: &str,
        port: u16,
    ) -> Result<(PubSub, Listing)> {
        let client = cluster.node_client(host, port).map_err(|e| map_err(&e))?;
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let mut con = client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
            .map_err(|e| map_err(&e))?;
        self.ops.fetch_add(1, Ordering::Relaxed);
        // Best effort: a user whose ACL forbids CLUSTER NODES still gets
        // its notifications (with the seeds as the only other nodes).
        let text = match redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async::<String>(&mut con)
            .await
        {
            Ok(t) => t,
            Err(e) if crate::conn::is_connection_failure(&e) => return Err(map_err(&e)),
            Err(_) => String::new(),
        };
        let slot = if text.is_empty() {
            None
        } else {
            self.ops.fetch_add(1, Ordering::Relaxed);
            redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(&self.slot_key)
                .query_async::<u16>(&mut con)
                .await
                .ok()
        };
        drop(con);
        let pubsub = client.get_async_pubsub().await.map_err(|e| map_err(&e))?;
        Ok((pubsub, parse_cluster_nodes(&text, slot)))
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The handle is gone: close its pub/sub connection.
        self.conn.get_mut().close();
    }
}

impl Subscription {
    /// Marks every notification so far as seen: [`changed`](Self::changed)
    /// then waits for a newer one. Call right before an attempt.
    pub(crate) fn mark_seen(&mut self) {
        self.rx.borrow_and_update();
    }

    /// Completes at the first notification after [`mark_seen`](Self::mark_seen).
    pub(crate) async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            // Cannot happen while we hold the entry; never spin if it does.
            futures::future::pending::<()>().await;
        }
    }

    /// Re-subscribes if the connection was replaced since; rides out a
    /// short outage (a restart) for up to one timeout.
    pub(crate) async fn refresh(&mut self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.inner.timeout;
        loop {
            match self.inner.ensure(&self.channel).await {
                Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                r => return r,
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let last = {
            let mut map = channels(&self.inner.channels);
            match map.get_mut(&self.channel) {
                Some(c) if c.users > 1 => {
                    c.users -= 1;
                    false
                }
                Some(_) => {
                    map.remove(&self.channel);
                    true
                }
                None => false,
            }
        };
        if !last {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = self.inner.clone();
        let channel = std::mem::take(&mut self.channel);
        rt.spawn(async move {
            let mut st = inner.conn.lock().await;
            // A new waiter may have come for the channel meanwhile.
            if channels(&inner.channels).contains_key(&channel) {
                return;
            }
            if let Some(sink) = st.sink.as_mut() {
                inner.ops.fetch_add(1, Ordering::Relaxed);
                if !matches!(
                    tokio::time::timeout(inner.timeout, sink.unsubscribe(&channel)).await,
                    Ok(Ok(()))
                ) {
                    st.close();
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cluster_nodes_lists_reachable_nodes() {
        let text = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7002@17002,host-b master - 0 0 2 connected 5461-10922
c3 127.0.0.1:7003@17003 master,fail - 0 0 3 connected 10923-16383
d4 :0@0 slave,noaddr c3 0 0 3 disconnected
e5 ::1:7005@17005 slave a1 0 0 1 connected
";
        let nodes = vec![
            ("127.0.0.1".to_string(), 7001),
            ("127.0.0.1".to_string(), 7002),
            ("::1".to_string(), 7005),
        ];
        let owner = |slot| super::parse_cluster_nodes(text, Some(slot)).owner;
        assert_eq!(super::parse_cluster_nodes(text, None).nodes, nodes);
        assert_eq!(owner(0), Some(("127.0.0.1".to_string(), 7001)));
        assert_eq!(owner(5460), Some(("127.0.0.1".to_string(), 7001)));
        assert_eq!(owner(5461), Some(("127.0.0.1".to_string(), 7002)));
        // A failed master serves nothing; a slot being imported is not served yet.
        assert_eq!(owner(12000), None);
        let migrating = "a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-99 [100-<-b2]\n";
        assert_eq!(super::parse_cluster_nodes(migrating, Some(100)).owner, None);
        assert_eq!(
            super::parse_cluster_nodes(migrating, Some(99)).owner,
            Some(("127.0.0.1".to_string(), 7001))
        );
    }
}
