//! Opening sessions: the handle's main session and its per-TTL lock
//! sessions all come from one [`ConnCfg`].

use crate::error::{map, Kind, NAME};
use latchkey_core::{Error, Result};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use zookeeper_client as zk;

/// How to open a session to the ensemble of one URL.
#[derive(Clone)]
pub(crate) struct ConnCfg {
    /// `host:port,host:port`.
    pub cluster: String,
    /// The chroot from the URL path, if any (`/a/b`).
    pub chroot: Option<String>,
    /// `user:password` for the `digest` scheme. Never printed.
    pub auth: Option<Vec<u8>>,
    /// How long establishing a session may take.
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for ConnCfg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnCfg")
            .field("cluster", &self.cluster)
            .field("chroot", &self.chroot)
            .field("auth", &self.auth.as_ref().map(|_| "***"))
            .finish()
    }
}

impl ConnCfg {
    /// Opens a session asking for `session_timeout` (the server clamps it to
    /// its `[minSessionTimeout, maxSessionTimeout]`; read
    /// [`zk::Client::session_timeout`] for what was granted), chrooted.
    pub async fn connect(&self, session_timeout: Duration) -> Result<zk::Client> {
        self.connect_raw(session_timeout, true).await
    }

    /// Like [`ConnCfg::connect`]; `chrooted = false` gives a client at the
    /// server's root (used to create the chroot itself).
    pub async fn connect_raw(
        &self,
        session_timeout: Duration,
        chrooted: bool,
    ) -> Result<zk::Client> {
        let mut c = zk::Client::connector()
            .with_session_timeout(session_timeout)
            // The default idle timeout is 2/5 of the *requested* session
            // timeout, which is useless for tiny requests (probes).
            .with_connection_timeout(
                (session_timeout * 2 / 5)
                    .clamp(Duration::from_millis(200), Duration::from_secs(10)),
            );
        if let Some(a) = &self.auth {
            c = c.with_auth("digest", a);
        }
        let client =
            match tokio::time::timeout(self.connect_timeout, c.connect(&self.cluster)).await {
                Err(_) => {
                    return Err(Error::unavailable(
                        NAME,
                        format!(
                            "no session with {} within {:?}",
                            self.cluster, self.connect_timeout
                        ),
                    ))
                }
                Ok(Err(e)) => {
                    return Err(map(
                        e,
                        Kind::Read,
                        &format!("connecting to {}", self.cluster),
                    ))
                }
                Ok(Ok(c)) => c,
            };
        match (&self.chroot, chrooted) {
            (Some(root), true) => client.chroot(root.as_str()).map_err(|_| {
                Error::InvalidArgument(format!("{root:?} is not a valid ZooKeeper chroot"))
            }),
            _ => Ok(client),
        }
    }

    /// The smallest and largest session timeouts the server grants, found
    /// by asking for extreme ones once per cluster and process.
    pub async fn session_bounds(&self) -> Result<(Duration, Duration)> {
        static CACHE: Mutex<Option<HashMap<String, (Duration, Duration)>>> = Mutex::new(None);
        if let Some(b) = CACHE
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(HashMap::new)
            .get(&self.cluster)
        {
            return Ok(*b);
        }
        // The client uses the requested timeout as its deadline to establish
        // the session, so a tiny request may not connect at all (an ensemble
        // creates sessions through a quorum write): ask for 100 ms, then 1 s.
        // Granted more than asked = the server's minimum; granted as asked =
        // the minimum is at most that (declared as is: conservative).
        let lo = async {
            match self.connect_raw(Duration::from_millis(100), false).await {
                Ok(c) => Ok(c),
                Err(_) => self.connect_raw(Duration::from_secs(1), false).await,
            }
        };
        let (lo, hi) =
            tokio::try_join!(lo, self.connect_raw(Duration::from_secs(24 * 3600), false))?;
        let bounds = (lo.session_timeout(), hi.session_timeout());
        drop((lo, hi));
        CACHE
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(HashMap::new)
            .insert(self.cluster.clone(), bounds);
        Ok(bounds)
    }
}
