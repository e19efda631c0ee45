//! The fault runs with a small K, on real Redis and etcd, plus the self-test:
//! with fencing disabled the checkers must report violations.

use latchkey_faults::{BackendKind, RunOptions, Scenario};
use std::sync::Mutex;

/// The runs time leases on a 2-core machine: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn opts(backends: &[BackendKind], scenarios: &[Scenario], runs: u32, unfenced: bool) -> RunOptions {
    RunOptions {
        backends: backends.to_vec(),
        scenarios: scenarios.to_vec(),
        runs,
        seed: 20_261_126,
        quick: true,
        unfenced,
        ttl: None,
        force_liveness: false,
        holder_exe: env!("CARGO_BIN_EXE_latchkey-faults").into(),
        verbose: true,
    }
}

#[test]
fn fenced_counter_and_register_survive_holder_pause_and_server_kill() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let report = latchkey_faults::run(&opts(
        &[BackendKind::Redis, BackendKind::Etcd],
        &[Scenario::HolderPause, Scenario::KillRestart],
        2,
        false,
    ));
    let table = report.table();
    println!("{table}");
    assert_eq!(report.rows.len(), 4, "{table}");
    for r in &report.rows {
        assert!(r.skipped.is_none(), "{table}");
        assert_eq!(r.runs, 2, "{table}");
        assert!(r.ops > 100, "too few ops recorded:\n{table}");
    }
    assert_eq!(report.violations(), 0, "{table}");
    assert_eq!(
        report.rows.iter().map(|r| r.lost_updates).sum::<u64>(),
        0,
        "{table}"
    );
}

#[test]
fn an_etcd_member_cut_off_from_its_peers_leader_side_and_minority() {
    if let Err(why) = latchkey_faults::etcdnet::available() {
        eprintln!("not run: {why}");
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Seeds 20261126 (even: the leader is cut off) and 20261127 (a follower);
    // in each the holder child is stranded with the cut-off member and its
    // write must be refused (a run that cannot stage that counts as failed).
    let report = latchkey_faults::run(&opts(
        &[BackendKind::Etcd3],
        &[Scenario::MemberPartition],
        2,
        false,
    ));
    let table = report.table();
    println!("{table}");
    let row = &report.rows[0];
    assert!(row.skipped.is_none(), "{table}");
    assert_eq!(row.runs, 2, "{table}");
    assert!(row.ops > 100, "too few ops recorded:\n{table}");
    assert_eq!(report.violations(), 0, "{table}");
    assert_eq!(row.lost_updates, 0, "{table}");
}

#[test]
fn without_fencing_the_checkers_report_the_stale_holders_write() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // ZooKeeper too: there the paused holder's own session has expired,
    // so only a write through another connection shows the missing fence.
    let report = latchkey_faults::run(&opts(
        &[BackendKind::Redis, BackendKind::Zookeeper],
        &[Scenario::HolderPause],
        1,
        true,
    ));
    let table = report.table();
    println!("{table}");
    assert_eq!(report.rows.len(), 2, "{table}");
    for row in &report.rows {
        assert!(row.violations >= 3, "{}: {table}", row.backend);
        assert!(row.lost_updates >= 1, "{}: {table}", row.backend);
        let details = row.details.join("\n");
        for needle in [
            "exclusion violated",
            "lost updates",
            "stale holder's write committed",
        ] {
            assert!(
                details.contains(needle),
                "{}: no {needle:?} in:\n{table}",
                row.backend
            );
        }
    }
}

#[test]
fn pairs_a_backend_cannot_express_are_skipped_with_a_reason() {
    // No server starts: nothing applies.
    let report = latchkey_faults::run(&opts(
        &[BackendKind::Redis, BackendKind::ConsulSim],
        &[Scenario::RollingRestart, Scenario::MemberPartition],
        1,
        false,
    ));
    let table = report.table();
    assert_eq!(report.rows.len(), 4, "{table}");
    for r in &report.rows {
        let why = r.skipped.as_deref().unwrap_or_default();
        assert!(!why.is_empty(), "{table}");
        assert_eq!(r.runs, 0, "{table}");
    }
    assert!(table.contains("skipped: single node"), "{table}");
    assert_eq!(report.violations(), 0);
    // etcd-3 member partitions need network namespaces: runnable as root
    // with CAP_NET_ADMIN, otherwise skipped with that reason.
    match Scenario::MemberPartition.applies(BackendKind::Etcd3) {
        Ok(()) => assert_eq!(latchkey_faults::etcdnet::available(), Ok(())),
        Err(why) => assert!(why.contains("network namespaces"), "{why}"),
    }
    assert!(Scenario::RollingRestart
        .applies(BackendKind::Zookeeper3)
        .is_ok());
    assert!(Scenario::MemberPartition
        .applies(BackendKind::Zookeeper3)
        .is_ok());
    assert!(Scenario::ServerPause
        .applies(BackendKind::ConsulSim)
        .is_ok());
    assert!(Scenario::KillRestart
        .applies(BackendKind::ConsulSim)
        .is_err());
}

#[test]
fn slow_network_reports_spurious_losses_only_when_renewals_cannot_keep_up() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Default TTL (1.5 s > 3 × 400 ms): checked, and no holding loses its lock.
    let report = latchkey_faults::run(&opts(
        &[BackendKind::Redis],
        &[Scenario::SlowNetwork],
        1,
        false,
    ));
    let table = report.table();
    println!("{table}");
    assert_eq!(report.violations(), 0, "{table}");
    assert!(!table.contains("not done"), "{table}");
    // Self-test: TTL 300 ms, so a 400 ms round trip is beyond TTL/3. Not
    // checked by default (the note says so); forced, the losses are reported.
    let mut o = opts(&[BackendKind::Redis], &[Scenario::SlowNetwork], 1, false);
    o.ttl = Some(std::time::Duration::from_millis(300));
    let report = latchkey_faults::run(&o);
    let table = report.table();
    println!("{table}");
    assert_eq!(report.violations(), 0, "{table}");
    assert!(table.contains("spurious-loss check not done"), "{table}");
    o.force_liveness = true;
    let report = latchkey_faults::run(&o);
    let table = report.table();
    println!("{table}");
    assert!(report.violations() >= 1, "{table}");
    assert!(
        table.contains("VIOLATION spurious loss") && table.contains("lost() fired before release"),
        "{table}"
    );
}
