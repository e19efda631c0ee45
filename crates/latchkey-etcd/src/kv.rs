//! KV and transactions: native etcd ranges, puts and `Txn`s.

use crate::conn::Shared;
use bytes::Bytes;
use etcd_client::{
    Compare as ECompare, CompareOp, GetOptions, KeyValue as EKv, PutOptions as EPut, Txn as ETxn,
    TxnOp, TxnOpResponse,
};
use latchkey_core::{
    validate, CmpOp, Compare, DeleteOptions, Error, KeyValue, ListOptions, Op, OpResult,
    PutOptions, Result, Revision, TxnOutcome, TxnRequest,
};
use std::collections::HashMap;

/// A revision as etcd's signed type (revisions beyond i64 never exist).
fn rev_i64(r: Revision) -> i64 {
    i64::try_from(r).unwrap_or(i64::MAX)
}

fn header_rev(h: Option<&etcd_client::ResponseHeader>) -> Revision {
    h.map(|h| h.revision().max(0) as u64).unwrap_or(0)
}

/// Converts etcd key-values of this namespace into latchkey's, with TTLs.
async fn convert(sh: &Shared, kvs: &[EKv], keys_only: bool) -> Result<Vec<KeyValue>> {
    let leases: Vec<i64> = kvs
        .iter()
        .map(|kv| kv.lease())
        .filter(|l| *l != 0)
        .collect();
    let ttls = if leases.is_empty() {
        HashMap::new()
    } else {
        sh.lease_ttls(&leases).await?
    };
    Ok(kvs
        .iter()
        .filter_map(|kv| {
            let key = sh.layout.user_key(kv.key())?;
            Some(KeyValue {
                key,
                value: if keys_only {
                    Bytes::new()
                } else {
                    Bytes::copy_from_slice(kv.value())
                },
                revision: kv.mod_revision().max(0) as u64,
                lease_ttl: (kv.lease() != 0)
                    .then(|| ttls.get(&kv.lease()).copied().unwrap_or_default()),
            })
        })
        .collect())
}

pub(crate) async fn get(sh: &Shared, key: &str) -> Result<Option<KeyValue>> {
    validate::key(key)?;
    let k = sh.layout.kv(key);
    let resp = sh
        .read(|mut c| {
            let k = k.clone();
            async move { c.get(k, None).await }
        })
        .await?;
    Ok(convert(sh, resp.kvs(), false).await?.into_iter().next())
}

