//! Redis-specific behaviour against real `redis-server` processes: server
//! restarts, credentials, unreachable and frozen servers, script cache
//! flushes, TLS, interop with plain `SET NX PX` locks, the round-trip cost
//! of a lock, and many locks over few connections.
//!
//! Tests that change a server (restart, `SCRIPT FLUSH`, counting commands)
//! spawn their own with `latchkey_testkit::spawn_redis`; the others share
//! the testkit's server (or `LATCHKEY_TEST_REDIS_URL`).

use bytes::Bytes;
use latchkey_core::{
    BackendUrl, Compare, DistributedLock, Error, KvStore, LockOptions, Op, PutOptions, Txn,
    TxnRequest,
};
use latchkey_redis::RedisBackend;
use latchkey_testkit::{spawn_redis, unique_namespace, RedisOptions, TlsFiles};
use std::future::Future;
use std::time::{Duration, Instant};

fn url(base: &str, params: &str) -> BackendUrl {
    let sep = if base.contains('?') { '&' } else { '?' };
    BackendUrl::parse(&format!("{base}{sep}{params}")).expect("test URL")
}

async fn open(base: &str, ns: &str) -> RedisBackend {
    RedisBackend::connect(&url(base, &format!("namespace={ns}")))
        .await
        .expect("connect")
}

async fn raw(base: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(base)
        .expect("raw client")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection")
}

fn shared_url() -> String {
    latchkey_testkit::redis().url().to_string()
}

/// Polls `f` until it returns `Some`, failing after `limit`.
async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_recovers_and_fires_lost_for_vanished_locks() {
    let server = spawn_redis(RedisOptions::default()).expect("spawn redis");
    let h = open(server.url(), "restart").await;
    h.put("k", Bytes::from("before"), PutOptions::default())
        .await
        .unwrap();
    let guard = h
        .lock("job", LockOptions::ttl(Duration::from_millis(900)))
        .await
        .unwrap();
    let lost = guard.lost();
    // A waiter of another handle, subscribed to the release channel.
    let w = open(server.url(), "restart").await;
    let waiter = tokio::spawn(async move {
        let g = w
            .lock("job", LockOptions::ttl(Duration::from_secs(30)))
            .await;
        (g, w)
    });
    eventually(
        Duration::from_secs(2),
        "the waiter to subscribe",
        || async {
            let mut con = raw(server.url()).await;
            let n: u64 = redis::cmd("PUBSUB")
                .arg("NUMPAT")
                .query_async(&mut con)
                .await
                .unwrap();
            let chans: Vec<String> = redis::cmd("PUBSUB")
                .arg("CHANNELS")
                .query_async(&mut con)
                .await
                .unwrap();
            (n == 0 && chans.len() == 1).then_some(())
        },
    )
    .await;

    // No persistence: the restart wipes the lock key (and everything else).
    server.restart().expect("restart");

    // The waiter's pub/sub connection died with the server: it reconnects,
    // tries again and gets the lock whose key vanished.
    let (g, _w) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter recovers after the restart")
        .unwrap();
    let g = g.expect("the waiter gets the vanished lock");
    g.release().await.unwrap();

    // lost() fires when the next renewal finds the key gone (renewal runs
    // every TTL/3; the deadline is one TTL after the last success).
    tokio::time::timeout(Duration::from_secs(3), lost)
        .await
        .expect("lost() fires after the lock key vanished");

    // Another handle finds the lock free at once (its key is gone).
    let other = open(server.url(), "restart").await;
    let g2 = other
        .try_lock("job", LockOptions::ttl(Duration::from_secs(5)))
        .await
        .unwrap()
        .expect("the vanished lock is free");
    g2.release().await.unwrap();

    // The handle reconnects by itself: a write may fail once (its
    // connection died under it), then works.
    let rev = eventually(
        Duration::from_secs(5),
        "a put after the restart",
        || async {
            h.put("k", Bytes::from("after"), PutOptions::default())
                .await
                .ok()
        },
    )
    .await;
    assert!(rev >= 1);
    let kv = h
        .get("k")
        .await
        .unwrap()
        .expect("key written after restart");
    assert_eq!(kv.value, Bytes::from("after"));
    // Releasing the lost guard is Ok and frees the handle's local queue:
    // the handle can take the lock again.
    guard.release().await.unwrap();
    let g3 = h
        .try_lock("job", LockOptions::ttl(Duration::from_secs(5)))
        .await
        .unwrap()
        .expect("free after the lost guard was released");
    g3.release().await.unwrap();
}

