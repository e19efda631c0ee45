//! Reading key states and planning `multi` writes that pin what was read.
//!
//! Every write is "read, decide locally, then one `multi` that re-checks
//! what was read and writes": a key's znode is pinned by its `dataVersion`
//! (never reset, see [`crate::keys`]), a missing znode by `create`+`delete`
//! of it (fails with `NodeExists` if it appeared), a live TTL key also by
//! the existence of its TTL child. If any pin fails the whole `multi` is
//! rejected and the caller re-reads and decides again, so the outcome is
//! atomic although ZooKeeper cannot compare values itself.

use crate::keys::{decode_data, encode_live, NodeData, TOMBSTONE, TTL_CHILD};
use bytes::Bytes;
use latchkey_core::{KeyValue, Revision};
use std::time::Duration;
use zookeeper_client as zk;

type ZkResult<T> = std::result::Result<T, zk::Error>;

/// A key's znode as read.
#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub version: i32,
    pub mzxid: i64,
    pub pzxid: i64,
    pub children: i32,
    pub data: NodeData,
}

/// A key as read: `None` when it has no znode.
pub(crate) type KeyState = Option<Node>;

impl Node {
    pub fn from_read(data: Vec<u8>, stat: &zk::Stat) -> Node {
        Node {
            version: stat.version,
            mzxid: stat.mzxid,
            pzxid: stat.pzxid,
            children: stat.num_children,
            data: decode_data(data),
        }
    }

    /// Live: not a tombstone, and (for a TTL key) its TTL child still exists.
    pub fn alive(&self) -> bool {
        match &self.data {
            NodeData::Tombstone => false,
            NodeData::Live { ttl: None, .. } => true,
            NodeData::Live { ttl: Some(_), .. } => self.children > 0,
        }
    }

    /// A live key whose liveness also depends on its TTL child.
    pub fn alive_with_ttl(&self) -> bool {
        self.alive() && matches!(self.data, NodeData::Live { ttl: Some(_), .. })
    }

    /// The revision of the change that made this key absent: the tombstone
    /// write, or the server's deletion of the TTL child.
    pub fn gone_revision(&self) -> Revision {
        self.mzxid.max(self.pzxid) as Revision
    }
}

/// The key's current revision, `None` when absent.
pub(crate) fn current(st: &KeyState) -> Option<Revision> {
    st.as_ref()
        .filter(|n| n.alive())
        .map(|n| n.mzxid as Revision)
}

/// The key as the API shows it.
pub(crate) fn logical(key: &str, st: &KeyState, keys_only: bool) -> Option<KeyValue> {
    let n = st.as_ref().filter(|n| n.alive())?;
    let NodeData::Live { value, ttl } = &n.data else {
        return None;
    };
    Some(KeyValue {
        key: key.to_string(),
        value: if keys_only {
            Bytes::new()
        } else {
            value.clone()
        },
        revision: n.mzxid as Revision,
        lease_ttl: *ttl,
    })
}

/// Path of a key's TTL child.
pub(crate) fn ttl_child(path: &str) -> String {
    format!("{path}/{TTL_CHILD}")
}

/// A key as a `multi` being planned will have left it.
#[derive(Clone, Debug)]
pub(crate) struct Sim {
    exists: bool,
    version: i32,
    has_child: bool,
    alive: bool,
    pinned: bool,
    /// The value as it will be, and whether this txn wrote it.
    pub value: Option<(Bytes, Option<Duration>)>,
    pub written: bool,
}

impl Sim {
    pub fn new(st: &KeyState) -> Sim {
        match st {
            None => Sim {
                exists: false,
                version: 0,
                has_child: false,
                alive: false,
                pinned: false,
                value: None,
                written: false,
            },
            Some(n) => Sim {
                exists: true,
                version: n.version,
                has_child: n.children > 0,
                alive: n.alive(),
                pinned: false,
                value: match (&n.data, n.alive()) {
                    (NodeData::Live { value, ttl }, true) => Some((value.clone(), *ttl)),
                    _ => None,
                },
                written: false,
            },
        }
    }

    pub fn alive(&self) -> bool {
        self.alive
    }
}

/// Outcome of committing a plan.
pub(crate) enum Commit {
    /// Committed; one result per op.
    Done(Vec<zk::MultiWriteResult>),
    /// A pin failed: what was read changed. Read again.
    Retry,
    /// The request failed.
    Failed(zk::Error),
}

/// A `multi` being built, counting its ops so results can be found.
pub(crate) struct Plan<'a> {
    w: zk::MultiWriter<'a>,
    n: usize,
    acls: zk::Acls<'static>,
}

