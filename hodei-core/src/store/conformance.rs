//! One behavioural suite that every [`EventStore`] must pass.

use super::EventStore;
use crate::error::Error;
use crate::event::{Event, RecordedEvent, SagaId, SagaRecord, SagaStatus, Timestamp};

fn event(seq: u64, event: Event) -> RecordedEvent {
    RecordedEvent { seq, at: Timestamp(1_000 + seq), event }
}

fn started(seq: u64) -> RecordedEvent {
    event(seq, Event::SagaStarted { definition: "d".into(), version: 1, input: vec![seq as u8] })
}

fn step(seq: u64) -> RecordedEvent {
    event(seq, Event::StepCompleted { step: seq as u32, output: vec![1, 2, 3] })
}

pub(crate) async fn run_all(store: &dyn EventStore) {
    create_then_read_back(store).await;
    creating_twice_returns_the_existing_record(store);
    appends_are_checked_against_the_next_sequence(store);
    a_final_record_leaves_the_in_flight_index(store).await;
    remove_deletes_everything(store);
    pages_cover_every_kept_record_once_in_id_order(store);
}

async fn create_then_read_back(store: &dyn EventStore) {
    let id = SagaId::new("read-back").unwrap();
    let record = SagaRecord::new(id.clone(), "d".into(), 1, Timestamp(1));
    assert_eq!(store.create(&record, &started(0)).unwrap(), None);
    store.append(&id, &[step(1)], None).unwrap();
    store.append(&id, &[step(2), step(3)], None).unwrap();
    store.durable().await.unwrap();
    assert_eq!(store.history(&id).unwrap(), vec![started(0), step(1), step(2), step(3)]);
    assert_eq!(store.record(&id).unwrap(), Some(record));
    assert!(store.in_flight().unwrap().iter().any(|r| r.id == id));
    assert!(store.history(&SagaId::new("nobody").unwrap()).unwrap().is_empty());
    assert_eq!(store.record(&SagaId::new("nobody").unwrap()).unwrap(), None);
}

fn creating_twice_returns_the_existing_record(store: &dyn EventStore) {
    let id = SagaId::new("twice").unwrap();
    let record = SagaRecord::new(id.clone(), "d".into(), 1, Timestamp(1));
    assert_eq!(store.create(&record, &started(0)).unwrap(), None);
    let other = SagaRecord::new(id.clone(), "other".into(), 2, Timestamp(2));
    assert_eq!(store.create(&other, &started(0)).unwrap(), Some(record));
    assert_eq!(store.history(&id).unwrap(), vec![started(0)], "the second create wrote nothing");
}

fn appends_are_checked_against_the_next_sequence(store: &dyn EventStore) {
    let id = SagaId::new("sequence").unwrap();
    let record = SagaRecord::new(id.clone(), "d".into(), 1, Timestamp(1));
    store.create(&record, &started(0)).unwrap();
    store.append(&id, &[step(1)], None).unwrap();
    for bad in [vec![step(1)], vec![step(3)], vec![step(0)], vec![step(2), step(4)], vec![step(1), step(2)]] {
        let err = store.append(&id, &bad, None).unwrap_err();
        assert!(matches!(err, Error::SequenceConflict { .. }), "{bad:?}: {err:?}");
    }
    let mut done = record.clone();
    done.status = SagaStatus::Completed;
    let err = store.append(&id, &[step(5)], Some(&done)).unwrap_err();
    assert!(matches!(err, Error::SequenceConflict { .. }));
    assert_eq!(store.record(&id).unwrap(), Some(record), "a refused append changes nothing");
    assert_eq!(store.history(&id).unwrap().len(), 2);
}

