//! Mutual exclusion and fencing-token monotonicity over recorded lock
//! histories.
//!
//! Each [`Holding`] is one successful acquisition: `acquired` is when
//! `lock()`/`try_lock()` *returned* the guard, `released` is when the holder
//! *began* to release (or saw `lost()`). Whatever the backend, the holder
//! certainly held the lock during `[acquired, released]`, so two holdings of
//! one lock whose intervals overlap prove that exclusion failed. In the
//! order of acquisition, fencing tokens must strictly increase (and so can
//! never repeat).

use std::collections::BTreeMap;
use std::fmt;

/// One holding of a lock, as a client observed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holding {
    /// The lock's name (histories may mix names; each is checked alone).
    pub lock: String,
    /// Who held it (task or client id), for messages.
    pub client: usize,
    /// The guard's fencing token.
    pub token: u64,
    /// When the acquiring call returned.
    pub acquired: u64,
    /// When the holder started releasing (or learned it had lost the lock).
    pub released: u64,
}

/// What the checker found wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExclusionViolation {
    /// A holding ends before it starts: the history itself is malformed.
    Malformed(Holding),
    /// Two holdings of one lock overlap in time.
    Overlap {
        /// The holding acquired first.
        first: Holding,
        /// The holding acquired while `first` was still held.
        second: Holding,
    },
    /// A later holder's token is not greater than an earlier holder's.
    TokenNotIncreasing {
        /// The earlier holding.
        earlier: Holding,
        /// The later holding, whose token is ≤ the earlier one's.
        later: Holding,
    },
}

impl fmt::Display for ExclusionViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExclusionViolation::Malformed(h) => write!(
                f,
                "malformed holding: client {} of lock {:?} released at {} before acquiring at {}",
                h.client, h.lock, h.released, h.acquired
            ),
            ExclusionViolation::Overlap { first, second } => write!(
                f,
                "exclusion violated on lock {:?}: client {} held it (token {}) during [{}, {}] \
                 and client {} acquired it (token {}) at {}, inside that interval",
                first.lock,
                first.client,
                first.token,
                first.acquired,
                first.released,
                second.client,
                second.token,
                second.acquired
            ),
            ExclusionViolation::TokenNotIncreasing { earlier, later } => write!(
                f,
                "fencing tokens not strictly increasing on lock {:?}: client {} acquired at {} \
                 with token {}, then client {} acquired at {} with token {}",
                earlier.lock,
                earlier.client,
                earlier.acquired,
                earlier.token,
                later.client,
                later.acquired,
                later.token
            ),
        }
    }
}

impl std::error::Error for ExclusionViolation {}

/// Checks mutual exclusion and fencing monotonicity; returns the first
/// violation found (overlaps are reported before token order).
pub fn check_exclusion(history: &[Holding]) -> Result<(), ExclusionViolation> {
    let mut by_lock: BTreeMap<&str, Vec<&Holding>> = BTreeMap::new();
    for h in history {
        if h.released < h.acquired {
            return Err(ExclusionViolation::Malformed(h.clone()));
        }
        by_lock.entry(h.lock.as_str()).or_default().push(h);
    }
    for holdings in by_lock.values_mut() {
        holdings.sort_by_key(|h| (h.acquired, h.released));
        // The holding with the latest end so far: any later start before
        // that end overlaps it. Touching ends are allowed (ticks are coarse).
        let mut latest: Option<&Holding> = None;
        for h in holdings.iter() {
            if let Some(l) = latest {
                if h.acquired < l.released {
                    return Err(ExclusionViolation::Overlap {
                        first: l.clone(),
                        second: (*h).clone(),
                    });
                }
            }
            if latest.is_none_or(|l| h.released > l.released) {
                latest = Some(h);
            }
        }
        for w in holdings.windows(2) {
            if w[1].token <= w[0].token {
                return Err(ExclusionViolation::TokenNotIncreasing {
                    earlier: w[0].clone(),
                    later: w[1].clone(),
                });
            }
        }
    }
    Ok(())
}
