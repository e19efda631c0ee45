//! KV cases: round trips, revisions, compare-and-swap, listing, odd keys,
//! namespaces, and a linearizability check of concurrent register ops.

use crate::case::{
    all_keys, b, ensure, ensure_eq, expect_conflict, expect_err, expect_value, gates, parse_num,
    put_value, value_of, CaseResult, Cx, ErrCtx, Fail, Joined,
};
use crate::checkers::{check_kv, Clock, KvInput, KvOperation, KvOutput, Operation, Verdict};
use bytes::Bytes;
use latchkey_core::{DeleteOptions, Error, ListOptions, PutOptions};
use rand::{Rng, SeedableRng};
use std::sync::Arc;

fn keys_of(kvs: &[latchkey_core::KeyValue]) -> Vec<&str> {
    kvs.iter().map(|kv| kv.key.as_str()).collect()
}

cases! {
    /// A value holding every byte 0..=255 (and invalid UTF-8) reads back
    /// byte for byte, with the revision the put returned.
    #[case("kv::round_trip_binary")]
    async fn round_trip_binary(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        let mut v: Vec<u8> = (0..=255u8).collect();
        v.extend_from_slice(&[0xff, 0xfe, 0x00, 0xc3, 0x28]);
        let rev = h
            .put("bin", Bytes::from(v.clone()), PutOptions::default())
            .await
            .ctx("put bin")?;
        ensure!(
            rev > 0,
            "expected a put to return a revision > 0, got {rev}"
        );
        let kv = h
            .get("bin")
            .await
            .ctx("get bin")?
            .ok_or_else(|| Fail("expected bin to exist after put".into()))?;
        ensure_eq!(kv.value.as_ref(), v.as_slice(), "the value read back");
        ensure_eq!(
            kv.revision,
            rev,
            "the revision of get (the put returned it)"
        );
        ensure_eq!(kv.key, "bin", "the key of the KeyValue");
        ensure_eq!(kv.lease_ttl, None, "lease_ttl of a key put without TTL");
        Ok(())
    }

    /// An empty value is stored and read back as empty, distinct from a
    /// missing key.
    #[case("kv::empty_value")]
    async fn empty_value(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        h.put("empty", Bytes::new(), PutOptions::default())
            .await
            .ctx("put empty")?;
        let kv = h.get("empty").await.ctx("get empty")?;
        ensure!(
            kv.is_some(),
            "expected a key with an empty value to exist, got None"
        );
        ensure_eq!(kv.unwrap().value.len(), 0, "the length of the empty value");
        Ok(())
    }

    /// A value of exactly 512 KiB (the common limit) round-trips intact.
    #[case("kv::large_value_512k", destructive = true)]
    async fn large_value(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        let v: Vec<u8> = (0..512 * 1024)
            .map(|i: usize| (i * 31 % 251) as u8)
            .collect();
        h.put("big", Bytes::from(v.clone()), PutOptions::default())
            .await
            .ctx("put of 512 KiB")?;
        let kv = h
            .get("big")
            .await
            .ctx("get big")?
            .ok_or_else(|| Fail("expected big to exist".into()))?;
        ensure!(
            kv.value.as_ref() == v.as_slice(),
            "expected the 512 KiB value to read back intact (got {} bytes)",
            kv.value.len()
        );
        Ok(())
    }

    /// Reading a missing key is `Ok(None)`; deleting it is `Ok(false)`.
    #[case("kv::missing_key")]
    async fn missing_key(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        ensure_eq!(
            h.get("nope").await.ctx("get nope")?,
            None,
            "get of a missing key"
        );
        ensure_eq!(
            h.delete("nope", DeleteOptions::default())
                .await
                .ctx("delete nope")?,
            false,
            "delete of a missing key"
        );
        Ok(())
    }

    /// Overwriting a key returns a strictly larger revision, and get shows
    /// the new value and revision.
    #[case("kv::overwrite_bumps_revision")]
    async fn overwrite_bumps_revision(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        let mut last = 0;
        for i in 0..5 {
            let r = h
                .put("k", b(&format!("v{i}")), PutOptions::default())
                .await
                .ctx("put k")?;
            ensure!(
                r > last,
                "expected write {i} of k to get a revision > {last}, got {r}"
            );
            last = r;
        }
        let kv = h
            .get("k")
            .await
            .ctx("get k")?
            .ok_or_else(|| Fail("expected k to exist".into()))?;
        ensure_eq!(kv.value, b("v4"), "the value after five puts");
        ensure_eq!(kv.revision, last, "the revision after five puts");
        Ok(())
    }

    /// Deleting an existing key returns true and the key is gone for other
    /// handles too.
    #[case("kv::delete_existing")]
    async fn delete_existing(cx: Cx) -> CaseResult {
        let (a, c) = (cx.open().await?, cx.open().await?);
        put_value(a.as_ref(), "d", "x").await?;
        ensure_eq!(
            a.delete("d", DeleteOptions::default())
                .await
                .ctx("delete d")?,
            true,
            "delete of an existing key"
        );
        ensure_eq!(
            c.get("d").await.ctx("get d from another handle")?,
            None,
            "get of a deleted key from another handle"
        );
        Ok(())
    }

    /// A put with `if_revision` equal to the current revision succeeds and
    /// returns a larger revision.
    #[case("kv::cas_success")]
    async fn cas_success(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        let r1 = put_value(h.as_ref(), "c", "1").await?;
        let r2 = h
            .put("c", b("2"), PutOptions::if_revision(r1))
            .await
            .ctx("CAS c at its current revision")?;
        ensure!(
            r2 > r1,
            "expected the CAS to return a revision > {r1}, got {r2}"
        );
        expect_value(h.as_ref(), "c", "2", "the value after CAS").await?;
        Ok(())
    }

    /// A put with a stale `if_revision` fails with `Conflict` carrying the
    /// key's current revision, and writes nothing.
    #[case("kv::cas_conflict_reports_current")]
    async fn cas_conflict(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        let r1 = put_value(h.as_ref(), "c", "1").await?;
        let r2 = put_value(h.as_ref(), "c", "2").await?;
        let key = expect_conflict(
            h.put("c", b("3"), PutOptions::if_revision(r1)).await,
            Some(r2),
            "a stale CAS",
        )?;
        ensure!(
            key.contains('c'),
            "expected Conflict.key to name the key \"c\", got {key:?}"
        );
        ensure_eq!(
            h.get("c")
                .await
                .ctx("get c")?
                .map(|kv| (kv.value, kv.revision)),
            Some((b("2"), r2)),
            "value and revision after the failed CAS"
        );
        Ok(())
    }

    /// A put with `if_revision` on a missing key fails with
    /// `Conflict { current: None }` and creates nothing.
    #[case("kv::cas_on_missing_key_conflicts")]
    async fn cas_missing(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        expect_conflict(
            h.put("m", b("x"), PutOptions::if_revision(1)).await,
            None,
            "a CAS on a missing key",
        )?;
        ensure_eq!(
            h.get("m").await.ctx("get m")?,
            None,
            "the key after a failed CAS"
        );
        Ok(())
    }

    /// `if_absent` creates a missing key once; a second `if_absent` put fails
    /// with `Conflict` carrying the existing revision and changes nothing.
    #[case("kv::if_absent_creates_once")]
    async fn if_absent(cx: Cx) -> CaseResult {
        let (a, c) = (cx.open().await?, cx.open().await?);
        let r = a
            .put("once", b("first"), PutOptions::if_absent())
            .await
            .ctx("if_absent put on a missing key")?;
        expect_conflict(
            c.put("once", b("second"), PutOptions::if_absent()).await,
            Some(r),
            "a second if_absent put",
        )?;
        expect_value(a.as_ref(), "once", "first", "the value after the failed if_absent put")
            .await?;
        Ok(())
    }

    /// A delete with a stale `if_revision` fails with `Conflict` and keeps
    /// the key; with the current revision it deletes it.
    #[case("kv::delete_if_revision")]
    async fn delete_if_revision(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        let r1 = put_value(h.as_ref(), "d", "1").await?;
        let r2 = put_value(h.as_ref(), "d", "2").await?;
        expect_conflict(
            h.delete(
                "d",
                DeleteOptions {
                    if_revision: Some(r1),
                },
            )
            .await,
            Some(r2),
            "a delete at a stale revision",
        )?;
        ensure!(
            h.get("d").await.ctx("get d")?.is_some(),
            "expected d to survive a failed conditional delete"
        );
        ensure_eq!(
            h.delete(
                "d",
                DeleteOptions {
                    if_revision: Some(r2)
                }
            )
            .await
            .ctx("delete d at its revision")?,
            true,
            "conditional delete at the current revision"
        );
        ensure_eq!(h.get("d").await.ctx("get d")?, None, "d after deleting it");
        Ok(())
    }

    /// Delete-and-recreate never reuses a revision (ABA): each incarnation
    /// of a key, even with the same value, gets a larger revision, and a CAS
    /// against an earlier incarnation's revision fails.
    #[case("kv::delete_recreate_never_reuses_revision")]
    async fn aba(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        let first = put_value(h.as_ref(), "aba", "same").await?;
        let mut last = first;
        for i in 0..3 {
            h.delete("aba", DeleteOptions::default())
                .await
                .ctx("delete aba")?;
            let r = h
                .put("aba", b("same"), PutOptions::default())
                .await
                .ctx("recreate aba")?;
            ensure!(r > last, "expected incarnation {} of aba to get a revision > {last}, got {r} (revision reused after delete)", i + 2);
            last = r;
        }
        expect_err!(
            h.put("aba", b("stale"), PutOptions::if_revision(first))
                .await,
            Error::Conflict { .. },
            "a CAS against the first incarnation's revision {first}"
        );
        ensure_eq!(
            h.get("aba").await.ctx("get aba")?.map(|kv| kv.revision),
            Some(last),
            "aba's revision"
        );
        Ok(())
    }

    /// `list` of an arbitrary string prefix (not `/`-aligned) returns exactly
    /// the keys starting with it, in key order, whatever the write order.
    #[case("kv::list_arbitrary_prefix_in_key_order")]
    async fn list_prefix(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        for k in ["apps", "app/x", "b", "ap", "apple", "app", "app/a/b", "aq"] {
            put_value(h.as_ref(), k, k).await?;
        }
        let got = h
            .list("app", ListOptions::default())
            .await
            .ctx("list app")?;
        ensure_eq!(
            keys_of(&got),
            vec!["app", "app/a/b", "app/x", "apple", "apps"],
            "keys listed under \"app\""
        );
        for kv in &got {
            ensure_eq!(kv.value, b(&kv.key), "the value listed for {}", kv.key);
        }
        let got = h.list("ap", ListOptions::default()).await.ctx("list ap")?;
        ensure_eq!(
            keys_of(&got),
            vec!["ap", "app", "app/a/b", "app/x", "apple", "apps"],
            "keys listed under \"ap\""
        );
        Ok(())
    }

    /// `list` with a limit returns the first keys in key order.
    #[case("kv::list_limit")]
    async fn list_limit(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        for k in ["p/d", "p/a", "p/c", "p/b", "q"] {
            put_value(h.as_ref(), k, "v").await?;
        }
        let got = h
            .list(
                "p/",
                ListOptions {
                    limit: Some(2),
                    keys_only: false,
                },
            )
            .await
            .ctx("list p/ limit 2")?;
        ensure_eq!(keys_of(&got), vec!["p/a", "p/b"], "list p/ with limit 2");
        let got = h
            .list(
                "p/",
                ListOptions {
                    limit: Some(10),
                    keys_only: false,
                },
            )
            .await
            .ctx("list p/ limit 10")?;
        ensure_eq!(
            keys_of(&got),
            vec!["p/a", "p/b", "p/c", "p/d"],
            "list p/ with limit 10"
        );
        Ok(())
    }

    /// `keys_only` listings carry keys and revisions but empty values.
    #[case("kv::list_keys_only")]
    async fn list_keys_only(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        let r = put_value(h.as_ref(), "ko/1", "value").await?;
        let got = h
            .list(
                "ko/",
                ListOptions {
                    limit: None,
                    keys_only: true,
                },
            )
            .await
            .ctx("list ko/ keys_only")?;
        ensure_eq!(got.len(), 1, "number of keys listed");
        ensure_eq!(got[0].key, "ko/1", "listed key");
        ensure_eq!(got[0].revision, r, "listed revision");
        ensure!(
            got[0].value.is_empty(),
            "expected an empty value in a keys_only listing, got {:?}",
            got[0].value
        );
        Ok(())
    }

    /// `list` of a prefix nothing starts with is empty (not an error), and
    /// `list("")` returns every key of the namespace.
    #[case("kv::list_missing_and_empty_prefix")]
    async fn list_missing(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        ensure_eq!(
            h.list("none/", ListOptions::default())
                .await
                .ctx("list none/")?
                .len(),
            0,
            "keys under a prefix nothing has"
        );
        for k in ["z", "a", "m/n"] {
            put_value(h.as_ref(), k, "v").await?;
        }
        ensure_eq!(
            all_keys(h.as_ref()).await?,
            vec!["a", "m/n", "z"],
            "list(\"\") of the namespace"
        );
        Ok(())
    }

    /// Keys with `/` (leading, trailing, doubled), spaces, unicode, dots,
    /// `%`, `*` and 512 bytes round-trip exactly, are distinct, and list back
    /// exactly.
    #[case("kv::odd_keys_round_trip")]
    async fn odd_keys(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        let long = "k".repeat(512);
        let mut keys: Vec<String> = [
            "/",
            "/lead",
            "trail/",
            "/both/",
            "a//b",
            "a/b",
            "with space",
            " pad ",
            "ünïcödé/✓/日本",
            ".",
            "..",
            "./x",
            "%2F",
            "a%b",
            "*",
            "?q=1&r",
            "#frag",
            "back\\slash",
            "\"quoted\"",
            "emoji🔒",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        keys.push(long);
        for (i, k) in keys.iter().enumerate() {
            h.put(k, b(&i.to_string()), PutOptions::default())
                .await
                .ctx(format!("put {k:?}"))?;
        }
        for (i, k) in keys.iter().enumerate() {
            let kv = h
                .get(k)
                .await
                .ctx(format!("get {k:?}"))?
                .ok_or_else(|| Fail(format!("expected key {k:?} to exist")))?;
            ensure_eq!(kv.key, *k, "the key returned by get {k:?}");
            ensure_eq!(kv.value, b(&i.to_string()), "the value of {k:?}");
        }
        let mut sorted = keys.clone();
        sorted.sort();
        ensure_eq!(
            all_keys(h.as_ref()).await?,
            sorted,
            "list(\"\") of the odd keys, in key order"
        );
        Ok(())
    }

    /// Two namespaces never see each other's keys: get, list, delete and
    /// if_absent in one ignore the same key in the other.
    #[case("kv::namespace_isolation")]
    async fn namespace_isolation(cx: Cx) -> CaseResult {
        let a = cx.open().await?;
        let o = cx.open_other("other").await?;
        a.put("shared", b("in-a"), PutOptions::default())
            .await
            .ctx("put shared in ns a")?;
        ensure_eq!(
            o.get("shared").await.ctx("get in ns b")?,
            None,
            "a key of namespace a seen from namespace b"
        );
        ensure_eq!(
            o.list("", ListOptions::default())
                .await
                .ctx("list in ns b")?
                .len(),
            0,
            "keys listed in the empty namespace b"
        );
        o.put("shared", b("in-b"), PutOptions::if_absent())
            .await
            .ctx("if_absent put in ns b (the key exists only in a)")?;
        ensure_eq!(
            o.delete("shared", DeleteOptions::default())
                .await
                .ctx("delete in b")?,
            true,
            "delete in b"
        );
        ensure_eq!(
            a.get("shared").await.ctx("get in a")?.map(|kv| kv.value),
            Some(b("in-a")),
            "namespace a's value after b wrote and deleted the same key"
        );
        Ok(())
    }

    /// Two handles of one namespace act like two clients of one server:
    /// a write acknowledged to one is read by the other.
    #[case("kv::handles_share_namespace", gate = gates::linearizable_reads)]
    async fn handles_share(cx: Cx) -> CaseResult {
        let (a, c) = (cx.open().await?, cx.open().await?);
        for i in 0..10 {
            let r = a
                .put("s", b(&i.to_string()), PutOptions::default())
                .await
                .ctx("put s")?;
            let kv = c.get("s").await.ctx("get s from the other handle")?;
            ensure_eq!(
                kv.map(|kv| (kv.value, kv.revision)),
                Some((b(&i.to_string()), r)),
                "the other handle's read after write {i}"
            );
        }
        Ok(())
    }

    /// Where revisions come from one global sequence, writes to different
    /// keys get strictly increasing revisions in the order they happen.
    #[case("kv::global_revision_across_keys", gate = gates::global_revision)]
    async fn global_revision(cx: Cx) -> CaseResult {
        let (a, c) = (cx.open().await?, cx.open().await?);
        let mut last = 0;
        for i in 0..10 {
            let h = if i % 2 == 0 { &a } else { &c };
            let r = h
                .put(&format!("g{i}"), b("v"), PutOptions::default())
                .await
                .ctx("put")?;
            ensure!(
                r > last,
                "expected write {i} (key g{i}) to get a revision > {last}, got {r}"
            );
            last = r;
        }
        Ok(())
    }

    /// 5 clients × 10 increments of one counter with get + CAS (retrying on
    /// `Conflict`) end at exactly 50: no lost update.
    #[case("kv::concurrent_cas_counter")]
    async fn cas_counter(cx: Cx) -> CaseResult {
        let handles = cx.open_n(5).await?;
        let mut tasks = Vec::new();
        for h in handles.clone() {
            tasks.push(tokio::spawn(async move {
                let mut done = 0;
                while done < 10 {
                    let cur = h.get("counter").await?;
                    let (n, opts) = match cur {
                        None => (0, PutOptions::if_absent()),
                        Some(kv) => (
                            parse_num::<u64>(&kv.value).unwrap_or(u64::MAX),
                            PutOptions::if_revision(kv.revision),
                        ),
                    };
                    match h.put("counter", b(&(n + 1).to_string()), opts).await {
                        Ok(_) => done += 1,
                        Err(Error::Conflict { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }));
        }
        for t in tasks {
            t.await
                .joined("a worker")?
                .ctx("a CAS worker")?;
        }
        let v = value_of(handles[0].as_ref(), "counter").await?;
        ensure_eq!(v, Some(b("50")), "the counter after 5×10 CAS increments");
        Ok(())
    }

    /// 4 clients × 200 random get/put/CAS ops on 3 keys form a linearizable
    /// history (checked per key by the Wing–Gong–Lowe checker). Without
    /// `linearizable_reads` the workload has no gets (writes must still be
    /// linearizable).
    #[case("kv::linearizable_history")]
    async fn linearizable(cx: Cx) -> CaseResult {
        let handles = cx.open_n(4).await?;
        let reads = cx.caps().linearizable_reads;
        let seed: u64 = rand::random();
        let clock = Clock::new();
        let mut tasks = Vec::new();
        for (client, h) in handles.into_iter().enumerate() {
            let seed = seed.wrapping_add(client as u64);
            tasks.push(tokio::spawn(register_client(client, h, seed, reads, clock)));
        }
        let mut history = Vec::new();
        for t in tasks {
            history.extend(
                t.await
                    .joined("a client")?,
            );
        }
        let n = history.len();
        let verdict = tokio::task::spawn_blocking(move || check_kv(&history))
            .await
            .joined("the checker")?;
        ensure!(
            verdict == Verdict::Linearizable,
            "expected the history of {n} ops (seed {seed}) to be linearizable: {verdict}"
        );
        Ok(())
    }
}

/// One client of the linearizability workload; returns its recorded ops.
async fn register_client(
    client: usize,
    h: Arc<dyn latchkey_core::Backend>,
    seed: u64,
    reads: bool,
    clock: Clock,
) -> Vec<KvOperation> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let keys = ["r0", "r1", "r2"];
    let mut seen = [1u64; 3];
    let mut out = Vec::new();
    for seq in 0..200 {
        let k = rng.random_range(0..3);
        let key = keys[k];
        let kind = if reads {
            rng.random_range(0..3)
        } else {
            rng.random_range(1..3)
        };
        let value = Bytes::from(format!("c{client}-{seq}"));
        let call = clock.now();
        let (input, result) = match kind {
            0 => (
                KvInput::Get,
                h.get(key)
                    .await
                    .map(|kv| KvOutput::Got(kv.map(|kv| (kv.value, kv.revision)))),
            ),
            1 => (
                KvInput::Put {
                    value: value.clone(),
                },
                h.put(key, value, PutOptions::default())
                    .await
                    .map(KvOutput::Written),
            ),
            _ => {
                let expected = seen[k];
                let r = match h
                    .put(key, value.clone(), PutOptions::if_revision(expected))
                    .await
                {
                    Ok(r) => Ok(KvOutput::Written(r)),
                    Err(Error::Conflict { current, .. }) => Ok(KvOutput::Conflict(current)),
                    Err(e) => Err(e),
                };
                (KvInput::Cas { expected, value }, r)
            }
        };
        let ret = clock.now();
        match result {
            Ok(output) => {
                match &output {
                    KvOutput::Got(Some((_, r)))
                    | KvOutput::Written(r)
                    | KvOutput::Conflict(Some(r)) => seen[k] = *r,
                    _ => {}
                }
                out.push(KvOperation {
                    key: key.into(),
                    op: Operation::completed(client, input, call, output, ret),
                });
            }
            // A failed read changed nothing: leave it out.
            Err(_) if matches!(input, KvInput::Get) => {}
            // A write whose outcome is unknown stays pending to the end, and
            // its client is retired (it never issues another op).
            Err(_) => {
                out.push(KvOperation {
                    key: key.into(),
                    op: Operation::indeterminate(client, input, call),
                });
                break;
            }
        }
    }
    out
}
