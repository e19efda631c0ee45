//! Adapter-specific behaviour on a real ZooKeeper: key mapping, interop with
//! the Curator-layout lock of `zookeeper-client`, digest auth and chroot,
//! the default (sequential) read mode, and servers without TTL nodes.

mod support;

use latchkey_core::{
    Backend, BackendUrl, Bytes, Compare, DeleteOptions, DistributedLock, Error, KvStore,
    ListOptions, LockOptions, Op, PutOptions, Txn, TxnRequest,
};
use latchkey_testkit::{spawn_zookeeper, unique_namespace, ZookeeperOptions};
use latchkey_zookeeper::keys::{decode_key, encode_key};
use latchkey_zookeeper::{ReadMode, ZookeeperBackend};
use proptest::prelude::*;
use std::time::Duration;
use support::{open, standalone_url};
use tokio::time::timeout;
use zookeeper_client as zk;

/// Characters ZooKeeper refuses in a path segment (checked on UTF-16).
fn legal_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.encode_utf16().all(|u| {
            let u = u32::from(u);
            !(u == u32::from(b'/')
                || u <= 0x1f
                || (0x7f..=0x9f).contains(&u)
                || (0xd800..=0xf8ff).contains(&u)
                || (0xfff0..=0xffff).contains(&u))
        })
}

/// Any valid latchkey key: 1..=512 bytes of UTF-8 without control characters.
fn valid_key() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z/.%]{1,40}",
        "[ -~]{1,60}",
        proptest::collection::vec(
            any::<char>().prop_filter("no control chars", |c| !c.is_control()),
            1..60
        )
        .prop_map(|v| v.into_iter().collect::<String>()),
    ]
    .prop_filter("at most 512 bytes", |k| k.len() <= 512)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    /// Every valid key maps to one legal znode name and back, exactly.
    #[test]
    fn key_mapping_round_trips(key in valid_key()) {
        let enc = encode_key(&key);
        prop_assert!(legal_segment(&enc), "{key:?} -> illegal {enc:?}");
        prop_assert_eq!(decode_key(&enc), Some(key));
    }

    /// Distinct keys get distinct names (the mapping is injective).
    #[test]
    fn key_mapping_is_injective(a in valid_key(), b in valid_key()) {
        prop_assume!(a != b);
        prop_assert_ne!(encode_key(&a), encode_key(&b));
    }
}

/// Keys that stress the mapping, written and listed through a real server:
/// `list` with non-segment-aligned prefixes returns them in key order.
#[tokio::test(flavor = "multi_thread")]
async fn odd_keys_through_the_server() {
    let h = open(&standalone_url(), &unique_namespace("zk-keys"), "")
        .await
        .unwrap();
    let keys = [
        "/",
        "//",
        "/a/",
        "a/..",
        ".",
        "..",
        "a b",
        "100%",
        "%2F",
        "🔒/x",
        "\u{e000}",
        "\u{fffd}",
        "zookeeper",
    ];
    for k in keys {
        h.put(k, Bytes::from(k.to_string()), PutOptions::default())
            .await
            .unwrap();
    }
    for k in keys {
        assert_eq!(
            h.get(k).await.unwrap().unwrap().value,
            Bytes::from(k.to_string()),
            "{k:?}"
        );
    }
    let mut want: Vec<&str> = keys.to_vec();
    want.sort_unstable();
    let all: Vec<String> = h
        .list("", ListOptions::default())
        .await
        .unwrap()
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(all, want);
    let slash: Vec<String> = h
        .list("/", ListOptions::default())
        .await
        .unwrap()
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(slash, vec!["/", "//", "/a/"]);
    let dot: Vec<String> = h
        .list(".", ListOptions::default())
        .await
        .unwrap()
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(dot, vec![".", ".."]);
}