impl<'a> Plan<'a> {
    pub fn new(client: &'a zk::Client, acls: zk::Acls<'static>) -> Self {
        Plan {
            w: client.new_multi_writer(),
            n: 0,
            acls,
        }
    }

    fn bump(&mut self) -> usize {
        self.n += 1;
        self.n - 1
    }

    pub fn check(&mut self, path: &str, version: i32) -> ZkResult<usize> {
        self.w.add_check_version(path, version)?;
        Ok(self.bump())
    }

    fn create(&mut self, path: &str, ttl: Option<Duration>) -> ZkResult<usize> {
        let opts = zk::CreateMode::Persistent.with_acls(self.acls);
        let opts = match ttl {
            Some(t) => opts.with_ttl(t.max(Duration::from_millis(1))),
            None => opts,
        };
        self.w.add_create(path, &[], &opts)?;
        Ok(self.bump())
    }

    fn set(&mut self, path: &str, data: &[u8], version: i32) -> ZkResult<usize> {
        self.w.add_set_data(path, data, Some(version))?;
        Ok(self.bump())
    }

    fn delete(&mut self, path: &str) -> ZkResult<usize> {
        self.w.add_delete(path, None)?;
        Ok(self.bump())
    }

    /// Pins the key as read: its version, or its absence, and its TTL
    /// child if its liveness depends on it.
    pub fn pin(&mut self, path: &str, st: &KeyState) -> ZkResult<()> {
        match st {
            None => {
                // Fails with NodeExists if the znode appeared; leaves nothing.
                self.create(path, None)?;
                self.delete(path)?;
            }
            Some(n) => {
                self.check(path, n.version)?;
                if n.alive_with_ttl() {
                    self.check(&ttl_child(path), -1)?;
                }
            }
        }
        Ok(())
    }

    /// Pins a key of a txn once (later writes to it pin it by version).
    pub fn pin_sim(&mut self, path: &str, sim: &mut Sim, st: &KeyState) -> ZkResult<()> {
        if !sim.pinned {
            self.pin(path, st)?;
            sim.pinned = true;
        }
        Ok(())
    }

    /// Writes `value` with `ttl`; returns the index of the op whose result
    /// carries the new revision (a `setData`: ZooKeeper before 3.8.2 returns
    /// no valid `Stat` for a `create` inside a `multi`, ZOOKEEPER-4026).
    pub fn put(
        &mut self,
        path: &str,
        sim: &mut Sim,
        value: &Bytes,
        ttl: Option<Duration>,
    ) -> ZkResult<usize> {
        let data = encode_live(value, ttl);
        let idx;
        if !sim.exists {
            self.create(path, None)?;
            idx = self.set(path, &data, 0)?;
            sim.exists = true;
            sim.version = 1;
        } else {
            idx = self.set(path, &data, sim.version)?;
            sim.version += 1;
            if sim.has_child {
                self.delete(&ttl_child(path))?;
                sim.has_child = false;
            }
        }
        if let Some(t) = ttl {
            self.create(&ttl_child(path), Some(t))?;
            sim.has_child = true;
        }
        sim.alive = true;
        sim.pinned = true;
        sim.written = true;
        sim.value = Some((value.clone(), ttl));
        Ok(idx)
    }

    /// Deletes a live key by writing a tombstone; returns the index of the
    /// `setData`. The caller checks [`Sim::alive`] first.
    pub fn tombstone(&mut self, path: &str, sim: &mut Sim) -> ZkResult<usize> {
        let idx = self.set(path, TOMBSTONE, sim.version)?;
        sim.version += 1;
        if sim.has_child {
            self.delete(&ttl_child(path))?;
            sim.has_child = false;
        }
        sim.alive = false;
        sim.pinned = true;
        sim.written = true;
        sim.value = None;
        Ok(idx)
    }

    /// Sends the `multi` (an empty plan commits at once).
    pub async fn commit(mut self) -> Commit {
        match self.w.commit().await {
            Ok(r) => Commit::Done(r),
            Err(zk::MultiWriteError::OperationFailed {
                source:
                    zk::Error::BadVersion
                    | zk::Error::NoNode
                    | zk::Error::NodeExists
                    | zk::Error::NotEmpty,
                ..
            }) => Commit::Retry,
            Err(zk::MultiWriteError::OperationFailed { source, .. }) => Commit::Failed(source),
            Err(zk::MultiWriteError::RequestFailed { source }) => Commit::Failed(source),
        }
    }
}

/// The revision a `setData` result carries.
pub(crate) fn result_revision(r: &zk::MultiWriteResult) -> Option<Revision> {
    match r {
        zk::MultiWriteResult::SetData { stat } => Some(stat.mzxid as Revision),
        _ => None,
    }
}
