//! A hostile worker among control planes that share a PostgreSQL database: a job one control
//! plane handed to a worker cannot be claimed in a `Hello` by another worker on another
//! control plane, whose own hub never saw the hand-out. The claim is refused before anything of
//! the job is attached to the claimant, and the job stays its worker's.

#[path = "../../hodei-core/src/store/postgres/test_database.rs"]
mod test_database;

mod support;

use std::sync::Arc;

use hodei_agent::connect::ConnectError;
// `PostgresOptions` is what `test_database` finds in its parent module.
use hodei_core::{PostgresOptions, PostgresStore};
use hodei_server::logstore::{LogStore, LogStoreConfig};
use support::Setup;
use support::raw_worker::RawWorker;
use test_database::TestDatabase;
use tonic::Code;

const VICTIM: &str = "w-victim";
const HOSTILE: &str = "w-hostile";
const JOB: &str = "saga-shared/0#1";

async fn plane(db: &TestDatabase) -> (tempfile::TempDir, Arc<LogStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(PostgresStore::connect_with(&db.url, db.options()).await.unwrap());
    let logs = LogStore::open_shared(dir.path(), LogStoreConfig::default(), store).await.unwrap();
    (dir, Arc::new(logs))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_handed_out_by_another_control_plane_cannot_be_claimed_by_another_worker() {
    let Some(db) = TestDatabase::new("hostile_worker_shared_claim") else { return };
    let ((_a_dir, a), (_b_dir, b)) = (plane(&db).await, plane(&db).await);
    // Control plane A hands the job to the victim, as its assignment does before sending it.
    a.begin_on(JOB, VICTIM, 1).await.unwrap();
    assert_eq!(b.handed_to(JOB).await.unwrap().as_deref(), Some(VICTIM));
    assert_eq!(b.handed_to("saga-shared/9#1").await.unwrap(), None);

    let setup = Setup::hub_on(b.clone()).await;
    let hostile = RawWorker::register(&setup, HOSTILE).await;
    let refused = match hostile.open_claiming(&[JOB]).await {
        Err(ConnectError::Refused(status)) => status,
        other => panic!("expected a refusal, got {:?}", other.map(|_| "a session")),
    };
    assert_eq!(
        (refused.code(), refused.message()),
        (
            Code::PermissionDenied,
            format!(
                "worker `{HOSTILE}` sent a claim in its Hello for job `{JOB}`, which is not assigned to it"
            )
            .as_str()
        ),
    );
    assert!(!setup.hub.connected_workers().contains_key(HOSTILE));
    // Nothing was attached to the claimant: the job is still the victim's, on both planes.
    assert_eq!(a.handed_to(JOB).await.unwrap().as_deref(), Some(VICTIM));

    // The worker it was handed to may claim it on this plane, as after its own reconnect.
    let victim = RawWorker::register(&setup, VICTIM).await;
    assert!(victim.open_claiming(&[JOB]).await.is_ok(), "the job's own worker was refused");
}
