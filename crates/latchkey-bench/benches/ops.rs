//! Every backend's lock+release, get, put, CAS and 4-op txn through latchkey,
//! beside the same work done with the raw client library (the minimal
//! equivalent commands), so each report gives the adapter/raw ratio measured
//! in one run. Servers come from the testkit (or `LATCHKEY_TEST_*_URL`).
//!
//! `cargo xtask bench` runs this and prints the summary table.

use criterion::{criterion_group, criterion_main, Criterion};
use latchkey::prelude::*;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration as StdDuration;
use tokio::runtime::Runtime;

const VALUE: &str = "benchmark-value";

fn rt() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn config(c: &mut Criterion) -> &mut Criterion {
    c
}

/// The latchkey side: the same five benchmarks on any URL.
fn bench_latchkey(c: &mut Criterion, rt: &Runtime, label: &str, url: &str) {
    let url = format!(
        "{url}{}namespace=bench",
        if url.contains('?') { '&' } else { '?' }
    );
    let coord = rt.block_on(latchkey::connect(&url)).expect("connect");
    let opts = LockOptions::ttl(Duration::from_secs(30));
    c.benchmark_group(format!("{label}-lock_release"))
        .bench_function("latchkey", |b| {
            b.to_async(rt).iter(|| async {
                let g = coord.lock("bench-lock", opts.clone()).await.unwrap();
                g.release().await.unwrap();
            })
        });
    rt.block_on(coord.put("bench-key", Bytes::from(VALUE), PutOptions::default()))
        .unwrap();
    c.benchmark_group(format!("{label}-get"))
        .bench_function("latchkey", |b| {
            b.to_async(rt)
                .iter(|| async { coord.get("bench-key").await.unwrap() })
        });
    c.benchmark_group(format!("{label}-put"))
        .bench_function("latchkey", |b| {
            b.to_async(rt).iter(|| async {
                coord
                    .put("bench-key", Bytes::from(VALUE), PutOptions::default())
                    .await
                    .unwrap()
            })
        });
    let rev = Arc::new(AtomicU64::new(
        rt.block_on(coord.put("bench-cas", Bytes::from(VALUE), PutOptions::default()))
            .unwrap(),
    ));
    c.benchmark_group(format!("{label}-cas"))
        .bench_function("latchkey", |b| {
            b.to_async(rt).iter(|| async {
                let r = coord
                    .put(
                        "bench-cas",
                        Bytes::from(VALUE),
                        PutOptions::if_revision(rev.load(Ordering::SeqCst)),
                    )
                    .await
                    .unwrap();
                rev.store(r, Ordering::SeqCst);
            })
        });
    c.benchmark_group(format!("{label}-txn4"))
        .bench_function("latchkey", |b| {
            b.to_async(rt).iter(|| async {
                coord
                    .txn(
                        TxnRequest::new()
                            .then((0..4).map(|i| Op::put(format!("bench-txn{i}"), VALUE))),
                    )
                    .await
                    .unwrap()
            })
        });
}

fn bench_mem(c: &mut Criterion) {
    let rt = rt();
    bench_latchkey(config(c), &rt, "mem", "mem://bench");
}

fn bench_redis(c: &mut Criterion) {
    let rt = rt();
    let url = latchkey_testkit::redis().url().to_string();
    bench_latchkey(c, &rt, "redis", &url);
    let client = redis::Client::open(url.as_str()).unwrap();
    let con = rt
        .block_on(client.get_multiplexed_async_connection())
        .unwrap();
    // What a careful hand-written lock does: SET NX PX, compare-and-delete.
    let unlock = redis::Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end",
    );
    let cas = redis::Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2]) return 1 else return 0 end",
    );
    let txn4 =
        redis::Script::new("for i = 1, 4 do redis.call('SET', KEYS[i], ARGV[1]) end return 1");
    c.benchmark_group("redis-lock_release")
        .bench_function("raw", |b| {
            b.to_async(&rt).iter(|| async {
                let mut con = con.clone();
                let ok: Option<String> = redis::cmd("SET")
                    .arg("raw-lock")
                    .arg("owner-token")
                    .arg("NX")
                    .arg("PX")
                    .arg(30_000)
                    .query_async(&mut con)
                    .await
                    .unwrap();
                assert!(ok.is_some());
                let _: i64 = unlock
                    .key("raw-lock")
                    .arg("owner-token")
                    .invoke_async(&mut con)
                    .await
                    .unwrap();
            })
        });
    c.benchmark_group("redis-get").bench_function("raw", |b| {
        b.to_async(&rt).iter(|| async {
            let mut con = con.clone();
            let _: Option<Vec<u8>> = redis::cmd("GET")
                .arg("raw-key")
                .query_async(&mut con)
                .await
                .unwrap();
        })
    });
    c.benchmark_group("redis-put").bench_function("raw", |b| {
        b.to_async(&rt).iter(|| async {
            let mut con = con.clone();
            let _: () = redis::cmd("SET")
                .arg("raw-key")
                .arg(VALUE)
                .query_async(&mut con)
                .await
                .unwrap();
        })
    });
    c.benchmark_group("redis-cas").bench_function("raw", |b| {
        b.to_async(&rt).iter(|| async {
            let mut con = con.clone();
            let _: i64 = cas
                .key("raw-key")
                .arg(VALUE)
                .arg(VALUE)
                .invoke_async(&mut con)
                .await
                .unwrap();
        })
    });
    c.benchmark_group("redis-txn4").bench_function("raw", |b| {
        b.to_async(&rt).iter(|| async {
            let mut con = con.clone();
            let _: i64 = txn4
                .key("raw-t1")
                .key("raw-t2")
                .key("raw-t3")
                .key("raw-t4")
                .arg(VALUE)
                .invoke_async(&mut con)
                .await
                .unwrap();
        })
    });
}