/// A latchkey lock and `zookeeper-client`'s Curator-compatible lock on the
/// same path exclude each other, in both directions; the documented path is
/// the one used.
#[tokio::test(flavor = "multi_thread")]
async fn interop_with_curator_layout_lock() {
    let url = standalone_url();
    let h = open(&url, &unique_namespace("zk-curator"), "")
        .await
        .unwrap();
    let path = h.lock_path("x");
    assert!(path.ends_with("/locks/x"), "{path}");
    let raw = zk::Client::connect(
        url.trim_start_matches("zookeeper://")
            .split('?')
            .next()
            .unwrap(),
    )
    .await
    .unwrap();
    let acquire = |raw: zk::Client, path: String| async move {
        let opts = zk::LockOptions::new(zk::Acls::anyone_all());
        let lc = raw
            .lock(
                zk::LockPrefix::new_curator(&path, "lock-").unwrap(),
                b"",
                opts,
            )
            .await
            .unwrap();
        lc.into_owned()
    };
    // latchkey holds: the Curator-side lock waits.
    let g = h
        .lock("x", LockOptions::ttl(Duration::from_secs(4)))
        .await
        .unwrap();
    let curator = tokio::spawn(acquire(raw.clone(), path.clone()));
    assert!(
        timeout(Duration::from_millis(500), async {
            while !curator.is_finished() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .is_err(),
        "the Curator-layout lock must wait while latchkey holds"
    );
    g.release().await.unwrap();
    let curator_guard = timeout(Duration::from_secs(5), curator)
        .await
        .expect("curator gets it")
        .unwrap();
    // The Curator side holds: latchkey's try_lock fails, lock waits.
    assert!(h
        .try_lock("x", LockOptions::ttl(Duration::from_secs(4)))
        .await
        .unwrap()
        .is_none());
    let waiting = {
        let h = h.clone();
        tokio::spawn(async move { h.lock("x", LockOptions::ttl(Duration::from_secs(4))).await })
    };
    drop(curator_guard); // deletes its entry
    let g = timeout(Duration::from_secs(5), waiting)
        .await
        .expect("latchkey gets it")
        .unwrap()
        .unwrap();
    g.release().await.unwrap();
}

/// `user:pass@` is ZooKeeper digest auth: nodes are only usable by that
/// identity. The URL path is a chroot. No password in Debug output.
#[tokio::test(flavor = "multi_thread")]
async fn digest_auth_and_chroot() {
    let url = standalone_url();
    let hostport = url
        .trim_start_matches("zookeeper://")
        .split('?')
        .next()
        .unwrap()
        .to_string();
    let ns = unique_namespace("zk-auth");
    let secret_url = format!("zookeeper://alice:s3cret@{hostport}/apps/one?namespace={ns}");
    let alice = ZookeeperBackend::connect(&BackendUrl::parse(&secret_url).unwrap())
        .await
        .unwrap();
    assert!(!format!("{alice:?}").contains("s3cret"));
    alice
        .put("k", Bytes::from("v"), PutOptions::default())
        .await
        .unwrap();
    // The data lives below the chroot.
    let raw = zk::Client::connect(&hostport).await.unwrap();
    let znode = format!("/apps/one{}", alice.key_path("k"));
    assert_eq!(
        raw.get_data(&znode).await,
        Err(zk::Error::NoAuth),
        "unauthenticated read is refused"
    );
    let mallory = format!("zookeeper://mallory:guess@{hostport}/apps/one?namespace={ns}");
    match ZookeeperBackend::connect(&BackendUrl::parse(&mallory).unwrap()).await {
        Err(Error::Auth { .. }) => {}
        Ok(m) => assert!(matches!(m.get("k").await, Err(Error::Auth { .. }))),
        Err(e) => panic!("expected an Auth error, got {e}"),
    }
    let again = ZookeeperBackend::connect(&BackendUrl::parse(&secret_url).unwrap())
        .await
        .unwrap();
    assert_eq!(
        again.get("k").await.unwrap().unwrap().value,
        Bytes::from("v")
    );
}

/// The default read mode is plain ZooKeeper reads, declared as not
/// linearizable; everything else works the same.
#[tokio::test(flavor = "multi_thread")]
async fn sequential_mode_is_default_and_declared() {
    let h = open(&standalone_url(), &unique_namespace("zk-seq"), "")
        .await
        .unwrap();
    assert_eq!(h.read_mode(), ReadMode::Sequential);
    assert!(!h.capabilities().linearizable_reads);
    let lin = open(
        &standalone_url(),
        &unique_namespace("zk-lin"),
        "reads=linearizable",
    )
    .await
    .unwrap();
    assert!(lin.capabilities().linearizable_reads);
    let r1 = h
        .put("a", Bytes::from("1"), PutOptions::default())
        .await
        .unwrap();
    assert!(matches!(
        h.put("a", Bytes::from("2"), PutOptions::if_revision(r1 + 1)).await,
        Err(Error::Conflict { current: Some(r), .. }) if r == r1
    ));
    let r2 = h
        .put("a", Bytes::from("2"), PutOptions::if_revision(r1))
        .await
        .unwrap();
    assert!(r2 > r1);
    let out = h
        .txn(
            TxnRequest::new()
                .when([Compare::value("a", "2")])
                .then([Op::delete("a"), Op::get("a")]),
        )
        .await
        .unwrap();
    assert!(out.succeeded && out.revision > r2);
    assert!(h.get("a").await.unwrap().is_none());
    assert!(!h.delete("a", DeleteOptions::default()).await.unwrap());
    // Deleted keys stay as tombstones (ABA safety), invisible to list.
    assert!(h.list("", ListOptions::default()).await.unwrap().is_empty());
    let caps = h.capabilities();
    assert!(caps.global_revision && !caps.watch_resume && !caps.watch_every_revision);
    assert!(caps.max_lock_ttl.is_some() && caps.min_ttl <= caps.max_lock_ttl.unwrap());
}

/// Without `zookeeper.extendedTypesEnabled` there are no TTL nodes: the
/// capability is declared absent and TTL writes are `Unsupported`.
#[tokio::test(flavor = "multi_thread")]
async fn no_ttl_nodes_declared_and_refused() {
    let server = spawn_zookeeper(ZookeeperOptions {
        extended_types: false,
        ..ZookeeperOptions::fast()
    })
    .unwrap();
    let h = open(server.url(), &unique_namespace("zk-nottl"), "")
        .await
        .unwrap();
    assert!(!h.capabilities().native_ttl);
    assert!(matches!(
        h.put(
            "k",
            Bytes::from("v"),
            PutOptions::ttl(Duration::from_secs(5))
        )
        .await,
        Err(Error::Unsupported { .. })
    ));
    assert!(matches!(
        h.txn(TxnRequest::new().then([Op::put_with_ttl("k", "v", Duration::from_secs(5))]))
            .await,
        Err(Error::Unsupported { .. })
    ));
    h.put("k", Bytes::from("v"), PutOptions::default())
        .await
        .unwrap();
}

/// Bad URLs are typed errors naming the problem, never panics.
#[tokio::test(flavor = "multi_thread")]
async fn bad_urls() {
    for u in [
        "zookeeper://",
        "zookeeper://127.0.0.1:1?bogus=1",
        "zookeeper://127.0.0.1:1?reads=fast",
        "zookeeper://alice@127.0.0.1:1",
        "zookeeper://127.0.0.1:1/a//b",
    ] {
        let r = ZookeeperBackend::connect(&BackendUrl::parse(u).unwrap()).await;
        assert!(matches!(r, Err(Error::InvalidUrl { .. })), "{u}: {r:?}");
    }
}

/// A deleted key's znode stays as a tombstone, so its `dataVersion` keeps
/// growing across delete-and-recreate: a write pinned to a version read
/// before the delete can never match the recreated key (no ABA).
#[tokio::test(flavor = "multi_thread")]
async fn tombstones_keep_versions_growing() {
    let h = open(&standalone_url(), &unique_namespace("zk-aba"), "")
        .await
        .unwrap();
    let path = h.key_path("k");
    let r1 = h
        .put("k", Bytes::from("same"), PutOptions::default())
        .await
        .unwrap();
    let (_, before) = h.client().get_data(&path).await.unwrap();
    assert!(h.delete("k", DeleteOptions::default()).await.unwrap());
    let r2 = h
        .put("k", Bytes::from("same"), PutOptions::default())
        .await
        .unwrap();
    let (_, after) = h.client().get_data(&path).await.unwrap();
    assert_eq!(after.czxid, before.czxid, "the same znode: never deleted");
    assert!(
        after.version >= before.version + 2,
        "versions never restart"
    );
    assert!(r2 > r1);
    assert!(matches!(
        h.put("k", Bytes::from("x"), PutOptions::if_revision(r1)).await,
        Err(Error::Conflict { current: Some(r), .. }) if r == r2
    ));
}
