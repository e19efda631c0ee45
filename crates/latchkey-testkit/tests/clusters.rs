//! Clusters: a 3-member etcd cluster and ZooKeeper ensemble, leaders, fail-over.

use latchkey_testkit::{probe, EtcdOptions, Kind, ZookeeperOptions};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(5);

#[test]
fn shared_etcd_cluster_lists_every_member_and_has_a_leader() {
    let c = latchkey_testkit::etcd_cluster();
    assert!(std::ptr::eq(c, latchkey_testkit::etcd_cluster()));
    assert_eq!(c.kind(), Kind::Etcd);
    assert_eq!(c.members().len(), 3);
    let hosts: Vec<String> = c
        .members()
        .iter()
        .map(|m| m.addr().unwrap().to_string())
        .collect();
    assert_eq!(c.url(), format!("etcd://{}", hosts.join(",")));
    for m in c.members() {
        probe::etcd_health(m.addr().unwrap(), LONG).unwrap();
    }
    c.leader().unwrap();
}

#[test]
fn etcd_cluster_elects_a_new_leader_when_the_leader_dies() {
    let c = latchkey_testkit::spawn_etcd_cluster(3, EtcdOptions::default()).unwrap();
    let old = c.leader_index().unwrap();
    c.members()[old].kill().unwrap();
    let new = c.leader_index().unwrap();
    assert_ne!(new, old);
    c.members()[old].restart().unwrap();
    c.wait_ready().unwrap();
    for m in c.members() {
        probe::etcd_health(m.addr().unwrap(), LONG).unwrap();
    }
}

#[test]
fn zookeeper_ensemble_elects_a_new_leader_when_the_leader_dies() {
    let c = latchkey_testkit::spawn_zookeeper_ensemble(3, ZookeeperOptions::fast()).unwrap();
    assert_eq!(c.kind(), Kind::ZooKeeper);
    let hosts: Vec<String> = c
        .members()
        .iter()
        .map(|m| m.addr().unwrap().to_string())
        .collect();
    assert_eq!(c.url(), format!("zookeeper://{}", hosts.join(",")));
    let modes: Vec<String> = c
        .members()
        .iter()
        .map(|m| probe::zk_mode(m.addr().unwrap(), LONG).unwrap())
        .collect();
    assert_eq!(
        modes.iter().filter(|m| *m == "leader").count(),
        1,
        "{modes:?}"
    );
    assert_eq!(
        modes.iter().filter(|m| *m == "follower").count(),
        2,
        "{modes:?}"
    );

    let old = c.leader_index().unwrap();
    c.members()[old].kill().unwrap();
    let new = c.leader_index().unwrap();
    assert_ne!(new, old);
    c.members()[old].restart().unwrap();
    assert_eq!(
        probe::zk_mode(c.members()[old].addr().unwrap(), LONG).unwrap(),
        "follower"
    );
}

#[test]
fn shared_zookeeper_ensemble_serves() {
    let c = latchkey_testkit::zookeeper_ensemble();
    assert_eq!(c.members().len(), 3);
    c.leader().unwrap();
    for m in c.members() {
        probe::zk_mode(m.addr().unwrap(), LONG).unwrap();
    }
}