fn bench_etcd(c: &mut Criterion) {
    use etcd_client::{Compare, CompareOp, PutOptions as EPut, Txn as ETxn, TxnOp};
    let rt = rt();
    let url = latchkey_testkit::etcd().url().to_string();
    bench_latchkey(c, &rt, "etcd", &url);
    let endpoint = format!("http://{}", url.trim_start_matches("etcd://"));
    let client = rt
        .block_on(etcd_client::Client::connect([endpoint], None))
        .unwrap();
    let lease = rt
        .block_on(client.clone().lease_grant(60, None))
        .unwrap()
        .id();
    c.benchmark_group("etcd-lock_release")
        .bench_function("raw", |b| {
            // What etcd's Go concurrency.Mutex sends uncontended: one txn, one delete.
            b.to_async(&rt).iter(|| async {
                let mut cl = client.clone();
                let txn = ETxn::new()
                    .when([Compare::create_revision("raw-lock", CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(
                        "raw-lock",
                        "",
                        Some(EPut::new().with_lease(lease)),
                    )]);
                assert!(cl.txn(txn).await.unwrap().succeeded());
                cl.delete("raw-lock", None).await.unwrap();
            })
        });
    c.benchmark_group("etcd-get").bench_function("raw", |b| {
        b.to_async(&rt)
            .iter(|| async { client.clone().get("raw-key", None).await.unwrap() })
    });
    c.benchmark_group("etcd-put").bench_function("raw", |b| {
        b.to_async(&rt)
            .iter(|| async { client.clone().put("raw-key", VALUE, None).await.unwrap() })
    });
    let rev = Arc::new(AtomicI64::new(
        rt.block_on(client.clone().put("raw-cas", VALUE, None))
            .unwrap()
            .header()
            .unwrap()
            .revision(),
    ));
    c.benchmark_group("etcd-cas").bench_function("raw", |b| {
        b.to_async(&rt).iter(|| async {
            let txn = ETxn::new()
                .when([Compare::mod_revision(
                    "raw-cas",
                    CompareOp::Equal,
                    rev.load(Ordering::SeqCst),
                )])
                .and_then([TxnOp::put("raw-cas", VALUE, None)]);
            let resp = client.clone().txn(txn).await.unwrap();
            assert!(resp.succeeded());
            rev.store(resp.header().unwrap().revision(), Ordering::SeqCst);
        })
    });
    c.benchmark_group("etcd-txn4").bench_function("raw", |b| {
        b.to_async(&rt).iter(|| async {
            let ops: Vec<TxnOp> = (0..4)
                .map(|i| TxnOp::put(format!("raw-txn{i}"), VALUE, None))
                .collect();
            client.clone().txn(ETxn::new().and_then(ops)).await.unwrap()
        })
    });
}

fn bench_zookeeper(c: &mut Criterion) {
    use zookeeper_client as zk;
    let rt = rt();
    let url = latchkey_testkit::zookeeper().url().to_string();
    bench_latchkey(c, &rt, "zookeeper", &url);
    let client = rt
        .block_on(zk::Client::connect(url.trim_start_matches("zookeeper://")))
        .unwrap();
    let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    let ephemeral_seq = zk::CreateMode::EphemeralSequential.with_acls(zk::Acls::anyone_all());
    rt.block_on(async {
        for p in [
            "/raw-bench",
            "/raw-bench/lock",
            "/raw-bench/key",
            "/raw-bench/t0",
            "/raw-bench/t1",
            "/raw-bench/t2",
            "/raw-bench/t3",
        ] {
            match client.create(p, VALUE.as_bytes(), &persistent).await {
                Ok(_) | Err(zk::Error::NodeExists) => {}
                Err(e) => panic!("{e}"),
            }
        }
    });
    c.benchmark_group("zookeeper-lock_release")
        .bench_function("raw", |b| {
            // The ZooKeeper lock recipe uncontended: create ephemeral-sequential, delete.
            b.to_async(&rt).iter(|| async {
                let (_, seq) = client
                    .create("/raw-bench/lock/n-", b"", &ephemeral_seq)
                    .await
                    .unwrap();
                client
                    .delete(&format!("/raw-bench/lock/n-{seq}"), None)
                    .await
                    .unwrap();
            })
        });
    c.benchmark_group("zookeeper-get")
        .bench_function("raw", |b| {
            b.to_async(&rt)
                .iter(|| async { client.get_data("/raw-bench/key").await.unwrap() })
        });
    c.benchmark_group("zookeeper-put")
        .bench_function("raw", |b| {
            b.to_async(&rt).iter(|| async {
                client
                    .set_data("/raw-bench/key", VALUE.as_bytes(), None)
                    .await
                    .unwrap()
            })
        });
    let version = Arc::new(AtomicI64::new(
        rt.block_on(client.get_data("/raw-bench/key"))
            .unwrap()
            .1
            .version as i64,
    ));
    c.benchmark_group("zookeeper-cas")
        .bench_function("raw", |b| {
            b.to_async(&rt).iter(|| async {
                let v = version.load(Ordering::SeqCst) as i32;
                let stat = client
                    .set_data("/raw-bench/key", VALUE.as_bytes(), Some(v))
                    .await
                    .unwrap();
                version.store(stat.version as i64, Ordering::SeqCst);
            })
        });
    c.benchmark_group("zookeeper-txn4")
        .bench_function("raw", |b| {
            b.to_async(&rt).iter(|| async {
                let mut w = client.new_multi_writer();
                for i in 0..4 {
                    w.add_set_data(&format!("/raw-bench/t{i}"), VALUE.as_bytes(), None)
                        .unwrap();
                }
                w.commit().await.unwrap();
            })
        });
}

fn bench_consul(c: &mut Criterion) {
    let rt = rt();
    let url = latchkey_testkit::consul().url().to_string();
    bench_latchkey(c, &rt, "consul-sim", &url);
    let base = format!(
        "http://{}",
        url.trim_start_matches("consul://")
            .split('?')
            .next()
            .unwrap()
    );
    let http = reqwest::Client::new();
    let session: String = rt.block_on(async {
        let v: serde_json::Value = http
            .put(format!("{base}/v1/session/create"))
            .json(&serde_json::json!({"TTL": "60s", "LockDelay": "0s", "Checks": []}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["ID"].as_str().unwrap().to_string()
    });
    c.benchmark_group("consul-sim-lock_release")
        .bench_function("raw", |b| {
            // What Consul's api.Lock sends uncontended: acquire, release.
            b.to_async(&rt).iter(|| async {
                let ok: bool = http
                    .put(format!("{base}/v1/kv/raw-lock"))
                    .query(&[("acquire", session.as_str())])
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                assert!(ok);
                http.put(format!("{base}/v1/kv/raw-lock"))
                    .query(&[("release", session.as_str())])
                    .send()
                    .await
                    .unwrap();
            })
        });
    rt.block_on(http.put(format!("{base}/v1/kv/raw-key")).body(VALUE).send())
        .unwrap();
    c.benchmark_group("consul-sim-get")
        .bench_function("raw", |b| {
            b.to_async(&rt).iter(|| async {
                http.get(format!("{base}/v1/kv/raw-key"))
                    .send()
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap()
            })
        });
    c.benchmark_group("consul-sim-put")
        .bench_function("raw", |b| {
            b.to_async(&rt).iter(|| async {
                http.put(format!("{base}/v1/kv/raw-key"))
                    .body(VALUE)
                    .send()
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap()
            })
        });
    c.benchmark_group("consul-sim-cas")
        .bench_function("raw", |b| {
            // Read the index, then write with ?cas= (the minimal CAS round trip is the write).
            b.to_async(&rt).iter(|| async {
                let resp = http
                    .get(format!("{base}/v1/kv/raw-key"))
                    .send()
                    .await
                    .unwrap();
                let index = resp.headers()["x-consul-index"]
                    .to_str()
                    .unwrap()
                    .to_string();
                let _ = resp.bytes().await;
                http.put(format!("{base}/v1/kv/raw-key"))
                    .query(&[("cas", index.as_str())])
                    .body(VALUE)
                    .send()
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap()
            })
        });
    c.benchmark_group("consul-sim-txn4").bench_function("raw", |b| {
        let ops: Vec<_> = (0..4)
            .map(|i| serde_json::json!({"KV": {"Verb": "set", "Key": format!("raw-txn{i}"), "Value": "dmFsdWU="}}))
            .collect();
        b.to_async(&rt).iter(|| async {
            http.put(format!("{base}/v1/txn")).json(&ops).send().await.unwrap().bytes().await.unwrap()
        })
    });
}

fn short() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(StdDuration::from_millis(300))
        .measurement_time(StdDuration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = short();
    targets = bench_mem, bench_redis, bench_etcd, bench_zookeeper, bench_consul
}
criterion_main!(benches);