async fn a_final_record_leaves_the_in_flight_index(store: &dyn EventStore) {
    let id = SagaId::new("finishing").unwrap();
    let mut record = SagaRecord::new(id.clone(), "d".into(), 1, Timestamp(1));
    store.create(&record, &started(0)).unwrap();
    record.status = SagaStatus::Compensating;
    store.append(&id, &[], Some(&record)).unwrap();
    assert!(store.in_flight().unwrap().iter().any(|r| r.id == id && r.status == SagaStatus::Compensating));
    record.status = SagaStatus::Compensated;
    store.append(&id, &[event(1, Event::SagaCompensated { cause: "c".into() })], Some(&record)).unwrap();
    store.durable().await.unwrap();
    assert!(!store.in_flight().unwrap().iter().any(|r| r.id == id));
    assert_eq!(store.record(&id).unwrap().map(|r| r.status), Some(SagaStatus::Compensated));
    assert!(store.records().unwrap().iter().any(|r| r.id == id));

    // Reopened (a completed child whose parent compensates): in flight again, then final.
    record.status = SagaStatus::Compensating;
    store
        .append(&id, &[event(2, Event::CancelRequested { reason: "parent".into() })], Some(&record))
        .unwrap();
    store.durable().await.unwrap();
    assert!(store.in_flight().unwrap().iter().any(|r| r.id == id), "a reopened saga is in flight");
    assert_eq!(store.history(&id).unwrap().len(), 3);
    record.status = SagaStatus::Compensated;
    store.append(&id, &[event(3, Event::SagaCompensated { cause: "c".into() })], Some(&record)).unwrap();
    assert!(!store.in_flight().unwrap().iter().any(|r| r.id == id));
}

fn remove_deletes_everything(store: &dyn EventStore) {
    let id = SagaId::new("removed").unwrap();
    let record = SagaRecord::new(id.clone(), "d".into(), 1, Timestamp(1));
    store.create(&record, &started(0)).unwrap();
    store.append(&id, &[step(1)], None).unwrap();
    // A neighbour whose id extends this one must survive: prefixes must not leak.
    let neighbour = SagaId::new("removed2").unwrap();
    store.create(&SagaRecord::new(neighbour.clone(), "d".into(), 1, Timestamp(1)), &started(0)).unwrap();
    store.remove(&id).unwrap();
    assert!(store.history(&id).unwrap().is_empty());
    assert_eq!(store.record(&id).unwrap(), None);
    assert!(!store.in_flight().unwrap().iter().any(|r| r.id == id));
    assert_eq!(store.history(&neighbour).unwrap(), vec![started(0)]);
}

fn pages_cover_every_kept_record_once_in_id_order(store: &dyn EventStore) {
    // Ids whose byte order is not their creation order, and neighbours that extend each other.
    for i in [7u32, 30, 3, 12, 0, 25, 1, 18, 9, 22, 5, 14, 27, 2, 11] {
        for suffix in ["", "-x"] {
            let id = SagaId::new(format!("page-{i}{suffix}")).unwrap();
            let mut record =
                SagaRecord::new(id, format!("def-{}", i % 3), 1 + i % 2, Timestamp(u64::from(i)));
            if i.is_multiple_of(4) {
                record.status = SagaStatus::Completed;
            }
            store.create(&record, &started(0)).unwrap();
        }
    }
    let all = |keep: &dyn Fn(&SagaRecord) -> bool| {
        let mut records: Vec<SagaRecord> = store.records().unwrap().into_iter().filter(|r| keep(r)).collect();
        records.sort_by(|a, b| a.id.cmp(&b.id));
        records
    };
    let filters: [&dyn Fn(&SagaRecord) -> bool; 4] =
        [&|_| true, &|r| r.definition == "def-1", &|r| r.version == 2 && r.created_at > Timestamp(4), &|r| {
            r.status == SagaStatus::Completed
        }];
    for (n, keep) in filters.into_iter().enumerate() {
        let expected = all(keep);
        assert!(!expected.is_empty(), "filter {n} keeps nothing: the test would prove nothing");
        for limit in [1, 4, expected.len(), expected.len() + 1] {
            let mut paged = Vec::new();
            let mut after: Option<SagaId> = None;
            loop {
                let page = store.records_after(after.as_ref(), limit, keep).unwrap();
                assert!(page.len() <= limit, "filter {n}, limit {limit}: a page of {}", page.len());
                let Some(last) = page.last() else { break };
                after = Some(last.id.clone());
                paged.extend(page);
            }
            assert_eq!(paged, expected, "filter {n}, limit {limit}");
        }
        assert!(store.records_after(None, 0, keep).unwrap().is_empty());
    }
}
