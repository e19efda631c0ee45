//! Release notifications for lock waiters: one pub/sub connection per
//! handle (opened on first need), shared by every waiter of the handle.
//!
//! A waiter subscribes to its own channel (`…released:<name>:<owner>`)
//! *before* it retries,
//! so a release between its failed attempt and its wait is never missed.
//! Pub/sub is fire-and-forget (a message published while the connection
//! was down is gone, and a TTL expiry publishes nothing), so every wait is
//! also bounded by the holder's remaining PTTL.

use crate::conn::{map_err, NAME};
use futures::StreamExt;
use latchkey_core::{Error, Result};
use redis::aio::PubSubSink;
use redis::Client;
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
    client: Client,
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
    pub(crate) fn new(client: Client, timeout: Duration, ops: Arc<AtomicU64>) -> Self {
        Notifier {
            inner: Arc::new(Inner {
                client,
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
        let pubsub = match tokio::time::timeout(self.timeout, self.client.get_async_pubsub()).await
        {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return Err(map_err(&e)),
            Err(_) => {
                return Err(Error::unavailable(
                    NAME,
                    format!("no pub/sub connection within {:?}", self.timeout),
                ))
            }
        };
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