#[tokio::test]
async fn wrong_password_is_auth() {
    let server = spawn_redis(RedisOptions::default()).expect("spawn redis");
    // Credentials are set after start-up, so the testkit's readiness PING
    // needs none.
    let mut con = raw(server.url()).await;
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "alice", "on", ">alicepw", "~*", "&*", "+@all"])
        .query_async(&mut con)
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "requirepass", "s3cret"])
        .query_async(&mut con)
        .await
        .unwrap();
    let base = server.url().trim_start_matches("redis://").to_string();
    for bad in [
        format!("redis://:wrong@{base}"),
        format!("redis://alice:wrong@{base}"),
        format!("redis://nobody:s3cret@{base}"),
    ] {
        let err = RedisBackend::connect(&BackendUrl::parse(&bad).unwrap())
            .await
            .expect_err("wrong credentials must be refused");
        assert!(matches!(err, Error::Auth { .. }), "{bad}: {err:?}");
        let text = format!("{err} {err:?}");
        assert!(!text.contains("wrong"), "the password leaked: {text}");
    }
    // No password at all on a server that requires one: Auth too.
    let err = RedisBackend::connect(&BackendUrl::parse(&format!("redis://{base}")).unwrap())
        .await
        .expect_err("no credentials");
    assert!(matches!(err, Error::Auth { .. }), "{err:?}");
    // The right ones work, for the default user and for an ACL user.
    for good in [
        format!("redis://:s3cret@{base}"),
        format!("redis://alice:alicepw@{base}"),
    ] {
        let h = RedisBackend::connect(&BackendUrl::parse(&good).unwrap())
            .await
            .expect("right credentials");
        h.put("k", Bytes::from("v"), PutOptions::default())
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn unreachable_port_is_unavailable_within_the_timeout() {
    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let t = Instant::now();
    let err = RedisBackend::connect(&url(&format!("redis://127.0.0.1:{port}"), "timeout=500ms"))
        .await
        .expect_err("nothing listens there");
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    // A server that accepts connections but never answers (a frozen host).
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let t = Instant::now();
    let err = RedisBackend::connect(&url(&format!("redis://{addr}"), "timeout=500ms"))
        .await
        .expect_err("a silent server");
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_server_gives_unavailable_then_recovers() {
    let server = spawn_redis(RedisOptions::default()).expect("spawn redis");
    let h = RedisBackend::connect(&url(server.url(), "namespace=frozen&timeout=400ms"))
        .await
        .unwrap();
    h.put("k", Bytes::from("v"), PutOptions::default())
        .await
        .unwrap();
    server.pause().expect("SIGSTOP");
    let t = Instant::now();
    let err = h.get("k").await.expect_err("the server is frozen");
    let took = t.elapsed();
    server.resume().expect("SIGCONT");
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
    let kv = eventually(Duration::from_secs(5), "a read after SIGCONT", || async {
        h.get("k").await.ok().flatten()
    })
    .await;
    assert_eq!(kv.value, Bytes::from("v"));
}

#[tokio::test]
async fn script_flush_is_recovered_from() {
    let server = spawn_redis(RedisOptions::default()).expect("spawn redis");
    let h = open(server.url(), "flush").await;
    let mut con = raw(server.url()).await;
    let r1 = h
        .put("k", Bytes::from("1"), PutOptions::default())
        .await
        .unwrap();
    let g = h
        .lock("l", LockOptions::ttl(Duration::from_secs(5)))
        .await
        .unwrap();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut con)
        .await
        .unwrap();
    // Every script is gone from the server; each call reloads its own.
    let r2 = h
        .put("k", Bytes::from("2"), PutOptions::if_revision(r1))
        .await
        .expect("put after SCRIPT FLUSH");
    assert!(r2 > r1);
    g.release().await.expect("release after SCRIPT FLUSH");
    let out = h
        .txn(
            TxnRequest::new()
                .when([Compare::revision("k", latchkey_core::CmpOp::Equal, r2)])
                .then([Op::get("k")]),
        )
        .await
        .expect("txn after SCRIPT FLUSH");
    assert!(out.succeeded);
    assert_eq!(h.list("", Default::default()).await.unwrap().len(), 1);
}

#[tokio::test]
async fn plain_set_nx_px_locks_interoperate() {
    let base = shared_url();
    let ns = unique_namespace("interop");
    let h = open(&base, &ns).await;
    let mut con = raw(&base).await;
    let key = h.lock_key("x");
    assert_eq!(key, format!("latchkey:{{{ns}}}:lock:x"));

    // A redsync / redis-py style lock on the key excludes ours...
    let set: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg("foreign-token")
        .arg("NX")
        .arg("PX")
        .arg(400)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(set.as_deref(), Some("OK"));
    let opts = LockOptions::ttl(Duration::from_secs(5));
    assert!(h.try_lock("x", opts.clone()).await.unwrap().is_none());
    // ...and when it expires (its release publishes nothing), our waiter
    // gets the lock within its PTTL bound.
    let t = Instant::now();
    let g = h
        .lock("x", opts.clone().with_wait(Duration::from_secs(3)))
        .await
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    // Ours excludes theirs, and holds our owner id, as SET NX PX would.
    let set: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg("foreign-token")
        .arg("NX")
        .arg("PX")
        .arg(400)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(set, None, "SET NX must fail while we hold the lock");
    let owner: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(owner, g.entry().id);
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(pttl > 0 && pttl <= 5000, "{pttl}");
    // The token comes from the separate counter key.
    let fence: u64 = redis::cmd("GET")
        .arg(h.fence_key("x"))
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(fence, g.fencing_token());
    g.release().await.unwrap();
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(exists, 0);
}

/// `calls=` per command from `INFO commandstats` (the INFO calls excluded).
async fn command_calls(
    con: &mut redis::aio::MultiplexedConnection,
) -> std::collections::BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(con)
        .await
        .unwrap();
    info.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("cmdstat_")?;
            let (name, stats) = rest.split_once(':')?;
            let calls = stats
                .split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            (name != "info").then(|| (name.to_string(), calls))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncontended_lock_and_release_cost_two_round_trips() {
    use futures::StreamExt;
    let server = spawn_redis(RedisOptions::default()).expect("spawn redis");
    let h = open(server.url(), "rtt").await;
    let mut con = raw(server.url()).await;
    let opts = LockOptions::ttl(Duration::from_secs(30));
    // Warm up: the scripts get loaded once per server.
    h.lock("warm", opts.clone())
        .await
        .unwrap()
        .release()
        .await
        .unwrap();

    // MONITOR shows each command a client sent, and separately (as
    // "[0 lua]") the commands a script ran.
    let monitor = redis::Client::open(server.url())
        .unwrap()
        .get_async_monitor()
        .await
        .unwrap();
    let mut lines = monitor.into_on_message::<String>();
    let before = command_calls(&mut con).await;
    let _: String = redis::cmd("ECHO")
        .arg("mark-start")
        .query_async(&mut con)
        .await
        .unwrap();
    let g = h.lock("job", opts.clone()).await.unwrap();
    g.release().await.unwrap();
    let _: String = redis::cmd("ECHO")
        .arg("mark-end")
        .query_async(&mut con)
        .await
        .unwrap();
    let after = command_calls(&mut con).await;

    // INFO commandstats: two EVALSHA, and every other command that ran was
    // run inside those scripts (no GET/SET/PUBLISH of their own, no
    // SCRIPT LOAD, no SUBSCRIBE).
    let delta: std::collections::BTreeMap<String, u64> = after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(k, v)| *v > 0 && k != "echo")
        .collect();
    assert_eq!(delta.get("evalsha"), Some(&2), "{delta:?}");
    let in_scripts = [
        "evalsha",
        "time",
        "zrangebyscore",
        "zrange",
        "zrem",
        "set",
        "incr",
        "get",
        "del",
    ];
    assert!(
        delta.keys().all(|k| in_scripts.contains(&k.as_str())),
        "unexpected commands: {delta:?}"
    );

    // MONITOR: exactly two commands from a client between the marks.
    let mut sent = Vec::new();
    let mut started = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(Some(line)) = tokio::time::timeout_at(deadline, lines.next()).await {
        if line.contains("\"mark-start\"") {
            started = true;
        } else if line.contains("\"mark-end\"") {
            break;
        } else if started && !line.contains(" lua]") {
            sent.push(line);
        }
    }
    assert!(started, "MONITOR did not see the start mark");
    assert_eq!(sent.len(), 2, "round trips of lock + release: {sent:#?}");
    assert!(
        sent.iter()
            .all(|l| l.to_ascii_lowercase().contains("\"evalsha\"")),
        "{sent:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_locks_few_connections_one_renewal_call_per_tick() {
    use futures::StreamExt;
    let server = spawn_redis(RedisOptions::default()).expect("spawn redis");
    let h = open(server.url(), "many").await;
    let mut con = raw(server.url()).await;
    // Long enough that a loaded 2-core machine renews in time (taking
    // 10,000 locks costs core's per-handle bookkeeping O(n) per lock).
    let ttl = Duration::from_secs(6);
    let n = 10_000;
    let t = Instant::now();
    // Taken 32 at a time: the requests share (pipeline on) the one
    // command connection.
    let guards: Vec<_> = futures::stream::iter(0..n)
        .map(|i| {
            let h = &h;
            async move {
                h.try_lock(&format!("lock-{i}"), LockOptions::ttl(ttl))
                    .await
                    .unwrap()
                    .expect("free lock")
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    eprintln!("took {n} locks in {:?}", t.elapsed());
    let before = command_calls(&mut con).await;
    let t = Instant::now();
    // Hold for 3/4 TTL: every lock must be renewed at least twice (ticks
    // come every TTL/3).
    tokio::time::sleep(ttl * 3 / 4).await;
    let held_for = t.elapsed();
    let after = command_calls(&mut con).await;
    let lost: Vec<usize> = (0..guards.len()).filter(|i| guards[*i].is_lost()).collect();
    assert!(
        lost.is_empty(),
        "{} locks were lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    let evalsha =
        after.get("evalsha").copied().unwrap_or(0) - before.get("evalsha").copied().unwrap_or(0);
    // One renewal script per tick (TTL/3) for all the locks: two or three
    // calls, not 10,000 × 2.
    let ticks = (held_for.as_millis() / (ttl.as_millis() / 3)) as u64;
    assert!(
        evalsha >= 2 && evalsha <= ticks + 2,
        "{evalsha} renewal calls in {ticks} ticks"
    );
    let pexpire =
        after.get("pexpire").copied().unwrap_or(0) - before.get("pexpire").copied().unwrap_or(0);
    assert!(pexpire >= n * 2, "renewed {pexpire} keys");
    // Connections: the raw one and the handle's command connection.
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(clients.lines().count(), 2, "{clients}");
    let t = Instant::now();
    for g in &guards {
        g.release().await.unwrap();
    }
    eprintln!("released {n} locks in {:?}", t.elapsed());
}

#[tokio::test]
async fn cancelled_waiter_leaves_no_subscription() {
    let base = shared_url();
    let ns = unique_namespace("cancel");
    let a = open(&base, &ns).await;
    let b = open(&base, &ns).await;
    let mut con = raw(&base).await;
    let opts = LockOptions::ttl(Duration::from_secs(10));
    let g = a.lock("x", opts.clone()).await.unwrap();
    // Each waiter listens on a channel of its own under this prefix.
    let pattern = format!("latchkey:{{{ns}}}:released:x:*");
    let numsub = |con: &mut redis::aio::MultiplexedConnection| {
        let mut con = con.clone();
        let pattern = pattern.clone();
        async move {
            let chans: Vec<String> = redis::cmd("PUBSUB")
                .arg("CHANNELS")
                .arg(&pattern)
                .query_async(&mut con)
                .await
                .unwrap();
            chans.len()
        }
    };
    let err = b
        .lock("x", opts.clone().with_wait(Duration::from_millis(300)))
        .await
        .expect_err("held by a");
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert_eq!(b.waiting_channels(), 0);
    eventually(Duration::from_secs(1), "the unsubscribe", || {
        let f = numsub(&mut con);
        async move { (f.await == 0).then_some(()) }
    })
    .await;
    // A waiter is woken by the release (not by its TTL bound of 10 s).
    let waiter = tokio::spawn(async move {
        let t = Instant::now();
        let g2 = b.lock("x", LockOptions::ttl(Duration::from_secs(10))).await;
        (g2, t.elapsed(), b)
    });
    eventually(Duration::from_secs(2), "the waiter's subscription", || {
        let f = numsub(&mut con);
        async move { (f.await == 1).then_some(()) }
    })
    .await;
    g.release().await.unwrap();
    let (g2, waited, b) = waiter.await.unwrap();
    let g2 = g2.expect("the waiter gets the lock");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    g2.release().await.unwrap();
    assert_eq!(b.waiting_channels(), 0);
}

// ------------------------------------------------------------------ TLS

struct Pki {
    dir: std::path::PathBuf,
    files: TlsFiles,
    other_ca: std::path::PathBuf,
}

fn make_pki(tag: &str) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let dir = std::env::temp_dir().join(format!("latchkey-redis-tls-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = |name: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        (cert, Issuer::new(p, key))
    };
    let (ca_cert, issuer) = ca("latchkey test CA");
    let (other_cert, _) = ca("some other CA");
    let mut sp =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    sp.distinguished_name
        .push(DnType::CommonName, "redis test server");
    let skey = KeyPair::generate().unwrap();
    let scert = sp.signed_by(&skey, &issuer).unwrap();
    let w = |name: &str, pem: String| {
        let p = dir.join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    Pki {
        files: TlsFiles {
            cert: w("server.pem", scert.pem()),
            key: w("server.key", skey.serialize_pem()),
            ca: w("ca.pem", ca_cert.pem()),
        },
        other_ca: w("other-ca.pem", other_cert.pem()),
        dir,
    }
}

#[tokio::test]
async fn rediss_with_a_test_ca_and_untrusted_certificates_refused() {
    let pki = make_pki("a");
    let server = spawn_redis(RedisOptions {
        tls: Some(pki.files.clone()),
        ..Default::default()
    })
    .expect("spawn a TLS redis-server");
    assert!(server.url().starts_with("rediss://"), "{}", server.url());
    let ca = pki.files.ca.display().to_string();
    let h = RedisBackend::connect(&url(server.url(), &format!("namespace=tls&ca={ca}")))
        .await
        .expect("TLS with the test CA");
    let r = h
        .put("k", Bytes::from("over tls"), PutOptions::default())
        .await
        .unwrap();
    assert_eq!(h.get("k").await.unwrap().unwrap().revision, r);
    let g = h
        .lock("l", LockOptions::ttl(Duration::from_secs(5)))
        .await
        .unwrap();
    g.release().await.unwrap();

    // A certificate from a CA we do not trust: the system roots, or
    // another CA.
    for params in [
        "timeout=2s".to_string(),
        format!("ca={}", pki.other_ca.display()),
    ] {
        let err = RedisBackend::connect(&url(server.url(), &params))
            .await
            .expect_err("an untrusted certificate must be refused");
        let text = err.to_string();
        assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
        assert!(text.contains("certificate"), "not a clear error: {text}");
    }
    // Plain redis:// to a TLS port fails too (no silent downgrade).
    let plain = server.url().replacen("rediss://", "redis://", 1);
    assert!(RedisBackend::connect(&url(&plain, "timeout=1s"))
        .await
        .is_err());
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[tokio::test]
async fn bad_urls_are_invalid_url() {
    for bad in [
        "redis://h1:1,h2:2",
        "redis://h:1/notadb",
        "redis://h:1?timeout=soon",
        "redis://h:1?history=0",
        "redis://h:1?bogus=1",
        "redis://h:1?ca=/x.pem",
        "rediss://h:1?ca=/nonexistent/ca.pem",
        "etcd://h:1",
        "redis://",
    ] {
        let err = RedisBackend::connect(&BackendUrl::parse(bad).unwrap())
            .await
            .expect_err(bad);
        assert!(matches!(err, Error::InvalidUrl { .. }), "{bad}: {err:?}");
    }
}

// ---------------------------------------------------------------- watch

#[tokio::test]
async fn watch_history_is_bounded_and_compaction_is_reported() {
    use futures::StreamExt;
    let base = shared_url();
    let ns = unique_namespace("compact");
    // `MAXLEN ~ 5` trims whole stream nodes (100 entries each by default),
    // so write a few hundred.
    let h = RedisBackend::connect(&url(&base, &format!("namespace={ns}&history=5")))
        .await
        .unwrap();
    let mut lagging = h.watch("k", None).await.unwrap();
    let first = h
        .put("k0", Bytes::from("0"), PutOptions::default())
        .await
        .unwrap();
    for i in 1..400 {
        h.put(&format!("k{i}"), Bytes::from("x"), PutOptions::default())
            .await
            .unwrap();
    }
    // Resuming from a trimmed revision is Compacted, naming the oldest
    // revision still there...
    let oldest = match h.watch("", Some(first)).await {
        Err(Error::Compacted { oldest }) => oldest,
        Err(e) => panic!("expected Compacted, got {e:?}"),
        Ok(_) => panic!("expected Compacted, got a stream"),
    };
    assert!(oldest > first && oldest <= first + 399, "{oldest}");
    // ...from which a watch replays.
    let mut w = h.watch("", Some(oldest)).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.revision, oldest);
    // A watcher that fell behind the trimming learns it: its next item is
    // Compacted, never a silent gap.
    let item = tokio::time::timeout(Duration::from_secs(5), lagging.next())
        .await
        .unwrap()
        .expect("an item");
    assert!(matches!(item, Err(Error::Compacted { .. })), "{item:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_survives_a_dropped_connection_and_reports_lost_history() {
    use futures::StreamExt;
    let server = spawn_redis(RedisOptions::default()).expect("spawn redis");
    let h = open(server.url(), "w").await;
    let mut con = raw(server.url()).await;
    let mut w = h.watch("", None).await.unwrap();
    let r1 = h
        .put("a", Bytes::from("1"), PutOptions::default())
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.revision, r1);
    // Kill the watch's connection (not the server): the watch reconnects
    // and resumes where it was, missing nothing.
    let _: () = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
        .query_async(&mut con)
        .await
        .unwrap();
    let r2 = eventually(
        Duration::from_secs(5),
        "a put after CLIENT KILL",
        || async {
            h.put("b", Bytes::from("2"), PutOptions::default())
                .await
                .ok()
        },
    )
    .await;
    let ev = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((ev.key.as_str(), ev.revision), ("b", r2));
    // A restart without persistence loses the history the watch stands on:
    // the watch ends with Compacted instead of waiting forever.
    server.restart().expect("restart");
    let item = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("the watch notices the lost history")
        .expect("an item");
    assert!(matches!(item, Err(Error::Compacted { .. })), "{item:?}");
}

#[tokio::test]
async fn expired_keys_leave_the_index() {
    let base = shared_url();
    let ns = unique_namespace("expiry");
    let h = open(&base, &ns).await;
    let mut con = raw(&base).await;
    h.put("keep", Bytes::from("1"), PutOptions::default())
        .await
        .unwrap();
    for i in 0..10 {
        h.put(
            &format!("gone{i}"),
            Bytes::from("x"),
            PutOptions::ttl(Duration::from_millis(50)),
        )
        .await
        .unwrap();
    }
    let idx = format!("latchkey:{{{ns}}}:idx");
    eventually(Duration::from_secs(3), "the TTL keys to expire", || async {
        h.get("gone9").await.unwrap().is_none().then_some(())
    })
    .await;
    let keys: Vec<String> = h
        .list("", Default::default())
        .await
        .unwrap()
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, ["keep"]);
    // The listing dropped the stale index entries.
    let n: u64 = redis::cmd("ZCARD")
        .arg(&idx)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(n, 1);
    // The hash of a TTL key carries a native expiry.
    h.put(
        "t",
        Bytes::from("x"),
        PutOptions::ttl(Duration::from_secs(30)),
    )
    .await
    .unwrap();
    let pttl: i64 = redis::cmd("PTTL")
        .arg(h.kv_key("t"))
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(pttl > 29_000 && pttl <= 30_000, "{pttl}");
    assert_eq!(
        h.get("t").await.unwrap().unwrap().lease_ttl,
        Some(Duration::from_secs(30))
    );
}

#[tokio::test]
async fn expiry_without_a_watch_is_reported_by_the_next_watch() {
    use futures::StreamExt;
    let base = shared_url();
    let ns = unique_namespace("sweep");
    let h = open(&base, &ns).await;
    let r = h
        .put(
            "k",
            Bytes::from("v"),
            PutOptions::ttl(Duration::from_millis(30)),
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(3), "the key to expire", || async {
        h.get("k").await.unwrap().is_none().then_some(())
    })
    .await;
    // Nobody watched when it expired: a watch resuming from its put sees
    // the put, then the expiry as a delete at a later revision.
    let mut w = h.watch("", Some(r)).await.unwrap();
    let put = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((put.kind, put.revision), (latchkey_core::EventKind::Put, r));
    let del = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(del.kind, latchkey_core::EventKind::Delete);
    assert_eq!(del.key, "k");
    assert!(del.revision > r);
    // Exactly once: another watch from the start sees the same two events.
    let mut again = h.watch("", Some(r)).await.unwrap();
    let a = again.next().await.unwrap().unwrap();
    let b = again.next().await.unwrap().unwrap();
    assert_eq!((a.revision, b.revision), (r, del.revision));
    h.put("z", Bytes::from("1"), PutOptions::default())
        .await
        .unwrap();
    let c = again.next().await.unwrap().unwrap();
    assert_eq!(c.key, "z");
}

// ------------------------------------------------------------ FIFO queue

async fn zcard(con: &mut redis::aio::MultiplexedConnection, key: &str) -> u64 {
    redis::cmd("ZCARD").arg(key).query_async(con).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_wakes_only_the_head_waiter() {
    let base = shared_url();
    let ns = unique_namespace("herd");
    let mut con = raw(&base).await;
    let queue = format!("latchkey:{{{ns}}}:queue:x");
    let holder = open(&base, &ns).await;
    let opts = LockOptions::ttl(Duration::from_secs(30));
    let g = holder.lock("x", opts.clone()).await.unwrap();
    let mut waiters = Vec::new();
    for i in 0..8u64 {
        let h = open(&base, &ns).await;
        let h2 = h.clone();
        let o = opts.clone();
        let task = tokio::spawn(async move { h2.lock("x", o).await });
        eventually(Duration::from_secs(5), "the waiter to queue", || {
            let mut con = con.clone();
            let queue = queue.clone();
            async move { (zcard(&mut con, &queue).await == i + 1).then_some(()) }
        })
        .await;
        waiters.push((h, task));
    }
    // Let every waiter reach its wait (after queueing it subscribes and
    // tries once more).
    eventually(Duration::from_secs(5), "the waiters to subscribe", || {
        let mut con = con.clone();
        let pattern = format!("latchkey:{{{ns}}}:released:x:*");
        async move {
            let chans: Vec<String> = redis::cmd("PUBSUB")
                .arg("CHANNELS")
                .arg(&pattern)
                .query_async(&mut con)
                .await
                .unwrap();
            (chans.len() == 8).then_some(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before: Vec<u64> = waiters.iter().map(|(h, _)| h.op_count()).collect();
    g.release().await.unwrap();
    // The first to queue gets the lock...
    let (first, task) = waiters.remove(0);
    let g1 = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the head acquires")
        .unwrap()
        .unwrap();
    // Its attempt (and, in the background, the UNSUBSCRIBE of its channel).
    let sent = first.op_count() - before[0];
    assert!((1..=2).contains(&sent), "the head sent {sent} requests");
    // ...and nobody else was woken: no other waiter sent a request.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (i, (h, task)) in waiters.iter().enumerate() {
        assert_eq!(h.op_count(), before[i + 1], "waiter {} was woken", i + 1);
        assert!(!task.is_finished());
    }
    // Hand-over continues in queue order, each release waking one.
    let mut token = g1.fencing_token();
    g1.release().await.unwrap();
    for (_, task) in waiters {
        let g = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the next in line acquires")
            .unwrap()
            .unwrap();
        assert!(g.fencing_token() > token);
        token = g.fencing_token();
        g.release().await.unwrap();
    }
    assert_eq!(zcard(&mut con, &queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_waiter_does_not_block_the_queue() {
    let base = shared_url();
    let ns = unique_namespace("crashed");
    let mut con = raw(&base).await;
    let h = open(&base, &ns).await;
    let g = h
        .lock("x", LockOptions::ttl(Duration::from_secs(30)))
        .await
        .unwrap();
    // A waiter that queued and died without leaving: its entry is first in
    // line, with a lease that runs out in 300 ms.
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut con).await.unwrap();
    let now_ms = secs * 1000 + micros / 1000;
    let _: () = redis::pipe()
        .cmd("ZADD")
        .arg(format!("latchkey:{{{ns}}}:queue:x"))
        .arg(0)
        .arg("dead-waiter")
        .ignore()
        .cmd("ZADD")
        .arg(format!("latchkey:{{{ns}}}:waiters:x"))
        .arg(now_ms + 300)
        .arg("dead-waiter")
        .ignore()
        .query_async(&mut con)
        .await
        .unwrap();
    let w = open(&base, &ns).await;
    let waiter = tokio::spawn(async move {
        let t = Instant::now();
        let g = w.lock("x", LockOptions::ttl(Duration::from_secs(30))).await;
        (g, t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    g.release().await.unwrap();
    // The release woke the dead head (nobody listens); the live waiter's
    // wait is bounded by the dead one's lease, then it is first in line.
    let (g2, took) = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the live waiter is not stuck behind the dead one")
        .unwrap();
    g2.unwrap().release().await.unwrap();
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(
        zcard(&mut con, &format!("latchkey:{{{ns}}}:queue:x")).await,
        0
    );
}

#[tokio::test]
async fn try_lock_does_not_jump_the_queue() {
    let base = shared_url();
    let ns = unique_namespace("nojump");
    let con = raw(&base).await;
    let (a, b, c) = (
        open(&base, &ns).await,
        open(&base, &ns).await,
        open(&base, &ns).await,
    );
    let opts = LockOptions::ttl(Duration::from_secs(30));
    let g = a.lock("x", opts.clone()).await.unwrap();
    let o = opts.clone();
    let waiter = tokio::spawn(async move { b.lock("x", o).await.map(|g| (g, b)) });
    let queue = format!("latchkey:{{{ns}}}:queue:x");
    eventually(Duration::from_secs(5), "b to queue", || {
        let mut con = con.clone();
        let queue = queue.clone();
        async move { (zcard(&mut con, &queue).await == 1).then_some(()) }
    })
    .await;
    // Whatever the timing of the hand-over, c's try_lock never takes the
    // lock while b waits for it: b gets it next.
    g.release().await.unwrap();
    assert!(c.try_lock("x", opts.clone()).await.unwrap().is_none());
    let (g2, _b) = waiter.await.unwrap().unwrap();
    assert!(c.try_lock("x", opts.clone()).await.unwrap().is_none());
    g2.release().await.unwrap();
    c.try_lock("x", opts)
        .await
        .unwrap()
        .expect("free with nobody queued")
        .release()
        .await
        .unwrap();
}
