//! The suite tested against deliberately broken backends (wrappers over
//! mem with one bug each): each bug must make its specific cases fail,
//! while the same cases pass on a pass-through wrapper (so the failure is
//! the bug's, not the wrapper's).

#[allow(dead_code)]
mod broken;
mod bug_check;

use broken::{harness, Bug};

/// Each named case passes on the control wrapper and fails with `bug`.
async fn caught(bug: Bug, names: &[&str]) {
    bug_check::assert_caught(harness, Bug::None, bug, names).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_atomic_cas_is_caught() {
    caught(
        Bug::NonAtomicCas,
        &[
            "kv::concurrent_cas_counter",
            "txn::concurrent_increments_8x50",
            "kv::linearizable_history",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_revision_is_caught() {
    caught(
        Bug::ReusedRevision,
        &[
            "kv::delete_recreate_never_reuses_revision",
            "ttl::recreate_after_expiry_gets_new_revision",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_monotonic_token_is_caught() {
    caught(
        Bug::NonMonotonicToken,
        &[
            "lock::tokens_increase_100_holders",
            "lock::exclusion_8_tasks_checked",
            "lock::same_handle_tasks_exclude",
            "fence::reacquire_makes_old_guard_stale",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_excluding_lock_is_caught() {
    caught(
        Bug::NonExcludingLock,
        &[
            "lock::try_lock_free_then_held",
            "lock::exclusion_8_tasks_checked",
            "lock::same_handle_tasks_exclude",
            "lock::renewal_keeps_alive_5x_ttl",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_dropping_events_is_caught() {
    caught(
        Bug::WatchDropsEvents,
        &[
            "watch::sees_puts_and_deletes_in_order",
            "watch::rapid_puts_end_on_final_value",
            "watch::resume_replays_missed",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignored_ttl_is_caught() {
    caught(
        Bug::TtlIgnored,
        &["ttl::key_expires", "ttl::txn_put_with_ttl_expires"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_never_firing_is_caught() {
    caught(
        Bug::LostNeverFires,
        &[
            "lock::abandoned_lease_expires",
            "lock::revoked_entry_fires_lost",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_waiter_is_caught() {
    caught(Bug::PollingWaiter, &["lock::waiter_does_not_poll"]).await;
}