pub(crate) async fn put(
    sh: &Shared,
    key: &str,
    value: Bytes,
    opts: PutOptions,
) -> Result<Revision> {
    validate::key(key)?;
    validate::value(key, &value)?;
    if let Some(t) = opts.ttl {
        validate::ttl(t)?;
    }
    let k = sh.layout.kv(key);
    // A put without TTL attaches lease 0, which also removes an earlier TTL.
    let lease = match opts.ttl {
        Some(t) => sh.kv_lease(t).await?,
        None => 0,
    };
    let mut cmps = Vec::new();
    if opts.if_absent {
        cmps.push(ECompare::create_revision(k.clone(), CompareOp::Equal, 0));
    }
    if let Some(r) = opts.if_revision {
        cmps.push(ECompare::mod_revision(
            k.clone(),
            CompareOp::Equal,
            rev_i64(r),
        ));
    }
    if cmps.is_empty() {
        let resp = sh
            .write(&format!("put {key:?}"), |mut c| {
                let (k, v) = (k.clone(), value.to_vec());
                async move { c.put(k, v, Some(EPut::new().with_lease(lease))).await }
            })
            .await?;
        return Ok(header_rev(resp.header()));
    }
    let txn = ETxn::new()
        .when(cmps)
        .and_then([TxnOp::put(
            k.clone(),
            value.to_vec(),
            Some(EPut::new().with_lease(lease)),
        )])
        .or_else([TxnOp::get(
            k.clone(),
            Some(GetOptions::new().with_keys_only()),
        )]);
    let resp = sh
        .write(&format!("conditional put {key:?}"), |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await?;
    if resp.succeeded() {
        return Ok(header_rev(resp.header()));
    }
    Err(Error::conflict(key, current_of(&resp.op_responses())))
}

/// The mod revision of the key read by a failed conditional write's
/// `else` branch (its only op).
fn current_of(ops: &[TxnOpResponse]) -> Option<Revision> {
    match ops.first() {
        Some(TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| kv.mod_revision() as u64),
        _ => None,
    }
}

pub(crate) async fn delete(sh: &Shared, key: &str, opts: DeleteOptions) -> Result<bool> {
    validate::key(key)?;
    let k = sh.layout.kv(key);
    match opts.if_revision {
        None => {
            let resp = sh
                .write(&format!("delete {key:?}"), |mut c| {
                    let k = k.clone();
                    async move { c.delete(k, None).await }
                })
                .await?;
            Ok(resp.deleted() > 0)
        }
        Some(r) => {
            let txn = ETxn::new()
                .when([ECompare::mod_revision(
                    k.clone(),
                    CompareOp::Equal,
                    rev_i64(r),
                )])
                .and_then([TxnOp::delete(k.clone(), None)])
                .or_else([TxnOp::get(
                    k.clone(),
                    Some(GetOptions::new().with_keys_only()),
                )]);
            let resp = sh
                .write(&format!("conditional delete {key:?}"), |mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await?;
            if !resp.succeeded() {
                return Err(Error::conflict(key, current_of(&resp.op_responses())));
            }
            Ok(
                matches!(resp.op_responses().first(), Some(TxnOpResponse::Delete(d)) if d.deleted() > 0),
            )
        }
    }
}

pub(crate) async fn list(sh: &Shared, prefix: &str, opts: ListOptions) -> Result<Vec<KeyValue>> {
    validate::prefix(prefix)?;
    if opts.limit == Some(0) {
        return Ok(Vec::new());
    }
    let p = sh.layout.kv(prefix);
    let mut o = GetOptions::new().with_prefix();
    if let Some(l) = opts.limit {
        o = o.with_limit(i64::try_from(l).unwrap_or(i64::MAX));
    }
    if opts.keys_only {
        o = o.with_keys_only();
    }
    let resp = sh
        .read(|mut c| {
            let (p, o) = (p.clone(), o.clone());
            async move { c.get(p, Some(o)).await }
        })
        .await?;
    convert(sh, resp.kvs(), opts.keys_only).await
}

fn cmp_op(op: CmpOp) -> CompareOp {
    match op {
        CmpOp::Equal => CompareOp::Equal,
        CmpOp::NotEqual => CompareOp::NotEqual,
        CmpOp::Less => CompareOp::Less,
        CmpOp::Greater => CompareOp::Greater,
    }
}

/// The etcd compare of a latchkey compare. `Held` checks that the lock
/// entry (its etcd key, `LockEntry::id`) exists with the guard's token as
/// its create revision.
pub(crate) fn compare(sh: &Shared, c: &Compare) -> ECompare {
    match c {
        Compare::Revision { key, op, revision } => {
            ECompare::mod_revision(sh.layout.kv(key), cmp_op(*op), rev_i64(*revision))
        }
        Compare::Value { key, value } => {
            ECompare::value(sh.layout.kv(key), CompareOp::Equal, value.to_vec())
        }
        Compare::Exists(key) => ECompare::create_revision(sh.layout.kv(key), CompareOp::Greater, 0),
        Compare::Absent(key) => ECompare::create_revision(sh.layout.kv(key), CompareOp::Equal, 0),
        Compare::Held(entry) => ECompare::create_revision(
            entry.id.clone(),
            CompareOp::Equal,
            i64::try_from(entry.token).unwrap_or(-1),
        ),
    }
}

pub(crate) async fn txn(sh: &Shared, req: TxnRequest, max_ops: usize) -> Result<TxnOutcome> {
    validate::txn(&req, max_ops)?;
    for c in &req.when {
        if let Compare::Held(e) = c {
            // A `Held` compare names an etcd key: only lock entries qualify.
            if e.id.is_empty() || e.id.contains('\0') {
                return Err(Error::InvalidArgument(format!(
                    "lock entry {:?} is not an etcd lock entry",
                    e.name
                )));
            }
        }
    }
    // Leases of TTL puts first (shared per TTL, see `Shared::kv_lease`).
    let mut leases = HashMap::new();
    for op in req.then.iter().chain(&req.otherwise) {
        if let Op::Put { ttl: Some(t), .. } = op {
            let secs = crate::conn::ttl_secs(*t);
            if let std::collections::hash_map::Entry::Vacant(v) = leases.entry(secs) {
                v.insert(sh.kv_lease(*t).await?);
            }
        }
    }
    let ops = |ops: &[Op]| -> Vec<TxnOp> {
        ops.iter()
            .map(|op| match op {
                Op::Put { key, value, ttl } => {
                    let lease = ttl.map_or(0, |t| leases[&crate::conn::ttl_secs(t)]);
                    TxnOp::put(
                        sh.layout.kv(key),
                        value.to_vec(),
                        Some(EPut::new().with_lease(lease)),
                    )
                }
                Op::Delete { key } => TxnOp::delete(sh.layout.kv(key), None),
                Op::Get { key } => TxnOp::get(sh.layout.kv(key), None),
            })
            .collect()
    };
    let etxn = ETxn::new()
        .when(req.when.iter().map(|c| compare(sh, c)).collect::<Vec<_>>())
        .and_then(ops(&req.then))
        .or_else(ops(&req.otherwise));
    let writes = req
        .then
        .iter()
        .chain(&req.otherwise)
        .any(|o| !matches!(o, Op::Get { .. }));
    let run = |mut c: etcd_client::Client| {
        let t = etxn.clone();
        async move { c.txn(t).await }
    };
    let resp = if writes {
        sh.write("txn", run).await?
    } else {
        sh.read(run).await?
    };
    let revision = header_rev(resp.header());
    let branch = if resp.succeeded() {
        &req.then
    } else {
        &req.otherwise
    };
    let mut results = Vec::with_capacity(branch.len());
    for (op, r) in branch.iter().zip(resp.op_responses()) {
        results.push(match (op, r) {
            (Op::Put { .. }, _) => OpResult::Put { revision },
            (Op::Delete { .. }, TxnOpResponse::Delete(d)) => OpResult::Delete {
                deleted: d.deleted() > 0,
            },
            (Op::Get { .. }, TxnOpResponse::Get(g)) => {
                OpResult::Get(convert(sh, g.kvs(), false).await?.into_iter().next())
            }
            (op, r) => {
                return Err(Error::backend(
                    crate::BACKEND,
                    format!("etcd answered {r:?} to {op:?}"),
                ))
            }
        });
    }
    Ok(TxnOutcome {
        succeeded: resp.succeeded(),
        results,
        revision,
    })
}
